// safetensors.h: a file written here byte by byte reads back (names, shapes, dtypes, offsets, values,
// metadata); the runner's own writer round-trips; malformed files are refused with SafetensorsError.
#include <stdlib.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "../safetensors.h"
#include "../sha256.h"
#include "check.h"

using blockskip::SafetensorsError;
using blockskip::SafetensorsFile;

namespace {

// A temporary folder removed (with the files written in it) at the end of the test binary.
struct TempDir {
  std::string path;
  std::vector<std::string> files;
  TempDir() {
    char tmpl[] = "/tmp/blockskip-safetensors-XXXXXX";
    const char* p = mkdtemp(tmpl);
    path = p ? p : "/tmp";
  }
  ~TempDir() {
    for (const auto& f : files) std::remove(f.c_str());
    rmdir(path.c_str());
  }
};

TempDir& tmp() {
  static TempDir d;
  return d;
}

std::string le64(uint64_t n) {
  std::string out;
  for (int i = 0; i < 8; ++i) out += char((n >> (8 * i)) & 0xFF);
  return out;
}

std::string f32_bytes(const std::vector<float>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
}

// Writes `bytes` to a new file in the temporary folder; returns its path.
std::string write_file(const std::string& name, const std::string& bytes) {
  const std::string path = tmp().path + "/" + name;
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f) {
    std::fwrite(bytes.data(), 1, bytes.size(), f);
    std::fclose(f);
  }
  tmp().files.push_back(path);
  return path;
}

// A safetensors file: the 8-byte header length, `header` and `data`.
std::string file_with(const std::string& name, const std::string& header, const std::string& data) {
  return write_file(name, le64(header.size()) + header + data);
}

// A file holding one tensor "t" whose header entry is `entry`, followed by `data_size` zero bytes.
std::string one_tensor(const std::string& name, const std::string& entry, size_t data_size) {
  return file_with(name, "{\"t\":" + entry + "}", std::string(data_size, '\0'));
}

}  // namespace

TEST_CASE(safetensors, reads_a_valid_file) {
  const std::vector<float> w = {1.0f, -2.5f, 3.25f, 0.0f, 1e-30f, -7.0f};
  // bfloat16 of 1.0, -2.0, 0.5, 3.0 (the top halves of the float32 bits)
  const std::string bf16("\x80\x3f\x00\xc0\x00\x3f\x40\x40", 8);
  const std::string i8("\x01\xff\x7f", 3);
  const std::string data = f32_bytes(w) + bf16 + i8;
  // entries in no particular order, with spaces, and metadata
  const std::string header =
      R"({"i": {"dtype": "I8", "shape": [3], "data_offsets": [32, 35]},)"
      R"( "__metadata__": {"format": "pt", "note": "x"},)"
      R"( "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},)"
      R"( "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},)"
      R"( "s": {"dtype": "F32", "shape": [0, 5], "data_offsets": [35, 35]}})";
  const std::string path = file_with("valid.safetensors", header, data);
  const SafetensorsFile st = SafetensorsFile::read(path);
  CHECK_EQ(st.path(), path);
  CHECK_EQ(st.bytes().size(), 8 + header.size() + data.size());
  CHECK_EQ(st.tensors().size(), size_t(4));
  CHECK(st.has("w") && st.has("b") && st.has("i") && st.has("s"));
  CHECK(!st.has("__metadata__"));
  CHECK(!st.has("x"));

  const auto& tw = st.info("w");
  CHECK_EQ(tw.dtype, std::string("F32"));
  CHECK(tw.shape == (std::vector<int64_t>{2, 3}));
  CHECK_EQ(tw.begin, size_t(0));
  CHECK_EQ(tw.end, size_t(24));
  CHECK_EQ(tw.numel(), size_t(6));
  CHECK(st.floats("w") == w);
  std::vector<float> copied(6);
  st.copy_floats("w", copied.data(), copied.size());
  CHECK(copied == w);
  CHECK(st.to_floats("w") == w);

  const auto& tb = st.info("b");
  CHECK_EQ(tb.dtype, std::string("BF16"));
  CHECK(tb.shape == (std::vector<int64_t>{4}));
  CHECK(st.to_floats("b") == (std::vector<float>{1.0f, -2.0f, 0.5f, 3.0f}));
  CHECK_EQ(std::memcmp(st.raw("b"), bf16.data(), bf16.size()), 0);

  const auto& ti = st.info("i");
  CHECK_EQ(ti.dtype, std::string("I8"));
  CHECK_EQ(ti.begin, size_t(32));
  CHECK_EQ(ti.end, size_t(35));
  CHECK_EQ(std::memcmp(st.raw("i"), i8.data(), i8.size()), 0);

  const auto& ts = st.info("s");
  CHECK(ts.shape == (std::vector<int64_t>{0, 5}));
  CHECK_EQ(ts.numel(), size_t(0));
  CHECK(st.floats("s").empty());

  CHECK_EQ(st.metadata().size(), size_t(2));
  CHECK(st.meta("format") && *st.meta("format") == "pt");
  CHECK(st.meta("note") && *st.meta("note") == "x");
  CHECK(st.meta("absent") == nullptr);
  CHECK(st.header().is_object());
  CHECK_EQ(st.header().size(), size_t(5));
  CHECK_EQ(st.first_nonfinite(), std::string());

  // typed access refuses what does not fit
  CHECK_THROWS(st.info("x"), SafetensorsError, "has no tensor \"x\"");
  CHECK_THROWS(st.floats("b"), SafetensorsError, "is BF16, expected F32");
  CHECK_THROWS(st.to_floats("i"), SafetensorsError, "expected a float tensor");
  std::vector<float> wrong(5);
  CHECK_THROWS(st.copy_floats("w", wrong.data(), wrong.size()), SafetensorsError, "has 6 values, expected 5");
}

TEST_CASE(safetensors, f16_and_nonfinite) {
  // float16 1.0, -2.0, 2^-24 (the smallest subnormal), 65504 (the largest finite)
  const std::string f16("\x00\x3c\x00\xc0\x01\x00\xff\x7b", 8);
  const std::vector<float> inf = {1.0f, HUGE_VALF};
  const std::string path = file_with(
      "f16.safetensors",
      R"({"a":{"dtype":"F16","shape":[2,2],"data_offsets":[0,8]},"z":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
      f16 + f32_bytes(inf));
  const SafetensorsFile st = SafetensorsFile::read(path);
  CHECK(st.to_floats("a") == (std::vector<float>{1.0f, -2.0f, 5.9604644775390625e-8f, 65504.0f}));
  CHECK_EQ(st.first_nonfinite(), std::string("z"));
}

TEST_CASE(safetensors, writer_round_trip) {
  const std::vector<float> a = {0.5f, -1.0f, 2.0f, 4.0f};
  const std::vector<float> b = {3.0f};
  const std::string path = tmp().path + "/written.safetensors";
  tmp().files.push_back(path);
  blockskip::write_safetensors(path, {{"zeta", {2, 2}, a.data()}, {"alpha", {1}, b.data()}}, {{"step", "7"}});
  const SafetensorsFile st = SafetensorsFile::read(path);
  CHECK_EQ(st.tensors().size(), size_t(2));
  CHECK(st.floats("zeta") == a);
  CHECK(st.floats("alpha") == b);
  CHECK(st.info("zeta").shape == (std::vector<int64_t>{2, 2}));
  // tensors laid out in name order, the header canonical and padded so the data is 8-byte aligned
  CHECK_EQ(st.info("alpha").begin, size_t(0));
  CHECK_EQ(st.info("zeta").begin, size_t(4));
  const std::string bytes(st.bytes().begin(), st.bytes().end());
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | uint8_t(bytes[size_t(i)]);
  CHECK_EQ(n % 8, uint64_t(0));
  const std::string want =
      R"({"__metadata__":{"step":"7"},"alpha":{"data_offsets":[0,4],"dtype":"F32","shape":[1]},)"
      R"("zeta":{"data_offsets":[4,20],"dtype":"F32","shape":[2,2]}})";
  CHECK_EQ(bytes.substr(8, want.size()), want);
  CHECK(n >= want.size() && n - want.size() < 8);
  CHECK_EQ(bytes.substr(8 + want.size(), size_t(n) - want.size()), std::string(size_t(n) - want.size(), ' '));
  CHECK_EQ(bytes.size(), size_t(8 + n + 20));
  CHECK(st.meta("step") && *st.meta("step") == "7");
  // the canonical file without a metadata key is the file the writer makes without it
  const std::string without = blockskip::safetensors_bytes({{"zeta", {2, 2}, a.data()}, {"alpha", {1}, b.data()}}, {});
  CHECK_EQ(st.canonical_sha256("step"), blockskip::sha256_hex(without));
  CHECK_EQ(st.canonical_sha256("other"), blockskip::sha256_hex(bytes));
  CHECK_THROWS(blockskip::safetensors_bytes({{"x", {1}, b.data()}, {"x", {1}, b.data()}}, {}), SafetensorsError,
               "duplicate tensor name");
}

TEST_CASE(safetensors, refuses_bad_header_length) {
  CHECK_THROWS(SafetensorsFile::read(write_file("short.safetensors", std::string("\x02\0\0", 3))),
               SafetensorsError, "shorter than its 8-byte header length");
  // a header length past the end of the file (by one byte, and absurdly)
  const std::string header = "{}";
  CHECK_THROWS(SafetensorsFile::read(write_file("long1.safetensors", le64(header.size() + 1) + header)),
               SafetensorsError, "header length 3 runs past the end of the file");
  CHECK_THROWS(SafetensorsFile::read(write_file("long2.safetensors", le64(~uint64_t(0)) + header)),
               SafetensorsError, "runs past the end of the file");
  CHECK_THROWS(SafetensorsFile::read(write_file("long3.safetensors", le64(uint64_t(1) << 63) + header)),
               SafetensorsError, "runs past the end of the file");
  // an empty header with no tensors is a valid (empty) file
  CHECK_EQ(SafetensorsFile::read(file_with("empty.safetensors", "{}", "")).tensors().size(), size_t(0));
  CHECK_THROWS(SafetensorsFile::read(tmp().path + "/absent.safetensors"), SafetensorsError, "cannot read");
}

TEST_CASE(safetensors, refuses_a_header_that_is_not_json) {
  CHECK_THROWS(SafetensorsFile::read(file_with("notjson.safetensors", "{\"t\": {\"dtype\": ", "")), SafetensorsError,
               "is not a valid safetensors file (header: ");
  CHECK_THROWS(SafetensorsFile::read(file_with("garbage.safetensors", "\x01\x02\x03\x04", "")), SafetensorsError,
               "header: unexpected byte");
  CHECK_THROWS(SafetensorsFile::read(file_with("trailing.safetensors", "{} {}", "")), SafetensorsError,
               "trailing characters");
  CHECK_THROWS(SafetensorsFile::read(file_with("array.safetensors", "[]", "")), SafetensorsError,
               "header is not a JSON object");
  CHECK_THROWS(SafetensorsFile::read(file_with("meta.safetensors", R"({"__metadata__": []})", "")), SafetensorsError,
               "__metadata__ is not an object");
  CHECK_THROWS(SafetensorsFile::read(file_with("meta2.safetensors", R"({"__metadata__": {"k": 1}})", "")),
               SafetensorsError, "__metadata__ value of \"k\" is not a string");
}

TEST_CASE(safetensors, refuses_malformed_tensor_entries) {
  // data_offsets outside the data
  CHECK_THROWS(SafetensorsFile::read(one_tensor("past.st", R"({"dtype":"F32","shape":[2],"data_offsets":[0,8]})", 7)),
               SafetensorsError, "tensor \"t\" data_offsets lie outside the data");
  CHECK_THROWS(SafetensorsFile::read(one_tensor("rev.st", R"({"dtype":"F32","shape":[1],"data_offsets":[8,4]})", 8)),
               SafetensorsError, "data_offsets lie outside the data");
  CHECK_THROWS(SafetensorsFile::read(one_tensor("neg.st", R"({"dtype":"F32","shape":[1],"data_offsets":[-4,0]})", 8)),
               SafetensorsError, "data_offsets lie outside the data");
  CHECK_THROWS(
      SafetensorsFile::read(one_tensor("huge.st", R"({"dtype":"U8","shape":[1],"data_offsets":[0,1e300]})", 8)),
      SafetensorsError, "tensor \"t\": offset should be an integer");
  CHECK_THROWS(SafetensorsFile::read(one_tensor("three.st", R"({"dtype":"F32","shape":[1],"data_offsets":[0,4,8]})", 8)),
               SafetensorsError, "data_offsets is not [begin, end]");
  CHECK_THROWS(SafetensorsFile::read(one_tensor("frac.st", R"({"dtype":"F32","shape":[1],"data_offsets":[0,4.5]})", 8)),
               SafetensorsError, "tensor \"t\": offset should be an integer");
  // a size that does not fit shape * dtype size
  CHECK_THROWS(SafetensorsFile::read(one_tensor("size.st", R"({"dtype":"F32","shape":[2,3],"data_offsets":[0,20]})", 24)),
               SafetensorsError, "tensor \"t\" has 20 bytes for its shape");
  CHECK_THROWS(SafetensorsFile::read(one_tensor("size2.st", R"({"dtype":"BF16","shape":[3],"data_offsets":[0,12]})", 12)),
               SafetensorsError, "has 12 bytes for its shape");
  CHECK_THROWS(SafetensorsFile::read(one_tensor("scalar.st", R"({"dtype":"F32","shape":[],"data_offsets":[0,0]})", 8)),
               SafetensorsError, "has 0 bytes for its shape");
  // a shape whose element count overflows: 2^33 * 2^31 = 2^64 elements would wrap to 0 bytes
  CHECK_THROWS(SafetensorsFile::read(one_tensor(
                   "wrap.st", R"({"dtype":"F32","shape":[8589934592,2147483648],"data_offsets":[0,0]})", 8)),
               SafetensorsError, "for its shape");
  // 4096 * (2^52 + 1) = 2^64 + 4096 elements would wrap to the 4096 bytes there are
  CHECK_THROWS(SafetensorsFile::read(one_tensor(
                   "wrap2.st", R"({"dtype":"I8","shape":[4096,4503599627370497],"data_offsets":[0,4096]})", 4096)),
               SafetensorsError, "for its shape");
  // unknown dtype, malformed shape, missing keys
  CHECK_THROWS(SafetensorsFile::read(one_tensor("dtype.st", R"({"dtype":"F13","shape":[1],"data_offsets":[0,4]})", 4)),
               SafetensorsError, "tensor \"t\" has unknown dtype F13");
  CHECK_THROWS(SafetensorsFile::read(one_tensor("dtype2.st", R"({"dtype":"f32","shape":[1],"data_offsets":[0,4]})", 4)),
               SafetensorsError, "unknown dtype f32");
  CHECK_THROWS(SafetensorsFile::read(one_tensor("dtype3.st", R"({"dtype":4,"shape":[1],"data_offsets":[0,4]})", 4)),
               SafetensorsError, "tensor \"t\": dtype should be a string");
  CHECK_THROWS(SafetensorsFile::read(one_tensor("negdim.st", R"({"dtype":"F32","shape":[-1],"data_offsets":[0,4]})", 4)),
               SafetensorsError, "tensor \"t\" has a negative dimension");
  CHECK_THROWS(SafetensorsFile::read(one_tensor("fdim.st", R"({"dtype":"F32","shape":[1.5],"data_offsets":[0,4]})", 4)),
               SafetensorsError, "shape entry should be an integer");
  CHECK_THROWS(SafetensorsFile::read(one_tensor("shape.st", R"({"dtype":"F32","shape":4,"data_offsets":[0,4]})", 4)),
               SafetensorsError, "shape should be an array");
  CHECK_THROWS(SafetensorsFile::read(one_tensor("nodtype.st", R"({"shape":[1],"data_offsets":[0,4]})", 4)),
               SafetensorsError, "tensor \"t\": missing key \"dtype\"");
  CHECK_THROWS(SafetensorsFile::read(one_tensor("nooff.st", R"({"dtype":"F32","shape":[1]})", 4)), SafetensorsError,
               "missing key \"data_offsets\"");
  CHECK_THROWS(SafetensorsFile::read(one_tensor("entry.st", R"([1])", 4)), SafetensorsError,
               "tensor \"t\": expected an object holding \"dtype\"");
}

TEST_CASE(safetensors, refuses_overlapping_tensors) {
  // two tensors sharing bytes 4..8 of the data
  const std::string overlap =
      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})";
  CHECK_THROWS(SafetensorsFile::read(file_with("overlap.st", overlap, std::string(12, '\0'))), SafetensorsError,
               "overlap");
  // the same range twice
  const std::string same =
      R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}})";
  CHECK_THROWS(SafetensorsFile::read(file_with("same.st", same, std::string(4, '\0'))), SafetensorsError, "overlap");
  // adjacent ranges and empty tensors anywhere are fine
  const std::string adjacent =
      R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
      R"("e":{"dtype":"F32","shape":[0],"data_offsets":[4,4]},"f":{"dtype":"U8","shape":[0],"data_offsets":[2,2]}})";
  CHECK_EQ(SafetensorsFile::read(file_with("adjacent.st", adjacent, std::string(8, '\0'))).tensors().size(), size_t(4));
}

TEST_CASE(safetensors, dtype_sizes) {
  CHECK_EQ(blockskip::dtype_size("F64"), size_t(8));
  CHECK_EQ(blockskip::dtype_size("I64"), size_t(8));
  CHECK_EQ(blockskip::dtype_size("F32"), size_t(4));
  CHECK_EQ(blockskip::dtype_size("F16"), size_t(2));
  CHECK_EQ(blockskip::dtype_size("BF16"), size_t(2));
  CHECK_EQ(blockskip::dtype_size("I8"), size_t(1));
  CHECK_EQ(blockskip::dtype_size("U8"), size_t(1));
  CHECK_EQ(blockskip::dtype_size("BOOL"), size_t(1));
  CHECK_EQ(blockskip::dtype_size("F8_E4M3"), size_t(1));
  CHECK_EQ(blockskip::dtype_size("Q4"), size_t(0));
  CHECK_EQ(blockskip::dtype_size(""), size_t(0));
}
