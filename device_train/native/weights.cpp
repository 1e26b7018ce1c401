#include "weights.h"

#include <dirent.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <stdexcept>

namespace blockskip {

namespace {

// safetensors dtype -> the manifest's dtype name ("" for dtypes no program takes)
std::string dtype_name(const std::string& st) {
  if (st == "F32") return "float32";
  if (st == "F16") return "float16";
  if (st == "BF16") return "bfloat16";
  if (st == "I8") return "int8";
  if (st == "U8") return "uint8";
  if (st == "I32") return "int32";
  if (st == "I64") return "int64";
  return "";
}

}  // namespace

std::shared_ptr<BlockWeights> read_weights(const std::string& path, const std::string& prefix) {
  auto w = std::make_shared<BlockWeights>();
  try {
    w->file = SafetensorsFile::read(path);
  } catch (const std::exception& e) {
    throw InputError(std::string(e.what()) + "; copy the whole bundle folder again or export it again");
  }
  const std::string p = prefix.empty() ? "" : prefix + ".";
  for (const auto& kv : w->file.tensors()) {
    if (kv.first.compare(0, p.size(), p) != 0) continue;
    TensorRef ref;
    ref.dtype = dtype_name(kv.second.dtype);
    if (ref.dtype.empty()) continue;
    ref.shape = &kv.second.shape;
    ref.data = w->file.raw(kv.first);
    const size_t es = dtype_size(kv.second.dtype), n = kv.second.end - kv.second.begin;
    if (reinterpret_cast<uintptr_t>(ref.data) % es != 0) {  // kernels read it as its element type
      w->copies.emplace_back(new uint8_t[n ? n : 1]);
      std::memcpy(w->copies.back().get(), ref.data, n);
      ref.data = w->copies.back().get();
    }
    w->feed["w." + kv.first.substr(p.size())] = ref;
  }
  return w;
}

// ------------------------------------------------------------------------------------------

WeightSource::WeightSource(std::function<std::shared_ptr<BlockWeights>(int)> read, bool resident, bool prefetch)
    : read_(std::move(read)), resident_(resident), prefetch_(prefetch && !resident) {}

WeightSource::~WeightSource() {
  try {
    close();
  } catch (...) {
  }
}

std::shared_ptr<BlockWeights> WeightSource::read(int i) {
  ++reads_;
  return read_(i);
}

void WeightSource::plan(std::vector<int> order) {
  order_ = std::move(order);
  pos_ = 0;
}

const BlockWeights& WeightSource::get(int i) {
  if (resident_) {
    auto it = kept_.find(i);
    if (it == kept_.end()) it = kept_.emplace(i, read(i)).first;
    return *it->second;
  }
  if (!(current_ && current_i_ == i)) {
    current_.reset();  // drop it before the next one arrives: at most two files resident
    current_i_ = -1;
    std::shared_ptr<BlockWeights> w;
    if (pending_.valid() && pending_i_ == i) {
      w = pending_.get();
    } else {
      if (pending_.valid()) pending_.wait();  // a read for another block: let it finish, then drop it
      pending_ = {};
      w = read(i);
    }
    pending_ = {};
    pending_i_ = -1;
    current_ = std::move(w);
    current_i_ = i;
  }
  while (pos_ < order_.size() && order_[pos_] == i) ++pos_;
  const int next = pos_ < order_.size() ? order_[pos_] : -1;
  if (prefetch_ && next >= 0 && next != i && !pending_.valid()) {
    pending_i_ = next;
    pending_ = std::async(std::launch::async, [this, next] { return read(next); });
  }
  return *current_;
}

void WeightSource::close() {
  if (pending_.valid()) pending_.wait();
  pending_ = {};
  pending_i_ = current_i_ = -1;
  current_.reset();
  kept_.clear();
}

// ------------------------------------------------------------------------------------------

Stash::Stash(std::string folder) : folder_(std::move(folder)) {}

Stash::~Stash() {
  if (!folder_.empty()) remove_flat_dir(folder_);
}

void Stash::remove_stale(const std::string& dir) {
  std::vector<std::string> stale;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (dirent* e = ::readdir(d))
      if (std::strncmp(e->d_name, "stash-", 6) == 0) stale.push_back(join(dir, e->d_name));
    ::closedir(d);
  }
  for (const auto& s : stale) remove_flat_dir(s);
}

std::string Stash::path(size_t k, const std::string& name) const {
  return join(folder_, std::to_string(k) + "." + name + ".f32");
}

void Stash::put(size_t k, std::shared_ptr<const FTensors> state) {
  if (folder_.empty()) {
    mem_[k] = std::move(state);
    return;
  }
  auto& names = names_[k];
  names.clear();
  for (const auto& kv : *state) {
    const std::string p = path(k, kv.first);
    FILE* f = std::fopen(p.c_str(), "wb");
    const size_t n = kv.second.data.size();
    bool ok = f && std::fwrite(kv.second.data.data(), sizeof(float), n, f) == n;
    if (f && std::fclose(f) != 0) ok = false;
    if (!ok) throw InputError("cannot write the stash file " + p + ": " + std::strerror(errno) + "; free disk space");
    names.emplace_back(kv.first, kv.second.shape);
  }
}

std::shared_ptr<const FTensors> Stash::pop(size_t k) {
  if (folder_.empty()) {
    auto it = mem_.find(k);
    if (it == mem_.end()) throw std::logic_error("stash entry " + std::to_string(k) + " is missing");
    auto out = std::move(it->second);
    mem_.erase(it);
    return out;
  }
  auto it = names_.find(k);
  if (it == names_.end()) throw std::logic_error("stash entry " + std::to_string(k) + " is missing");
  auto out = std::make_shared<FTensors>();
  for (const auto& nm : it->second) {
    const std::string p = path(k, nm.first);
    FTensor t{nm.second, std::vector<float>(numel(nm.second))};
    FILE* f = std::fopen(p.c_str(), "rb");
    bool ok = f && std::fread(t.data.data(), sizeof(float), t.data.size(), f) == t.data.size();
    if (f) std::fclose(f);
    if (!ok) throw InputError("cannot read back the stash file " + p + "; is something else using " + folder_ + "?");
    ::unlink(p.c_str());
    (*out)[nm.first] = std::move(t);
  }
  names_.erase(it);
  return out;
}

}  // namespace blockskip
