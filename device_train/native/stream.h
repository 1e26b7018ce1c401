// The block-streamed span (plan.span == "streamed"): runtime/stream.py's StreamedSpan over the
// bundle's per-block-shape ExecuTorch programs, in the same order.
//
// Per micro-step: a forward sweep over the trained blocks that stashes each block's input and runs its
// shape's forward program (frozen weights streamed from the block's file, the block's LoRA), adding a
// skipped span's precomputed residual (`delta.<i+1>.<k>`) after block i; the head program gives the
// loss times 1/grad_accum and its gradient at the hidden state; a backward sweep, last block first,
// runs each block's VJP program on its stashed input and returns the gradient at its input and the
// LoRA gradients (summed over the micro-steps). AdamW on the LoRA runs in the driver.
#pragma once

#include <memory>
#include <string>

#include "bundle.h"
#include "trainer.h"

namespace blockskip {

// `out_dir`: the stash spills into OUT/stash when the plan says stash "disk".
std::unique_ptr<Trainer> make_streamed_trainer(const Bundle& b, const std::string& out_dir);

}  // namespace blockskip
