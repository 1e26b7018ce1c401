#include "adamw.h"

#include <cmath>
#include <stdexcept>

namespace blockskip {

void adamw_update(float* param, const float* grad, size_t n, AdamWState& st, const AdamWConfig& cfg) {
  if (st.exp_avg.empty() && st.exp_avg_sq.empty() && n) {
    st.exp_avg.assign(n, 0.0f);
    st.exp_avg_sq.assign(n, 0.0f);
  }
  if (st.exp_avg.size() != n || st.exp_avg_sq.size() != n)
    throw std::runtime_error("optimizer state does not match the parameter's size");
  st.step += 1.0f;
  const double t = static_cast<double>(st.step);
  const double bias_correction1 = 1.0 - std::pow(cfg.beta1, t);
  const double bias_correction2 = 1.0 - std::pow(cfg.beta2, t);
  const float decay = static_cast<float>(1.0 - cfg.lr * cfg.weight_decay);
  const float w1 = static_cast<float>(1.0 - cfg.beta1);
  const float b2 = static_cast<float>(cfg.beta2);
  const float w2 = static_cast<float>(1.0 - cfg.beta2);
  const float neg_step_size = static_cast<float>(-(cfg.lr / bias_correction1));
  const float bc2_sqrt = static_cast<float>(std::sqrt(bias_correction2));
  const float eps = static_cast<float>(cfg.eps);
  const bool decays = cfg.weight_decay != 0.0;
  const bool small_weight = std::fabs(w1) < 0.5f;
  float* m = st.exp_avg.data();
  float* v = st.exp_avg_sq.data();
  for (size_t i = 0; i < n; ++i) {
    const float g = grad[i];
    float p = param[i];
    if (decays) p = p * decay;
    const float mi = m[i];
    // torch's lerp(m, g, w): m + w * (g - m) for w < 0.5, else g - (1 - w) * (g - m), fused
    m[i] = small_weight ? std::fma(w1, g - mi, mi) : std::fma(w1 - 1.0f, g - mi, g);
    v[i] = std::fma(w2 * g, g, v[i] * b2);  // torch's addcmul_ (its vector kernel is fused)
    const float denom = std::sqrt(v[i]) / bc2_sqrt + eps;
    param[i] = p + neg_step_size * m[i] / denom;
  }
}

}  // namespace blockskip
