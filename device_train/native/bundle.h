// The bundle (manifest.json and the files it lists) and the residual cache (index.json and one
// safetensors shard per schedule entry), as both training modes read them.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "adamw.h"
#include "common.h"
#include "json.h"

namespace blockskip {

struct Bundle {
  std::string root, manifest_sha256;
  json::Value manifest, plan;
  bool verify = true;
  std::string span = "resident";  // plan.span: "resident" (pte.train) or "streamed" (stream programs)
  long long steps = 0, grad_accum = 1, checkpoint_every = 0;
  double lr = 0.0, weight_decay = 0.0;
  // the LoRA file: metadata (written verbatim) and alpha / rank (folded into lora_B)
  std::vector<std::pair<std::string, std::string>> lora_metadata;
  double lora_scale = 1.0;
  std::string delegate = "none";  // pte.delegate, for the log

  // The path of a listed file after checking its size and (unless --no-verify) its sha256.
  std::string listed(const std::string& rel) const;
};

Bundle load_bundle(const std::string& root, bool verify);

// What a manifest passes before anything is taken from it (runtime/bundle.py, in the same order): a JSON
// object, schema_version formats::kSchemaVersion, its integrity record (formats::kManifestSha256: sha256 of
// the canonical form of the rest), then its schema and rules. FormatError naming `path` otherwise.
void check_manifest(const json::Value& m, const std::string& path);

// The cache's index.json read and checked (runtime/cache.py): its schema and rules, and source_sha256 the
// digest of source. FormatError naming `ipath` otherwise.
json::Value read_cache_index(const std::string& ipath);

// The index's realised schedule must be exactly `expected`, the schedule the runner builds from the
// manifest for the index's photo count (an index whose schedule was cut or edited is refused).
void check_cache_schedule(const json::Value& index, const json::Value& expected, const std::string& ipath);

struct Cache {
  std::string root;
  std::vector<std::string> files;    // shard per schedule entry
  std::vector<std::string> digests;  // their recorded sha256
  std::string source_sha256;         // identity of what the cache was computed from
};

Cache load_cache(const std::string& root, const Bundle& b);

struct Entry {
  size_t index = 0;
  std::string file;
  FTensors tensors;  // every tensor of the shard, as float32
};

// Shard k read and checked against its sha256 (unless `verify` is false), its declared format and for
// non-finite values.
Entry load_entry(const Cache& c, size_t k, bool verify);

// Every shard checked as load_entry checks it, before training reads any (one shard in memory at a time).
void verify_cache(const Cache& c, bool verify);

// The entry order of the Python backends: [(s * grad_accum + j) % K for s in steps for j in grad_accum].
std::vector<size_t> entry_order(size_t K, long long steps, long long grad_accum);

}  // namespace blockskip
