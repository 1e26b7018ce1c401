#include "bundle.h"

#include "formats.h"
#include "rng.h"
#include "safetensors.h"
#include "schema.h"
#include "schemas.h"
#include "sha256.h"

namespace blockskip {

using json::Value;

std::string Bundle::listed(const std::string& rel) const {
  const Value* rec = manifest.at("files").find(rel);
  if (!rec) throw InputError("bundle manifest does not list " + rel + "; export the bundle again");
  if (rel.empty() || rel[0] == '/' || ("/" + rel + "/").find("/../") != std::string::npos)
    throw InputError("manifest path " + rel + " leaves the bundle; the bundle is malformed, export it again");
  std::string p = join(root, rel);
  if (!is_file(p)) throw InputError("bundle file " + rel + " is missing; copy the whole bundle folder or export again");
  long long want = rec->at(formats::kRecordSize).as_int("size of " + rel);
  if (file_size(p) != want)
    throw InputError("bundle file " + rel + " has " + std::to_string(file_size(p)) + " bytes, the manifest says " +
                     std::to_string(want) + ": it is truncated or corrupt; copy it again or export again");
  if (verify && sha256_file(p) != rec->at(formats::kRecordSha256).as_string("sha256 of " + rel))
    throw InputError("bundle file " + rel + " does not match its recorded sha256: it is corrupt; export again");
  return p;
}

namespace {

const char kExportAgain[] = "export the bundle again";
const char kPrecomputeAgain[] = "delete the cache folder and precompute again";

}  // namespace

void check_manifest(const Value& m, const std::string& path) {
  if (!m.is_object()) throw FormatError(path + " is not a manifest (a JSON object); " + kExportAgain);
  const Value* v = m.find("schema_version");
  if (!v || !v->is_integer_token() || v->number_token() != std::to_string(formats::kSchemaVersion))
    throw FormatError("bundle schema version " + (v ? json::dump(*v) : std::string("(none)")) +
                      " is not supported (this runner reads version " + std::to_string(formats::kSchemaVersion) +
                      "): the bundle was exported by another version; export it again with this version");
  const Value* rec = m.find(formats::kManifestSha256);
  bool intact = rec && rec->is_string();
  if (intact) {
    Value rest = m;
    rest.erase(formats::kManifestSha256);
    try {
      intact = sha256_hex(json::dump_canonical(rest)) == rec->as_string();
    } catch (const json::Error&) {
      intact = false;  // a number out of range: not what the exporter wrote
    }
  }
  if (!intact)
    throw FormatError(path + " does not match its integrity record (" + formats::kManifestSha256 +
                      "): it is corrupt or was edited; " + kExportAgain);
  schema::check_document(formats::kSchemaManifest, m, path, kExportAgain);
}

Value read_cache_index(const std::string& ipath) {
  Value idx = read_json(ipath, "cache index", kPrecomputeAgain);
  schema::check_document(formats::kSchemaCacheIndex, idx, ipath, kPrecomputeAgain);
  const Value& source = idx.at(formats::kIndexSource);
  if (idx.at(formats::kIndexSourceSha256).as_string() != sha256_hex(json::dump_python_sorted(source)))
    throw FormatError(ipath + ": " + formats::kIndexSourceSha256 + " is not the digest of " + formats::kIndexSource +
                      " (the index was edited or is corrupt); " + kPrecomputeAgain);
  return idx;
}

void check_cache_schedule(const Value& index, const Value& expected, const std::string& ipath) {
  const Value& got = index.at(formats::kIndexSchedule);
  if (!json::equal(got, expected))
    throw FormatError(ipath + ": its schedule is not the one the bundle makes for " +
                      got.at("meta").at("num_images").number_token() + " photos (edited or corrupt); " +
                      kPrecomputeAgain);
}

Bundle load_bundle(const std::string& root, bool verify) {
  Bundle b;
  b.root = root;
  b.verify = verify;
  std::string mpath = join(root, formats::kManifest);
  if (!is_dir(root)) throw InputError("bundle folder '" + root + "' does not exist");
  if (!is_file(mpath)) throw InputError("'" + root + "' is not a bundle: it has no manifest.json (make one with blockskip-export)");
  b.manifest = read_json(mpath, "bundle manifest", kExportAgain);
  check_manifest(b.manifest, mpath);
  b.manifest_sha256 = sha256_file(mpath);
  const Value& m = b.manifest;
  try {
    b.plan = m.at("plan");
    if (const Value* s = b.plan.find("span"); s && s->is_string()) b.span = s->as_string();
    if (b.span != "resident" && b.span != "streamed")
      throw InputError("the bundle's plan has span '" + b.span + "'; this runner trains 'resident' and 'streamed' spans");
    b.steps = b.plan.at("steps").as_int("plan.steps");
    b.grad_accum = b.plan.at("grad_accum").as_int("plan.grad_accum");
    b.checkpoint_every = b.plan.at("checkpoint_every").as_int("plan.checkpoint_every");
    if (b.steps < 0 || b.grad_accum < 1 || b.checkpoint_every < 1)
      throw InputError("bundle plan has steps/grad_accum/checkpoint_every out of range");
    b.lr = b.plan.at("lr").as_double("plan.lr");
    b.weight_decay = b.plan.at("weight_decay").as_double("plan.weight_decay");
    const Value& lora = m.at("lora");
    for (const auto& kv : lora.at("metadata").as_object("lora.metadata"))
      b.lora_metadata.emplace_back(kv.first, kv.second.as_string("lora.metadata." + kv.first));
    const double rank = lora.at("rank").as_double("lora.rank");
    if (!(rank > 0)) throw InputError("the bundle's LoRA rank is not positive; export it again");
    b.lora_scale = lora.at("alpha").as_double("lora.alpha") / rank;
    m.at("files").as_object("files");
    const Value* pte = m.find("pte");
    if (pte)
      if (const Value* d = pte->find("delegate"); d && d->is_string()) b.delegate = d->as_string();
    std::string formats;
    if (const Value* f = m.find("formats"))
      for (const auto& x : f->as_array("formats")) formats += (formats.empty() ? "" : ",") + x.as_string();
    if (formats.empty()) formats = "torch";
    if (b.span == "resident" && (!pte || !pte->find("train")))
      throw InputError("bundle '" + root + "' has no ExecuTorch training program (exported with --format " + formats +
                       "); export it again with --format pte (e.g. --format torch,pte)");
    const Value* stream = m.find("stream");
    const Value* head = stream && stream->find("shapes") ? stream->at("shapes").find("head") : nullptr;
    const Value* head_prog = head && head->find("programs") ? head->at("programs").find("head") : nullptr;
    if (b.span == "streamed" && (!head_prog || !head_prog->find("pte")))
      throw InputError("bundle '" + root + "' has no ExecuTorch block programs for its streamed span (exported with "
                       "--format " + formats + "); export it again with --format pte (e.g. --format torch,pte)");
  } catch (const json::Error& e) {
    throw InputError("bundle manifest " + mpath + " is not as expected: " + e.what());
  }
  return b;
}

Cache load_cache(const std::string& root, const Bundle& b) {
  Cache c;
  c.root = root;
  std::string ipath = join(root, formats::kCacheIndex);
  if (!is_dir(root)) throw InputError("cache folder '" + root + "' does not exist: run `device-train precompute` first");
  if (!is_file(ipath)) throw InputError("no cache in '" + root + "': run `device-train precompute` first");
  Value idx = read_cache_index(ipath);
  try {
    // the identity as written into the index (read_cache_index checked it is the digest of the source)
    c.source_sha256 = idx.at(formats::kIndexSourceSha256).as_string();
    if (idx.at(formats::kIndexSource).at(formats::kSourceBundle).as_string() != b.manifest_sha256)
      throw InputError("this cache was computed for another bundle; precompute again into a new folder");
    const Value& sched = b.manifest.at("schedule");
    const int64_t n = idx.at(formats::kIndexSchedule).at("meta").at("num_images").as_int("schedule.meta.num_images");
    check_cache_schedule(idx, schedule_json(sched, n, build_schedule(sched, n)), ipath);
    size_t K = idx.at(formats::kIndexSchedule).at(formats::kScheduleEntries).as_array("schedule.entries").size();
    if (K == 0) throw InputError("the cache's schedule is empty; precompute again");
    const Value* entries = idx.find(formats::kIndexEntries);
    size_t missing = 0;
    for (size_t k = 0; k < K; ++k) {
      const Value* rec = entries ? entries->find(std::to_string(k)) : nullptr;
      if (!rec || !is_file(join(root, rec->at(formats::kRecordFile).as_string("file")))) {
        ++missing;
        c.files.emplace_back();
        c.digests.emplace_back();
        continue;
      }
      c.files.push_back(join(root, rec->at(formats::kRecordFile).as_string()));
      c.digests.push_back(rec->at(formats::kRecordSha256).as_string("sha256"));
    }
    if (missing)
      throw InputError("cache is incomplete (" + std::to_string(missing) + " of " + std::to_string(K) +
                       " entries missing); run `device-train precompute` again to finish it");
  } catch (const json::Error& e) {
    throw InputError("cache index " + ipath + " is not as expected: " + e.what());
  }
  return c;
}

namespace {

// Shard k read whole and checked: its sha256 (with `verify`), its header against the declared format and
// every value finite (a NaN in the cache makes a NaN LoRA).
SafetensorsFile read_shard(const Cache& c, size_t k, bool verify) {
  auto rebuild = "; delete it and run `device-train precompute` again to rebuild it";
  SafetensorsFile f = [&] {
    try {
      return SafetensorsFile::read(c.files[k]);
    } catch (const std::exception& ex) {
      throw FormatError("cache entry " + std::to_string(k) + ": " + ex.what() + rebuild);
    }
  }();
  if (verify && sha256_hex(f.bytes().data(), f.bytes().size()) != c.digests[k])
    throw FormatError("cache shard " + c.files[k] + " does not match its recorded sha256 (corrupt)" + rebuild);
  schema::check_document(formats::kSchemaCacheEntry, f.header(), "cache shard " + c.files[k],
                         "delete it and run `device-train precompute` again to rebuild it");
  if (const std::string bad = f.first_nonfinite(); !bad.empty())
    throw FormatError("cache shard " + c.files[k] + " holds NaN or Inf values (" + bad +
                      "): training on it would make a NaN LoRA. Precompute the cache again; if it happens again, the "
                      "photos or the bundle produce them");
  return f;
}

}  // namespace

void verify_cache(const Cache& c, bool verify) {
  for (size_t k = 0; k < c.files.size(); ++k) read_shard(c, k, verify);
}

Entry load_entry(const Cache& c, size_t k, bool verify) {
  Entry e;
  e.index = k;
  e.file = c.files[k];
  auto rebuild = "; delete it and run `device-train precompute` again to rebuild it";
  SafetensorsFile f = read_shard(c, k, verify);
  try {
    for (const auto& kv : f.tensors()) {
      const std::string& d = kv.second.dtype;
      if (d == "F32" || d == "F16" || d == "BF16") e.tensors[kv.first] = FTensor{kv.second.shape, f.to_floats(kv.first)};
    }
  } catch (const std::exception& ex) {
    throw FormatError(std::string("cache entry ") + std::to_string(k) + ": " + ex.what() + rebuild);
  }
  return e;
}

std::vector<size_t> entry_order(size_t K, long long steps, long long grad_accum) {
  std::vector<size_t> order;
  order.reserve(size_t(steps * grad_accum));
  for (long long s = 0; s < steps; ++s)
    for (long long j = 0; j < grad_accum; ++j) order.push_back(size_t((s * grad_accum + j) % (long long)K));
  return order;
}

}  // namespace blockskip
