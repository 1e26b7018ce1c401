// The training run around the steps (runtime/driver.py and runtime/train_loop.py): the cache and
// bundle checks, the memory check, refusing checkpoints of other runs and other backends, resume, the
// entry order with prefetch, gradient accumulation, the numerics checks, the checkpoint, the LoRA
// file and train_log.json. What computes a step is a Trainer (resident or streamed span).
#pragma once

#include <string>

namespace blockskip {

struct Options {
  std::string bundle, cache, out;
  long long stop_after = -1;
  bool quiet = false;
  bool verify = true;
};

// Exit status 0; throws InputError / std::exception on bad input or a failed run.
int train(const Options& opt);

}  // namespace blockskip
