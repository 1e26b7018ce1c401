// Frozen block weights for the streamed span (runtime/stream.py WeightSource) and the boundary stash
// between its forward and backward sweep (runtime/stream.py Stash).
#pragma once

#include <atomic>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common.h"
#include "programs.h"
#include "safetensors.h"

namespace blockskip {

// One block's (or the head's) stored tensors, in their storage dtype, fed as `w.<rel>`.
struct BlockWeights {
  SafetensorsFile file;
  Feed feed;                                    // "w.<rel>" -> bytes in `file` (or in `copies`)
  std::vector<std::unique_ptr<uint8_t[]>> copies;  // tensors whose bytes were not aligned in the file
};

// Reads `path`; tensors named `<prefix>.<rel>` (all tensors when `prefix` is empty) become `w.<rel>`.
std::shared_ptr<BlockWeights> read_weights(const std::string& path, const std::string& prefix);

// `streamed`: one block's file in memory at a time, the next one in the access order read on a second
// thread while the current block runs (`prefetch`), so at most two files are resident; the current one
// is reused when the next block asked for is the same. `resident`: each block is read once and kept.
class WeightSource {
 public:
  WeightSource(std::function<std::shared_ptr<BlockWeights>(int)> read, bool resident, bool prefetch);
  ~WeightSource();
  // The blocks the next calls of get() will ask for, in order (for prefetching).
  void plan(std::vector<int> order);
  // Block i's weights, valid until the next get() / close().
  const BlockWeights& get(int i);
  long long reads() const { return reads_; }
  void close();

 private:
  std::shared_ptr<BlockWeights> read(int i);
  std::function<std::shared_ptr<BlockWeights>(int)> read_;
  bool resident_, prefetch_;
  std::map<int, std::shared_ptr<BlockWeights>> kept_;
  int current_i_ = -1, pending_i_ = -1;
  std::shared_ptr<BlockWeights> current_;
  std::future<std::shared_ptr<BlockWeights>> pending_;
  std::vector<int> order_;
  size_t pos_ = 0;
  std::atomic<long long> reads_{0};
};

// The trained blocks' inputs between the sweeps: kept in memory, or (with a folder) written to
// `<folder>/<k>.<name>.f32` and read back and deleted by pop(). The folder goes with the stash.
class Stash {
 public:
  explicit Stash(std::string folder);
  ~Stash();
  Stash(const Stash&) = delete;
  Stash& operator=(const Stash&) = delete;
  // Removes the stash-* folders a killed run left in `dir`.
  static void remove_stale(const std::string& dir);
  void put(size_t k, std::shared_ptr<const FTensors> state);
  std::shared_ptr<const FTensors> pop(size_t k);

 private:
  std::string path(size_t k, const std::string& name) const;
  std::string folder_;
  std::map<size_t, std::shared_ptr<const FTensors>> mem_;
  std::map<size_t, std::vector<std::pair<std::string, std::vector<int64_t>>>> names_;
};

}  // namespace blockskip
