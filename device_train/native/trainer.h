// What the training loop (driver.cpp) needs of whatever computes a step: the resident training
// program (resident.cpp) or the block-streamed span (stream.cpp). runtime/contract.py's Trainer.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "adamw.h"
#include "bundle.h"
#include "json.h"

namespace blockskip {

struct Param {
  std::string name;          // peft name
  float* data = nullptr;     // the values the trainer computes with, updated in place
  size_t numel = 0;
  std::vector<int64_t> shape;
  std::vector<float> grad;   // summed over the micro-steps
  AdamWState state;
};

class Trainer {
 public:
  virtual ~Trainer() = default;
  // Refuses an entry the trainer cannot take (missing tensors, wrong shapes): runs on the prefetch thread.
  virtual void check_entry(const Entry& e) const = 0;
  // Forward and backward of one entry with the loss times `scale`; the gradients are assigned on the
  // first micro-step after an update and added after that. Returns the unscaled loss.
  virtual double loss_and_grad(const Entry& e, double scale) = 0;
  // The entry's loss with the current LoRA; the gradients are not touched.
  virtual double eval_loss(const Entry& e) = 0;
  virtual std::vector<Param>& params() = 0;
  virtual const AdamWConfig& adamw() const = 0;
  // One AdamW step on every parameter with the summed gradients.
  void update() {
    for (auto& p : params()) adamw_update(p.data, p.grad.data(), p.numel, p.state, adamw());
    fresh_grads_ = true;
  }
  // Fields the run adds to train_log.json.
  virtual void info(json::Value& log) const = 0;

 protected:
  bool fresh_grads_ = true;  // the next micro-step assigns the gradients
};

}  // namespace blockskip
