#include "safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>

#include "formats.h"
#include "json.h"
#include "sha256.h"

namespace blockskip {

size_t dtype_size(const std::string& d) {
  if (d == "F64" || d == "I64" || d == "U64") return 8;
  if (d == "F32" || d == "I32" || d == "U32") return 4;
  if (d == "F16" || d == "BF16" || d == "I16" || d == "U16") return 2;
  if (d == "I8" || d == "U8" || d == "BOOL" || d == "F8_E4M3" || d == "F8_E5M2") return 1;
  return 0;
}

size_t TensorInfo::numel() const {
  size_t n = 1;
  for (int64_t s : shape) n *= size_t(s);
  return n;
}

namespace {

// The whole file in one buffer, read straight into it (a block's weights cost the file's size).
std::vector<uint8_t> read_all(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) throw SafetensorsError("cannot read " + path + ": " + std::strerror(errno));
  std::vector<uint8_t> out;
  long size = -1;
  if (std::fseek(f, 0, SEEK_END) == 0) {
    size = std::ftell(f);
    std::fseek(f, 0, SEEK_SET);
  }
  size_t got = 0;
  if (size >= 0) {
    out.resize(size_t(size));
    got = std::fread(out.data(), 1, out.size(), f);
  }
  uint8_t buf[1 << 16];
  size_t n;
  out.resize(got);  // a file that changed size while read: take what there is, then any rest
  while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0) out.insert(out.end(), buf, buf + n);
  bool err = std::ferror(f);
  std::fclose(f);
  if (err) throw SafetensorsError("error reading " + path);
  return out;
}

// IEEE half -> float (exact).
float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal half: normalise
    int e = -1;
    do {
      ++e;
      man <<= 1;
    } while (!(man & 0x400u));
    bits = sign | (uint32_t(112 - e) << 23) | ((man & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

}  // namespace

SafetensorsFile SafetensorsFile::read(const std::string& path) {
  SafetensorsFile st;
  st.path_ = path;
  st.bytes_ = read_all(path);
  const auto& b = st.bytes_;
  auto bad = [&](const std::string& why) {
    return SafetensorsError(path + " is not a valid safetensors file (" + why + ")");
  };
  if (b.size() < 8) throw bad("shorter than its 8-byte header length");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | b[size_t(i)];
  if (n > b.size() - 8) throw bad("header length " + std::to_string(n) + " runs past the end of the file");
  std::string header(reinterpret_cast<const char*>(b.data() + 8), size_t(n));
  json::Value h;
  try {
    h = json::parse(header);
  } catch (const json::Error& e) {
    throw bad(std::string("header: ") + e.what());
  }
  if (!h.is_object()) throw bad("header is not a JSON object");
  st.header_ = h;
  st.data_start_ = 8 + size_t(n);
  size_t data_size = b.size() - st.data_start_;
  for (const auto& kv : h.as_object()) {
    if (kv.first == "__metadata__") {
      if (!kv.second.is_object()) throw bad("__metadata__ is not an object");
      for (const auto& m : kv.second.as_object()) {
        if (!m.second.is_string()) throw bad("__metadata__ value of \"" + m.first + "\" is not a string");
        st.metadata_.emplace_back(m.first, m.second.as_string());
      }
      continue;
    }
    try {
      TensorInfo t;
      t.dtype = kv.second.at("dtype").as_string("dtype");
      size_t es = dtype_size(t.dtype);
      if (!es) throw bad("tensor \"" + kv.first + "\" has unknown dtype " + t.dtype);
      for (const auto& d : kv.second.at("shape").as_array("shape")) {
        int64_t s = d.as_int("shape entry");
        if (s < 0) throw bad("tensor \"" + kv.first + "\" has a negative dimension");
        t.shape.push_back(s);
      }
      const auto& off = kv.second.at("data_offsets").as_array("data_offsets");
      if (off.size() != 2) throw bad("tensor \"" + kv.first + "\": data_offsets is not [begin, end]");
      int64_t b0 = off[0].as_int("offset"), b1 = off[1].as_int("offset");
      if (b0 < 0 || b1 < b0 || size_t(b1) > data_size)
        throw bad("tensor \"" + kv.first + "\" data_offsets lie outside the data");
      t.begin = size_t(b0);
      t.end = size_t(b1);
      // the shape's size in bytes, refused when it passes the data (a product that overflows size_t
      // would wrap around to a small size and pass for a huge shape)
      size_t want = es;
      bool too_big = false;
      for (int64_t s : t.shape) {
        if (s == 0) {
          want = 0;
          too_big = false;
          break;
        }
        if (!too_big && want > data_size / size_t(s)) too_big = true;
        if (!too_big) want *= size_t(s);
      }
      if (too_big || t.end - t.begin != want)
        throw bad("tensor \"" + kv.first + "\" has " + std::to_string(t.end - t.begin) + " bytes for its shape");
      st.tensors_[kv.first] = std::move(t);
    } catch (const json::Error& e) {
      throw bad("tensor \"" + kv.first + "\": " + e.what());
    }
  }
  // no two tensors share bytes (empty tensors take none)
  std::vector<std::pair<const TensorInfo*, const std::string*>> spans;
  for (const auto& kv : st.tensors_)
    if (kv.second.end > kv.second.begin) spans.emplace_back(&kv.second, &kv.first);
  std::sort(spans.begin(), spans.end(), [](const auto& a, const auto& b) { return a.first->begin < b.first->begin; });
  for (size_t i = 1; i < spans.size(); ++i)
    if (spans[i].first->begin < spans[i - 1].first->end)
      throw bad("tensors \"" + *spans[i - 1].second + "\" and \"" + *spans[i].second + "\" overlap in the data");
  return st;
}

const TensorInfo& SafetensorsFile::info(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) throw SafetensorsError(path_ + " has no tensor \"" + name + "\"");
  return it->second;
}

const std::string* SafetensorsFile::meta(const std::string& key) const {
  for (const auto& kv : metadata_)
    if (kv.first == key) return &kv.second;
  return nullptr;
}

void SafetensorsFile::copy_floats(const std::string& name, float* dst, size_t n) const {
  const TensorInfo& t = info(name);
  if (t.dtype != "F32")
    throw SafetensorsError(path_ + ": tensor \"" + name + "\" is " + t.dtype + ", expected F32 (float32)");
  if (t.numel() != n)
    throw SafetensorsError(path_ + ": tensor \"" + name + "\" has " + std::to_string(t.numel()) +
                           " values, expected " + std::to_string(n));
  std::memcpy(dst, bytes_.data() + data_start_ + t.begin, n * sizeof(float));
}

std::vector<float> SafetensorsFile::floats(const std::string& name) const {
  std::vector<float> out(info(name).numel());
  copy_floats(name, out.data(), out.size());
  return out;
}

const uint8_t* SafetensorsFile::raw(const std::string& name) const {
  return bytes_.data() + data_start_ + info(name).begin;
}

std::vector<float> SafetensorsFile::to_floats(const std::string& name) const {
  const TensorInfo& t = info(name);
  if (t.dtype == "F32") return floats(name);
  if (t.dtype != "F16" && t.dtype != "BF16")
    throw SafetensorsError(path_ + ": tensor \"" + name + "\" is " + t.dtype + ", expected a float tensor");
  std::vector<float> out(t.numel());
  const uint8_t* p = raw(name);
  for (size_t i = 0; i < out.size(); ++i) {
    const uint16_t h = uint16_t(p[2 * i] | (p[2 * i + 1] << 8));
    if (t.dtype == "F16") {
      out[i] = half_to_float(h);
    } else {
      const uint32_t bits = uint32_t(h) << 16;
      std::memcpy(&out[i], &bits, 4);
    }
  }
  return out;
}

std::string SafetensorsFile::first_nonfinite() const {
  for (const auto& kv : tensors_) {  // std::map: name order
    const TensorInfo& t = kv.second;
    const uint8_t* p = bytes_.data() + data_start_ + t.begin;
    const size_t n = t.numel();
    bool bad = false;
    if (t.dtype == "F32") {
      for (size_t i = 0; i < n && !bad; ++i) {
        uint32_t w;
        std::memcpy(&w, p + 4 * i, 4);
        bad = (w & 0x7F800000u) == 0x7F800000u;
      }
    } else if (t.dtype == "F16" || t.dtype == "BF16") {
      const uint16_t e = t.dtype == "F16" ? 0x7C00u : 0x7F80u;
      for (size_t i = 0; i < n && !bad; ++i) bad = (uint16_t(p[2 * i] | (p[2 * i + 1] << 8)) & e) == e;
    } else if (t.dtype == "F64") {
      for (size_t i = 0; i < n && !bad; ++i) {
        uint64_t w;
        std::memcpy(&w, p + 8 * i, 8);
        bad = (w & 0x7FF0000000000000ull) == 0x7FF0000000000000ull;
      }
    }
    if (bad) return kv.first;
  }
  return "";
}

std::string canonical_header(json::Value header) {
  if (const json::Value* m = header.find("__metadata__"); m && m->is_object() && m->size() == 0)
    header.erase("__metadata__");
  std::string text = json::dump_canonical(header);
  while (text.size() % 8) text += ' ';
  return text;
}

std::string SafetensorsFile::canonical_sha256(const std::string& drop_key) const {
  json::Value h = json::Value::object();
  json::Value meta = json::Value::object();
  for (const auto& kv : metadata_)
    if (kv.first != drop_key) meta.set(kv.first, json::Value::string(kv.second));
  for (const auto& kv : header_.as_object())
    if (kv.first != "__metadata__") h.append(kv.first, kv.second);
  h.append("__metadata__", std::move(meta));
  const std::string text = canonical_header(std::move(h));
  Sha256 sha;
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = uint8_t((uint64_t(text.size()) >> (8 * i)) & 0xFF);
  sha.update(len, 8);
  sha.update(reinterpret_cast<const uint8_t*>(text.data()), text.size());
  sha.update(bytes_.data() + data_start_, bytes_.size() - data_start_);
  return sha.hexdigest();
}

// ------------------------------------------------------------------------------------------
// writing

std::string safetensors_bytes(std::vector<TensorOut> tensors,
                              const std::vector<std::pair<std::string, std::string>>& metadata) {
  std::sort(tensors.begin(), tensors.end(), [](const TensorOut& a, const TensorOut& b) { return a.name < b.name; });
  json::Value h = json::Value::object();
  if (!metadata.empty()) {
    json::Value m = json::Value::object();
    for (const auto& kv : metadata) m.set(kv.first, json::Value::string(kv.second));
    h.set("__metadata__", std::move(m));
  }
  size_t offset = 0;
  std::vector<size_t> sizes;
  for (const auto& t : tensors) {
    if (t.name == "__metadata__") throw SafetensorsError("a tensor cannot be named __metadata__");
    size_t n = 1;
    json::Value shape = json::Value::array();
    for (int64_t s : t.shape) {
      n *= size_t(s);
      shape.push_back(json::Value::integer(s));
    }
    json::Value e = json::Value::object();
    e.set("dtype", json::Value::string("F32"));
    e.set("shape", std::move(shape));
    json::Value off = json::Value::array();
    off.push_back(json::Value::integer(int64_t(offset)));
    off.push_back(json::Value::integer(int64_t(offset + n * sizeof(float))));
    e.set("data_offsets", std::move(off));
    if (h.find(t.name)) throw SafetensorsError("duplicate tensor name \"" + t.name + "\"");
    h.set(t.name, std::move(e));
    sizes.push_back(n * sizeof(float));
    offset += n * sizeof(float);
  }
  // the canonical header (runtime/formats.py): Python's json.dumps(header, sort_keys=True,
  // separators=(",", ":")), keys sorted at every level, ASCII, padded with spaces to a multiple of 8
  json::DumpOptions o;
  o.sort_keys = true;
  o.ensure_ascii = true;
  std::string header = json::dump(h, o);
  while (header.size() % 8) header += ' ';  // keeps the data 8-byte aligned
  std::string out;
  out.reserve(8 + header.size() + offset);
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out += char((n >> (8 * i)) & 0xFF);
  out += header;
  for (size_t i = 0; i < tensors.size(); ++i)
    out.append(reinterpret_cast<const char*>(tensors[i].data), sizes[i]);
  return out;
}

void atomic_write(const std::string& path, const void* data, size_t size) {
  std::string dir = ".", base = path;
  size_t slash = path.find_last_of('/');
  if (slash != std::string::npos) {
    dir = slash == 0 ? "/" : path.substr(0, slash);
    base = path.substr(slash + 1);
  }
  const std::string suffix = formats::kTempSuffix;
  std::string tmpl = (dir == "/" ? "" : dir) + "/" + formats::kTempPrefix + base + ".XXXXXX" + suffix;
  std::vector<char> name(tmpl.begin(), tmpl.end());
  name.push_back('\0');
  int fd = mkstemps(name.data(), int(suffix.size()));
  if (fd < 0) throw std::runtime_error("cannot write in " + dir + ": " + std::strerror(errno));
  std::string tmp(name.data());
  auto fail = [&](const std::string& what) {
    int e = errno;
    ::close(fd);
    ::unlink(tmp.c_str());
    throw std::runtime_error(what + " " + path + ": " + std::strerror(e));
  };
  const char* p = static_cast<const char*>(data);
  size_t left = size;
  while (left) {
    ssize_t w = ::write(fd, p, left);
    if (w < 0) {
      if (errno == EINTR) continue;
      fail("cannot write");
    }
    p += w;
    left -= size_t(w);
  }
  mode_t mask = ::umask(0);  // mkstemps creates 0600; give the file the usual 0666 & ~umask
  ::umask(mask);
  if (::fchmod(fd, 0666 & ~mask) != 0) fail("cannot set the mode of");
  if (::fsync(fd) != 0) fail("cannot fsync");
  if (::close(fd) != 0) {
    int e = errno;
    ::unlink(tmp.c_str());
    throw std::runtime_error("cannot close " + path + ": " + std::strerror(e));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    int e = errno;
    ::unlink(tmp.c_str());
    throw std::runtime_error("cannot rename into " + path + ": " + std::strerror(e));
  }
  int dfd = ::open(dir.c_str(), O_RDONLY);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

void write_safetensors(const std::string& path, std::vector<TensorOut> tensors,
                       const std::vector<std::pair<std::string, std::string>>& metadata) {
  atomic_write(path, safetensors_bytes(std::move(tensors), metadata));
}

}  // namespace blockskip
