// sha256.h: FIPS 180-4 test vectors, every padding boundary, and incremental updates split anywhere.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "../sha256.h"
#include "check.h"

using blockskip::Sha256;
using blockskip::sha256_hex;

namespace {

const char* const kEmpty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
const char* const kAbc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
const char* const k448 = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
const char* const k448Digest = "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1";
const char* const k896 =
    "abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmnopqrst"
    "nopqrstu";
const char* const k896Digest = "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1";
const char* const kMillionA = "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0";

// The digest of `data` fed to one hasher in pieces of the given sizes (cycled until the data is used up).
std::string in_pieces(const std::string& data, const std::vector<size_t>& sizes) {
  Sha256 h;
  size_t at = 0;
  for (size_t k = 0; at < data.size(); ++k) {
    const size_t n = std::min(sizes[k % sizes.size()], data.size() - at);
    h.update(data.data() + at, n);
    at += n;
  }
  return h.hexdigest();
}

}  // namespace

TEST_CASE(sha256, nist_vectors) {
  CHECK_EQ(sha256_hex(std::string()), std::string(kEmpty));
  CHECK_EQ(sha256_hex(nullptr, 0), std::string(kEmpty));
  CHECK_EQ(sha256_hex(std::string("abc")), std::string(kAbc));
  CHECK_EQ(sha256_hex(std::string(k448)), std::string(k448Digest));
  CHECK_EQ(sha256_hex(std::string(k896)), std::string(k896Digest));
  CHECK_EQ(sha256_hex(std::string(1000000, 'a')), std::string(kMillionA));
}

TEST_CASE(sha256, padding_boundaries) {
  // messages of 'a' around the lengths where the padding and length need one or two more blocks
  // (digests from Python's hashlib)
  const struct {
    size_t n;
    const char* hex;
  } cases[] = {
      {55, "9f4390f8d30c2dd92ec9f095b65e2b9ae9b0a925a5258e241c9f1e910f734318"},
      {56, "b35439a4ac6f0948b6d6f9e3c6af0f5f590ce20f1bde7090ef7970686ec6738a"},
      {57, "f13b2d724659eb3bf47f2dd6af1accc87b81f09f59f2b75e5c0bed6589dfe8c6"},
      {63, "7d3e74a05d7db15bce4ad9ec0658ea98e3f06eeecf16b4c6fff2da457ddc2f34"},
      {64, "ffe054fe7ae0cb6dc65c3af9b61d5209f439851db43d0ba5997337df154668eb"},
      {65, "635361c48bb9eab14198e76ea8ab7f1a41685d6ad62aa9146d301d4f17eb0ae0"},
      {119, "31eba51c313a5c08226adf18d4a359cfdfd8d2e816b13f4af952f7ea6584dcfb"},
      {120, "2f3d335432c70b580af0e8e1b3674a7c020d683aa5f73aaaedfdc55af904c21c"},
      {128, "6836cf13bac400e9105071cd6af47084dfacad4e5e302c94bfed24e013afb73e"},
  };
  for (const auto& c : cases) {
    CHECK_EQ(sha256_hex(std::string(c.n, 'a')), std::string(c.hex));
    CHECK_EQ(in_pieces(std::string(c.n, 'a'), {1}), std::string(c.hex));
  }
}

TEST_CASE(sha256, incremental_updates_split_anywhere) {
  // every byte value (bytes 0..255, five times): the digest from Python's hashlib
  std::string pattern;
  for (int r = 0; r < 5; ++r)
    for (int b = 0; b < 256; ++b) pattern += char(b);
  const std::string want = "d414b085826eb06778483ba35564dc849e643359f69ed9747878ba6e54985bed";
  CHECK_EQ(sha256_hex(pattern), want);
  const std::vector<std::vector<size_t>> splits = {
      {1}, {3}, {7, 0, 13}, {63}, {64}, {65}, {55, 9}, {127, 1, 129}, {0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89}};
  for (const auto& s : splits) CHECK_EQ(in_pieces(pattern, s), want);
  // every split point of the two-block NIST message into two updates
  const std::string m(k896);
  for (size_t cut = 0; cut <= m.size(); ++cut) {
    Sha256 h;
    h.update(m.data(), cut);
    h.update(m.data() + cut, m.size() - cut);
    CHECK_EQ(h.hexdigest(), std::string(k896Digest));
  }
  // a million 'a' in odd pieces, across block boundaries
  CHECK_EQ(in_pieces(std::string(1000000, 'a'), {997, 1, 4093, 63}), std::string(kMillionA));
}

TEST_CASE(sha256, file) {
  char path[] = "/tmp/blockskip-sha256-XXXXXX";
  const int fd = mkstemp(path);
  CHECK(fd >= 0);
  if (fd < 0) return;
  FILE* f = fdopen(fd, "wb");
  const std::string data(1000000, 'a');
  CHECK_EQ(std::fwrite(data.data(), 1, data.size(), f), data.size());
  std::fclose(f);
  CHECK_EQ(blockskip::sha256_file(path), std::string(kMillionA));
  std::remove(path);
  CHECK_THROWS(blockskip::sha256_file(path), std::runtime_error, "cannot read");
}
