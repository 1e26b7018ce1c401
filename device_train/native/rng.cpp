#include "rng.h"

#include <algorithm>
#include <cmath>

#include "common.h"

namespace blockskip {
namespace rng {

constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ULL;

uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

uint64_t key(uint64_t seed, uint64_t stream) { return mix(mix(seed) ^ stream); }

uint64_t word(uint64_t key, uint64_t i) { return mix(key + (i + 1) * kGamma); }

uint64_t below(uint64_t w, uint64_t n) { return ((w >> 32) * n) >> 32; }

std::vector<float> normals(uint64_t seed, size_t n) {
  const uint64_t k = key(seed, kNoiseStream);
  const double two_pi = 2.0 * 3.14159265358979311600;  // 2 * float64(pi), as numpy's np.pi
  std::vector<float> out(n);
  for (size_t j = 0; 2 * j < n; ++j) {
    const double u1 = double((word(k, 2 * j) >> 11) + 1) * 0x1p-53;
    const double u2 = double(word(k, 2 * j + 1) >> 11) * 0x1p-53;
    const double r = std::sqrt(-2.0 * std::log(u1));
    const double a = two_pi * u2;
    out[2 * j] = float(r * std::cos(a));
    if (2 * j + 1 < n) out[2 * j + 1] = float(r * std::sin(a));
  }
  return out;
}

}  // namespace rng

namespace {

// Python's float floor division (float_floor_div: fmod, then the quotient rounded as CPython does).
double py_floordiv(double vx, double wx) {
  double mod = std::fmod(vx, wx);
  double div = (vx - mod) / wx;
  if (mod != 0.0 && ((wx < 0) != (mod < 0))) div -= 1.0;
  double floordiv;
  if (div != 0.0) {
    floordiv = std::floor(div);
    if (div - floordiv > 0.5) floordiv += 1.0;
  } else {
    floordiv = std::copysign(0.0, vx / wx);
  }
  return floordiv;
}

int64_t crop_side(int64_t t, int64_t T, int64_t s_min, int64_t s_max, int64_t g) {
  const double s = double(s_min) + (double(t) / double(T)) * double(s_max - s_min);
  return std::max(s_min, int64_t(py_floordiv(s, double(g))) * g);
}

double shift_sigma(double u, double shift) { return std::min(1.0, shift * u / (1.0 + (shift - 1.0) * u)); }

}  // namespace

namespace {

// The manifest's schedule section, its defaults applied once (those of PatchSchedule.build).
struct ScheduleParams {
  int64_t K = 0, s_min = 0, s_max = 0, g = 1, T = 1000;
  uint64_t seed = 0;
  bool patch = true;
  double shift = 1.0;
};

ScheduleParams schedule_params(const json::Value& s) {
  const std::string gen = s.find("rng") ? s.at("rng").as_string("schedule.rng") : "splitmix64-v1";
  if (gen != "splitmix64-v1")
    throw InputError("the bundle's schedule uses the generator '" + gen + "', not this runner's (splitmix64-v1); "
                     "export the bundle again");
  ScheduleParams p;
  p.K = s.at("num_samples").as_int("schedule.num_samples");
  p.s_min = s.at("s_min").as_int("schedule.s_min");
  p.s_max = s.at("s_max").as_int("schedule.s_max");
  p.g = s.at("granularity").as_int("schedule.granularity");
  p.seed = uint64_t(s.at("seed").as_int("schedule.seed"));
  if (s.find("patch_sampling")) p.patch = s.at("patch_sampling").as_bool("schedule.patch_sampling");
  if (s.find("shift")) p.shift = s.at("shift").as_double("schedule.shift");
  if (s.find("T")) p.T = s.at("T").as_int("schedule.T");
  if (!(0 < p.s_min && p.s_min <= p.s_max) || p.g < 1 || p.s_min % p.g || p.s_max % p.g || p.K < 0 || p.T < 1 ||
      p.T > (int64_t(1) << 32))
    throw InputError("the bundle's schedule section is invalid; export the bundle again");
  return p;
}

}  // namespace

std::vector<ScheduleEntry> build_schedule(const json::Value& s, int64_t num_images) {
  const ScheduleParams p = schedule_params(s);
  const int64_t K = p.K, s_min = p.s_min, s_max = p.s_max, g = p.g, T = p.T;
  const uint64_t seed = p.seed;
  const bool patch = p.patch;
  const double shift = p.shift;
  if (num_images < 1) throw InputError("the schedule needs at least one image");
  const uint64_t k_sched = rng::key(seed, rng::kScheduleStream);
  std::vector<ScheduleEntry> out;
  out.reserve(size_t(K));
  for (int64_t k = 0; k < K; ++k) {
    uint64_t w[5];
    for (uint64_t j = 0; j < 5; ++j) w[j] = rng::word(k_sched, 5 * uint64_t(k) + j);
    ScheduleEntry e;
    e.index = k;
    e.image = k < num_images ? k : int64_t(rng::below(w[0], uint64_t(num_images)));
    e.t = 1 + int64_t(rng::below(w[1], uint64_t(T)));
    e.side = patch ? crop_side(e.t, T, s_min, s_max, g) : s_max;
    const int64_t slots = (s_max - e.side) / g + 1;
    e.top = int64_t(rng::below(w[2], uint64_t(slots))) * g;
    e.left = int64_t(rng::below(w[3], uint64_t(slots))) * g;
    e.noise_seed = int64_t(w[4] >> 33);
    e.sigma = shift_sigma(double(e.t) / double(T), shift);
    out.push_back(e);
  }
  return out;
}

json::Value schedule_json(const json::Value& s, int64_t num_images, const std::vector<ScheduleEntry>& entries) {
  using json::Value;
  const ScheduleParams p = schedule_params(s);
  Value meta = Value::object();
  meta.set("num_images", Value::integer(num_images));
  meta.set("s_min", Value::integer(p.s_min));
  meta.set("s_max", Value::integer(p.s_max));
  meta.set("granularity", Value::integer(p.g));
  meta.set("seed", Value::integer(int64_t(p.seed)));
  meta.set("patch_sampling", Value::boolean(p.patch));
  meta.set("shift", Value::number(p.shift));
  meta.set("T", Value::integer(p.T));
  meta.set("resize", Value::string("area"));
  meta.set("rng", Value::string("splitmix64-v1"));
  Value list = Value::array();
  for (const auto& e : entries) {
    Value v = Value::object();
    v.set("index", Value::integer(e.index));
    v.set("image", Value::integer(e.image));
    v.set("t", Value::integer(e.t));
    v.set("sigma", Value::number(e.sigma));
    v.set("side", Value::integer(e.side));
    v.set("top", Value::integer(e.top));
    v.set("left", Value::integer(e.left));
    v.set("noise_seed", Value::integer(e.noise_seed));
    list.push_back(std::move(v));
  }
  Value out = Value::object();
  out.set("meta", std::move(meta));
  out.set("entries", std::move(list));
  return out;
}

}  // namespace blockskip
