// adamw.h: steps on a small vector against AdamW computed here from its formulas (decoupled weight
// decay, bias-corrected moments) in double precision, and against runtime/adamw.py's float32 arithmetic
// operation by operation. Compiled with -ffp-contract=off, as adamw.cpp is.
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "../adamw.h"
#include "check.h"

using blockskip::AdamWConfig;
using blockskip::AdamWState;
using blockskip::adamw_update;

namespace {

// AdamW (Loshchilov & Hutter) as torch.optim.AdamW defines it, in double precision:
//   p <- p (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
//   p <- p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
struct Reference {
  std::vector<double> p, m, v;
  int t = 0;
  void step(const std::vector<float>& g, const AdamWConfig& c) {
    ++t;
    for (size_t i = 0; i < p.size(); ++i) {
      p[i] *= 1.0 - c.lr * c.weight_decay;
      m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * g[i];
      v[i] = c.beta2 * v[i] + (1.0 - c.beta2) * double(g[i]) * g[i];
      const double m_hat = m[i] / (1.0 - std::pow(c.beta1, t));
      const double v_hat = v[i] / (1.0 - std::pow(c.beta2, t));
      p[i] -= c.lr * m_hat / (std::sqrt(v_hat) + c.eps);
    }
  }
};

// runtime/adamw.py: hyper-parameter expressions in float64 applied as float32 scalars, the fused
// multiply-adds computed in float64 and rounded once to float32, everything else in float32.
struct Float32Mirror {
  std::vector<float> p, m, v;
  float step_count = 0.0f;
  static float fma64(float a, float b, float c) { return float(double(a) * double(b) + double(c)); }
  void step(const std::vector<float>& g, const AdamWConfig& c) {
    step_count += 1.0f;
    const double t = step_count;
    const double bc1 = 1.0 - std::pow(c.beta1, t), bc2 = 1.0 - std::pow(c.beta2, t);
    const float w1 = float(1.0 - c.beta1), b2 = float(c.beta2), w2 = float(1.0 - c.beta2);
    for (size_t i = 0; i < p.size(); ++i) {
      if (c.weight_decay != 0.0) p[i] = p[i] * float(1.0 - c.lr * c.weight_decay);
      const float d = g[i] - m[i];
      m[i] = std::fabs(w1) < 0.5f ? fma64(w1, d, m[i]) : fma64(w1 - 1.0f, d, g[i]);
      v[i] = fma64(w2 * g[i], g[i], v[i] * b2);
      const float denom = std::sqrt(v[i]) / float(std::sqrt(bc2)) + float(c.eps);
      p[i] = p[i] + float(-(c.lr / bc1)) * m[i] / denom;
    }
  }
};

const std::vector<float> kInit = {0.5f, -1.25f, 2.0f, 0.0f, 1e-3f, -0.75f, 3.5f};

// gradient of step s (0-based): different magnitudes and signs per value and per step
std::vector<float> gradient(int s) {
  std::vector<float> g(kInit.size());
  for (size_t i = 0; i < g.size(); ++i)
    g[i] = float(std::sin(0.7 * double(i + 1) + 1.3 * s) * std::pow(10.0, double(int(i % 4)) - 2.0));
  return g;
}

// `steps` updates from kInit with `cfg`, checked after each step against both references.
void run_against_references(const AdamWConfig& cfg, int steps) {
  std::vector<float> p = kInit;
  AdamWState st;
  Reference ref{std::vector<double>(kInit.begin(), kInit.end()), std::vector<double>(kInit.size()),
                std::vector<double>(kInit.size())};
  Float32Mirror mirror{kInit, std::vector<float>(kInit.size()), std::vector<float>(kInit.size())};
  std::vector<double> g_scale(kInit.size(), 0.0);
  for (int s = 0; s < steps; ++s) {
    const std::vector<float> g = gradient(s);
    adamw_update(p.data(), g.data(), p.size(), st, cfg);
    ref.step(g, cfg);
    mirror.step(g, cfg);
    CHECK_EQ(st.step, float(s + 1));
    CHECK_EQ(st.exp_avg.size(), p.size());
    CHECK_EQ(st.exp_avg_sq.size(), p.size());
    // relative 1e-6, taken of at least the scale of each quantity: a weight of lr (a step's size), a
    // moment of the largest |g| (or g^2) it has averaged (one crossing zero has float32's absolute error)
    for (size_t i = 0; i < p.size(); ++i) {
      g_scale[i] = std::fmax(g_scale[i], std::fabs(double(g[i])));
      CHECK_NEAR(double(p[i]), ref.p[i], 1e-6, cfg.lr);
      CHECK_NEAR(double(st.exp_avg[i]), ref.m[i], 1e-6, g_scale[i]);
      CHECK_NEAR(double(st.exp_avg_sq[i]), ref.v[i], 1e-6, g_scale[i] * g_scale[i]);
      // the Python reference agrees to the last bit but for rare double roundings
      CHECK(bstest::ulp_distance(st.exp_avg[i], mirror.m[i]) <= 1);
      CHECK(bstest::ulp_distance(st.exp_avg_sq[i], mirror.v[i]) <= 1);
      CHECK(bstest::ulp_distance(p[i], mirror.p[i]) <= 2);
    }
  }
}

}  // namespace

TEST_CASE(adamw, matches_the_formulas_with_the_runners_settings) {
  // the streamed span's optimizer (stream.cpp): betas (0.9, 0.999), eps 1e-8; lr and weight decay as
  // the native tests' plans have them
  run_against_references(AdamWConfig{3e-3, 0.9, 0.999, 1e-8, 0.05}, 6);
}

TEST_CASE(adamw, matches_the_formulas_with_the_defaults) {
  run_against_references(AdamWConfig{}, 5);
}

TEST_CASE(adamw, matches_the_formulas_without_weight_decay) {
  run_against_references(AdamWConfig{1e-2, 0.9, 0.999, 1e-8, 0.0}, 5);
}

TEST_CASE(adamw, matches_the_formulas_with_a_small_beta1) {
  // 1 - beta1 >= 0.5 takes torch's other lerp form
  run_against_references(AdamWConfig{1e-3, 0.3, 0.99, 1e-6, 0.1}, 5);
}

TEST_CASE(adamw, weight_decay_is_decoupled) {
  // with a zero gradient the moments stay zero and the step only decays the weights (an L2 penalty
  // added to the gradient would move them by about lr each)
  const AdamWConfig cfg{1e-2, 0.9, 0.999, 1e-8, 0.1};
  std::vector<float> p = {1.0f, -2.0f, 0.25f};
  const std::vector<float> before = p;
  const std::vector<float> zero(3, 0.0f);
  AdamWState st;
  adamw_update(p.data(), zero.data(), p.size(), st, cfg);
  const float decay = float(1.0 - cfg.lr * cfg.weight_decay);
  for (size_t i = 0; i < p.size(); ++i) {
    CHECK_EQ(p[i], before[i] * decay);
    CHECK_EQ(st.exp_avg[i], 0.0f);
    CHECK_EQ(st.exp_avg_sq[i], 0.0f);
  }
}

TEST_CASE(adamw, first_step_moves_each_weight_by_lr) {
  // bias correction: after one step m_hat = g and v_hat = g^2, so each weight moves by lr * g / (|g| + eps)
  const AdamWConfig cfg{1e-3, 0.9, 0.999, 1e-8, 0.0};
  std::vector<float> p = {0.0f, 1.0f, -1.0f, 5.0f};
  const std::vector<float> before = p;
  const std::vector<float> g = {3.0f, -0.02f, 100.0f, -1e-3f};
  AdamWState st;
  adamw_update(p.data(), g.data(), p.size(), st, cfg);
  for (size_t i = 0; i < p.size(); ++i) {
    const double want = before[i] - cfg.lr * g[i] / (std::fabs(double(g[i])) + cfg.eps);
    CHECK_NEAR(double(p[i]), want, 1e-6, 1e-3);
  }
}

TEST_CASE(adamw, state_carries_across_calls_and_is_checked) {
  const AdamWConfig cfg;
  std::vector<float> p(3, 1.0f);
  const std::vector<float> g(4, 0.5f);
  AdamWState st;
  adamw_update(p.data(), g.data(), 3, st, cfg);
  CHECK_EQ(st.step, 1.0f);
  CHECK_EQ(st.exp_avg.size(), size_t(3));
  // the state of a 3-value parameter refuses a 4-value one, and the failed call leaves it as it was
  std::vector<float> q(4, 1.0f);
  CHECK_THROWS(adamw_update(q.data(), g.data(), 4, st, cfg), std::runtime_error,
               "optimizer state does not match the parameter's size");
  CHECK_EQ(st.step, 1.0f);
  CHECK(q == std::vector<float>(4, 1.0f));
  // a state restored from a checkpoint (step 10) continues with step 11's bias correction
  AdamWState restored;
  restored.exp_avg = {0.1f};
  restored.exp_avg_sq = {0.01f};
  restored.step = 10.0f;
  float w = 2.0f;
  const float gw = 0.2f;
  adamw_update(&w, &gw, 1, restored, cfg);
  CHECK_EQ(restored.step, 11.0f);
  const double m = 0.9 * double(0.1f) + 0.1 * 0.2;
  const double v = 0.999 * double(0.01f) + 0.001 * 0.04;
  const double want = 2.0 * (1.0 - cfg.lr * cfg.weight_decay) -
                      cfg.lr * (m / (1.0 - std::pow(0.9, 11))) / (std::sqrt(v / (1.0 - std::pow(0.999, 11))) + cfg.eps);
  CHECK_NEAR(double(w), want, 1e-6, 1e-6);
  CHECK_NEAR(double(restored.exp_avg[0]), m, 1e-6, 0.0);
  CHECK_NEAR(double(restored.exp_avg_sq[0]), v, 1e-6, 0.0);
}
