// AdamW with decoupled weight decay, in the arithmetic of PyTorch's single-tensor AdamW on CPU
// float32 tensors (torch.optim.AdamW(..., foreach=False)), so a run here follows the Python
// backends' runs. Per step t (1-based), every hyper-parameter expression in double precision and
// applied as a float32 scalar:
//   p  *= 1 - lr * wd
//   m  += (1 - b1) * (g - m)                     (torch's lerp, a fused multiply-add)
//   v   = v * b2 + (1 - b2) * g * g              (torch's addcmul, the last add fused)
//   p  += -(lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
// Measured against torch 2.13 on x86: moments bit-identical; the weights differ in the last bit for
// a few percent of the values because torch's vectorized sqrt there is not correctly rounded.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace blockskip {

struct AdamWConfig {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;
};

// One parameter's optimizer state. `step` counts the updates applied (PyTorch keeps it as a
// float32 tensor; checkpoints store it that way).
struct AdamWState {
  std::vector<float> exp_avg;
  std::vector<float> exp_avg_sq;
  float step = 0.0f;
};

// One update of `n` values of `param` with gradient `grad`; allocates the state on first use.
void adamw_update(float* param, const float* grad, size_t n, AdamWState& state, const AdamWConfig& cfg);

}  // namespace blockskip
