// safetensors files: an 8-byte little-endian header length, a JSON header mapping each tensor name
// to {"dtype", "shape", "data_offsets": [begin, end]} (offsets into the data that follows) plus an
// optional "__metadata__" object of strings, then the raw little-endian tensor data.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "json.h"

namespace blockskip {

struct SafetensorsError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Bytes per element of a safetensors dtype ("F32", "BF16", ...); 0 if unknown.
size_t dtype_size(const std::string& dtype);

struct TensorInfo {
  std::string dtype;
  std::vector<int64_t> shape;
  size_t begin = 0;  // offsets into the data section
  size_t end = 0;
  size_t numel() const;
};

// A whole safetensors file read into memory and validated.
class SafetensorsFile {
 public:
  static SafetensorsFile read(const std::string& path);

  const std::string& path() const { return path_; }
  const std::vector<uint8_t>& bytes() const { return bytes_; }  // the whole file
  bool has(const std::string& name) const { return tensors_.count(name) != 0; }
  const TensorInfo& info(const std::string& name) const;  // throws naming the file and tensor
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  const std::vector<std::pair<std::string, std::string>>& metadata() const { return metadata_; }
  const std::string* meta(const std::string& key) const;  // nullptr if absent
  // The header as read (tensor entries and __metadata__), for checking it against its schema.
  const json::Value& header() const { return header_; }
  // The first floating tensor (in name order) holding a NaN or an Inf, "" when none (every value of
  // F32, F16, BF16 and F64 tensors looked at).
  std::string first_nonfinite() const;
  // sha256 of the canonical file (safetensors_bytes) that the same tensors and the metadata without
  // `drop_key` make: the integrity record a checkpoint carries in its metadata (formats::kMetaSha256).
  std::string canonical_sha256(const std::string& drop_key) const;

  // A float32 tensor's values (copied, so alignment never matters); throws if not F32.
  std::vector<float> floats(const std::string& name) const;
  void copy_floats(const std::string& name, float* dst, size_t n) const;
  // A floating tensor's values as float32: F32 copied, F16 and BF16 widened (exactly); throws for
  // other dtypes.
  std::vector<float> to_floats(const std::string& name) const;
  // The tensor's raw little-endian bytes as stored (any dtype: F32, F16, BF16, I8, U8, ...), inside
  // this file's buffer (info(name) gives dtype, shape and size).
  const uint8_t* raw(const std::string& name) const;

 private:
  std::string path_;
  std::vector<uint8_t> bytes_;
  size_t data_start_ = 0;
  std::map<std::string, TensorInfo> tensors_;
  std::vector<std::pair<std::string, std::string>> metadata_;
  json::Value header_;
};

struct TensorOut {
  std::string name;
  std::vector<int64_t> shape;
  const float* data = nullptr;  // float32, numel(shape) values
};

// The serialized file (header + data) for float32 tensors, in name order, with the canonical header
// (runtime/formats.py: keys sorted, no spaces, ASCII, padded to 8 bytes; no __metadata__ when empty):
// the same tensors and metadata give the bytes runtime/tensorfile.py's write_tensors gives.
std::string safetensors_bytes(std::vector<TensorOut> tensors,
                              const std::vector<std::pair<std::string, std::string>>& metadata);

// Write `size` bytes to `path` atomically: a temporary file in the same folder (.NAME.XXXXXX.tmp, which
// the next run removes when it takes the folder's lock), fsync, rename over `path`, fsync the folder. A
// crash leaves the old file or the new one, never a torn one.
void atomic_write(const std::string& path, const void* data, size_t size);
inline void atomic_write(const std::string& path, const std::string& data) {
  atomic_write(path, data.data(), data.size());
}

void write_safetensors(const std::string& path, std::vector<TensorOut> tensors,
                       const std::vector<std::pair<std::string, std::string>>& metadata);

// The canonical header text for `header` (tensor entries and an optional __metadata__ object; an empty
// __metadata__ is left out): sorted keys, no spaces, ASCII, padded with spaces to a multiple of 8 bytes.
std::string canonical_header(json::Value header);

}  // namespace blockskip
