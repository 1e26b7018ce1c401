// SHA-256 (FIPS 180-4), for checking bundle files and cache shards against their recorded digests
// and for the cache's identity digest.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace blockskip {

class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t n);
  std::string hexdigest();  // finishes the hash; call once

 private:
  void block(const uint8_t* p);
  uint32_t h_[8];
  uint8_t buf_[64];
  size_t buf_len_ = 0;
  uint64_t total_ = 0;
};

std::string sha256_hex(const void* data, size_t n);
std::string sha256_hex(const std::string& s);
std::string sha256_file(const std::string& path);  // throws std::runtime_error if unreadable

}  // namespace blockskip
