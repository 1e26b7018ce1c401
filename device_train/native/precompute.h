// Native precompute (runtime/precompute.py, in the same order): the user's photos -> the residual cache
// the trained span reads, with the bundle's ExecuTorch programs and no Python.
//
// Photos are read and resized (images.cpp), encoded by the encoder program(s) (in tiles when the bundle
// says so, blended as runtime/tiles.py blends them), the seeded patch schedule is realised (rng.cpp),
// each entry's crop is area-resized to s_min and noised by the embed program, which also embeds it with
// the prompt; then every block up to the end of the last skipped span runs its shape's forward program
// with a zero LoRA, one block's stored weights at a time (the next read ahead), over a chunk of entries.
// The trained span's exact input and every skipped span's residual go into one safetensors shard per
// entry; index.json records each shard's sha256, the schedule and what the cache was computed from.
#pragma once
#include <string>

namespace blockskip {

struct PrecomputeOptions {
  std::string bundle, images, cache;
  std::string out;  // `run`: the output folder whose checkpoint must belong to this cache (checked first)
  bool quiet = false;
  bool verify = true;
};

// Writes (or completes) the cache; returns its identity (sha256 of Python's json.dumps({"bundle": ...,
// "images": {...}}, sort_keys=True), as the index stores it). Throws InputError on bad input.
std::string precompute(const PrecomputeOptions& opt);

}  // namespace blockskip
