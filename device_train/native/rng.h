// The shared random-number definition (splitmix64-v1) and the patch schedule built from it, as
// runtime/rng.py and runtime/schedule.py compute them (specified in docs/formats.md), so a cache the
// native runner makes is the Python runtime's cache.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "json.h"

namespace blockskip {
namespace rng {

constexpr uint64_t kScheduleStream = 1;
constexpr uint64_t kNoiseStream = 2;

uint64_t mix(uint64_t z);
uint64_t key(uint64_t seed, uint64_t stream);
uint64_t word(uint64_t key, uint64_t i);
uint64_t below(uint64_t w, uint64_t n);  // in [0, n), 1 <= n <= 2^32
std::vector<float> normals(uint64_t seed, size_t n);

}  // namespace rng

struct ScheduleEntry {
  int64_t index = 0, image = 0, t = 0, side = 0, top = 0, left = 0, noise_seed = 0;
  double sigma = 0.0;
};

// The manifest's `schedule` section for `num_images` photos (InputError for a bad section).
std::vector<ScheduleEntry> build_schedule(const json::Value& schedule, int64_t num_images);

// The schedule as runtime.schedule.PatchSchedule.to_json() writes it.
json::Value schedule_json(const json::Value& schedule, int64_t num_images, const std::vector<ScheduleEntry>& entries);

}  // namespace blockskip
