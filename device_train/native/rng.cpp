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

std::vector<ScheduleEntry> build_schedule(const json::Value& s, int64_t num_images) {
  const std::string gen = s.find("rng") ? s.at("rng").as_string("schedule.rng") : "splitmix64-v1";
  if (gen != "splitmix64-v1")
    throw InputError("the bundle's schedule uses the generator '" + gen + "', not this runner's (splitmix64-v1); "
                     "export the bundle again");
  const int64_t K = s.at("num_samples").as_int("schedule.num_samples");
  const int64_t s_min = s.at("s_min").as_int("schedule.s_min"), s_max = s.at("s_max").as_int("schedule.s_max");
  const int64_t g = s.at("granularity").as_int("schedule.granularity");
  const uint64_t seed = uint64_t(s.at("seed").as_int("schedule.seed"));
  const bool patch = s.find("patch_sampling") ? s.at("patch_sampling").as_bool("schedule.patch_sampling") : true;
  const double shift = s.find("shift") ? s.at("shift").as_double("schedule.shift") : 1.0;
  const int64_t T = s.find("T") ? s.at("T").as_int("schedule.T") : 1000;
  if (num_images < 1) throw InputError("the schedule needs at least one image");
  if (!(0 < s_min && s_min <= s_max) || g < 1 || s_min % g || s_max % g || K < 0 || T < 1 || T > (int64_t(1) << 32))
    throw InputError("the bundle's schedule section is invalid; export the bundle again");
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
  Value meta = Value::object();
  meta.set("num_images", Value::integer(num_images));
  for (const char* k : {"s_min", "s_max", "granularity", "seed"}) meta.set(k, Value::integer(s.at(k).as_int(k)));
  meta.set("patch_sampling", Value::boolean(s.find("patch_sampling") ? s.at("patch_sampling").as_bool("patch_sampling")
                                                                     : true));
  meta.set("shift", Value::number(s.find("shift") ? s.at("shift").as_double("shift") : 1.0));
  meta.set("T", Value::integer(s.find("T") ? s.at("T").as_int("T") : 1000));
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
