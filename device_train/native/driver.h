// The training run around the steps (runtime/driver.py and runtime/train_loop.py): the cache and
// bundle checks, the memory check, refusing checkpoints of other runs and other backends, resume, the
// entry order with prefetch, gradient accumulation, the numerics checks, the checkpoint, the LoRA
// file and train_log.json. What computes a step is a Trainer (resident or streamed span).
#pragma once

#include <string>

namespace blockskip {

struct Options {
  std::string bundle, cache, out;
  std::string images;  // run / precompute: the photo folder
  std::string events;  // --events FILE ("-": stdout); empty: none
  std::string lora_format = "diffusers";  // --lora-format: diffusers, kohya, comfy or all (lora.safetensors always)
  long long stop_after = -1;
  bool quiet = false;
  bool verify = true;
};

// Refuses (InputError) when OUT/checkpoint holds a checkpoint of another backend or of a run on another
// cache (`source_sha256`: the cache's identity), before anything is written.
void check_checkpoint_source(const std::string& out, const std::string& source_sha256);

class SafetensorsFile;

// What a checkpoint passes before anything is resumed from it (runtime/checkpoint.py): its header against
// the declared format (the log in its metadata too), its integrity record (metadata formats::kMetaSha256:
// sha256 of the canonical file the same tensors and the other metadata make) and every value finite.
// FormatError naming `path` and ending with `advice` otherwise.
void check_checkpoint_file(const SafetensorsFile& f, const std::string& path, const std::string& advice);

// Exit status 0; throws InputError / std::exception on bad input or a failed run.
int train(const Options& opt);

}  // namespace blockskip
