// The resident span: the bundle's joint forward-backward ExecuTorch training program
// (pte/train/span.pte, the LoRA as external mutable weights in span.ptd).
#pragma once

#include <memory>

#include "bundle.h"
#include "trainer.h"

namespace blockskip {

std::unique_ptr<Trainer> make_resident_trainer(const Bundle& b);

}  // namespace blockskip
