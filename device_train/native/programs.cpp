#include "programs.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <stdexcept>

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/core/hierarchical_allocator.h>

namespace blockskip {

using executorch::aten::ScalarType;
using executorch::extension::Module;
using executorch::runtime::EValue;
using executorch::runtime::Error;
using executorch::runtime::HierarchicalAllocator;
using executorch::runtime::Span;
using json::Value;

namespace {
constexpr size_t kAlign = 64;
size_t aligned(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }
}  // namespace

std::string et_error_text(Error e) {
  return "ExecuTorch error " + std::to_string(static_cast<int>(e));
}

ScalarType scalar_type(const std::string& d) {
  if (d == "float32") return ScalarType::Float;
  if (d == "float64") return ScalarType::Double;
  if (d == "float16") return ScalarType::Half;
  if (d == "bfloat16") return ScalarType::BFloat16;
  if (d == "int8") return ScalarType::Char;
  if (d == "uint8") return ScalarType::Byte;
  if (d == "int32") return ScalarType::Int;
  if (d == "int64") return ScalarType::Long;
  throw InputError("a stream program takes an input of dtype " + d + ", which this runner does not feed; export again");
}

const char* safetensors_dtype(const std::string& d) {
  if (d == "float32") return "F32";
  if (d == "float64") return "F64";
  if (d == "float16") return "F16";
  if (d == "bfloat16") return "BF16";
  if (d == "int8") return "I8";
  if (d == "uint8") return "U8";
  if (d == "int32") return "I32";
  if (d == "int64") return "I64";
  return "?";
}

struct BlockPrograms::Program {
  std::string shape, role, file;
  std::vector<IoRec> inputs, outputs;
  std::unique_ptr<Module> module;
  std::vector<size_t> buffer_sizes;
  std::vector<Span<uint8_t>> spans;
  std::unique_ptr<HierarchicalAllocator> planned;
};

namespace {

std::vector<IoRec> io_recs(const Value& list, const std::string& what) {
  std::vector<IoRec> out;
  for (const auto& r : list.as_array(what)) {
    IoRec io;
    io.name = r.at("name").as_string("name");
    io.dtype = r.at("dtype").as_string("dtype");
    for (const auto& d : r.at("shape").as_array("shape")) io.shape.push_back(d.as_int("dimension"));
    out.push_back(std::move(io));
  }
  return out;
}

}  // namespace

BlockPrograms::BlockPrograms(const Value& stream, const std::vector<std::pair<std::string, std::string>>& wanted,
                             const std::function<std::string(const std::string&)>& listed_path) {
  const Value& shapes = stream.at("shapes");
  size_t largest = 0;
  for (const auto& key : wanted) {
    if (programs_.count(key)) continue;
    const Value* sh = shapes.find(key.first);
    const Value* rec = sh && sh->find("programs") ? sh->at("programs").find(key.second) : nullptr;
    if (!rec)
      throw InputError("the bundle has no " + key.second + " program for block shape '" + key.first + "'; export it again");
    const Value* pte = rec->find("pte");
    if (!pte)
      throw InputError("the bundle has no pte program for " + key.second + " of block shape '" + key.first +
                       "'; export it with --format pte");
    auto p = std::make_unique<Program>();
    p->shape = key.first;
    p->role = key.second;
    p->inputs = io_recs(rec->at("inputs"), "inputs");
    p->outputs = io_recs(rec->at("outputs"), "outputs");
    p->file = listed_path(pte->at("file").as_string("file"));
    p->module = std::make_unique<Module>(p->file, Module::LoadMode::Mmap);
    Error err = p->module->load();
    if (err != Error::Ok)
      throw InputError("cannot load the program " + p->file + " (" + et_error_text(err) + "); export the bundle again");
    auto meta = p->module->method_meta("forward");
    if (!meta.ok()) throw InputError("program " + p->file + " has no forward method; export the bundle again");
    if (meta->num_inputs() != p->inputs.size() || meta->num_outputs() != p->outputs.size())
      throw InputError("program " + p->file + " takes " + std::to_string(meta->num_inputs()) + " inputs and gives " +
                       std::to_string(meta->num_outputs()) + " outputs, the manifest lists " +
                       std::to_string(p->inputs.size()) + " and " + std::to_string(p->outputs.size()) +
                       "; export the bundle again");
    for (size_t i = 0; i < p->inputs.size(); ++i) {
      const IoRec& io = p->inputs[i];
      auto tm = meta->input_tensor_meta(i);
      std::vector<int64_t> have;
      if (tm.ok()) have.assign(tm->sizes().begin(), tm->sizes().end());
      if (!tm.ok() || tm->scalar_type() != scalar_type(io.dtype) || have != io.shape)
        throw InputError("input " + io.name + " of program " + p->file + " is not the manifest's " + io.dtype + " " +
                         shape_str(io.shape) + "; export the bundle again");
    }
    for (const auto& io : p->outputs)
      if (io.dtype != "float32")
        throw InputError("output " + io.name + " of program " + p->file + " is not float32; export the bundle again");
    size_t total = 0;
    for (size_t i = 0; i < meta->num_memory_planned_buffers(); ++i) {
      auto n = meta->memory_planned_buffer_size(i);
      if (!n.ok() || *n < 0) throw InputError("cannot read the planned memory of " + p->file);
      p->buffer_sizes.push_back(size_t(*n));
      total += aligned(size_t(*n));
    }
    largest = std::max(largest, total);
    programs_[key] = std::move(p);
  }
  arena_size_ = std::max(largest, kAlign);
  arena_ = static_cast<uint8_t*>(std::aligned_alloc(kAlign, aligned(arena_size_)));
  if (!arena_) throw std::runtime_error("cannot allocate the programs' " + std::to_string(arena_size_) + "-byte arena");
  for (auto& kv : programs_) {
    Program& p = *kv.second;
    size_t off = 0;
    for (size_t n : p.buffer_sizes) {
      p.spans.emplace_back(arena_ + off, n);
      off += aligned(n);
    }
    p.planned = std::make_unique<HierarchicalAllocator>(Span<Span<uint8_t>>(p.spans.data(), p.spans.size()));
    Error err = p.module->load_method("forward", p.planned.get());
    if (err != Error::Ok)
      throw InputError("cannot load the forward method of " + p.file + " (" + et_error_text(err) + ")");
  }
}

BlockPrograms::~BlockPrograms() {
  programs_.clear();  // the methods first: they point into the arena
  std::free(arena_);
}

BlockPrograms::Program& BlockPrograms::get(const std::string& shape, const std::string& role) const {
  auto it = programs_.find({shape, role});
  if (it == programs_.end()) throw std::logic_error("program " + role + " of " + shape + " was not loaded");
  return *it->second;
}

const std::vector<IoRec>& BlockPrograms::inputs(const std::string& shape, const std::string& role) const {
  return get(shape, role).inputs;
}

FTensors BlockPrograms::run(const std::string& shape, const std::string& role, const std::vector<const Feed*>& feeds) {
  Program& p = get(shape, role);
  std::vector<executorch::extension::TensorPtr> keep;
  std::vector<EValue> in;
  keep.reserve(p.inputs.size());
  in.reserve(p.inputs.size());
  for (const IoRec& io : p.inputs) {
    const TensorRef* ref = nullptr;
    for (const Feed* f : feeds) {
      auto it = f->find(io.name);
      if (it != f->end()) {
        ref = &it->second;
        break;
      }
    }
    if (!ref)
      throw InputError("program " + role + " of '" + shape + "' needs input '" + io.name + "', which the cache entry "
                       "or the block's weights lack; the cache or bundle is from another export");
    const TensorRef& t = *ref;
    if (*t.shape != io.shape)
      throw InputError("input '" + io.name + "' of " + role + " program '" + shape + "' has shape " +
                       shape_str(*t.shape) + ", the program takes " + shape_str(io.shape) +
                       "; the cache or bundle is from another export");
    if (t.dtype != io.dtype)
      throw InputError("input '" + io.name + "' of " + role + " program '" + shape + "' is " + t.dtype +
                       ", the program takes " + io.dtype + "; the bundle is from another export");
    std::vector<executorch::aten::SizesType> sizes(io.shape.begin(), io.shape.end());
    keep.push_back(executorch::extension::from_blob(const_cast<void*>(t.data), sizes, scalar_type(io.dtype)));
    in.emplace_back(*keep.back());
  }
  auto out = p.module->execute("forward", in);
  if (!out.ok())
    throw std::runtime_error("program " + role + " of block shape '" + shape + "' failed (" +
                             et_error_text(out.error()) + ")");
  const auto& o = out.get();
  if (o.size() != p.outputs.size()) throw std::runtime_error("program " + p.file + " gave the wrong number of outputs");
  FTensors res;
  for (size_t i = 0; i < o.size(); ++i) {
    const IoRec& io = p.outputs[i];
    if (!o[i].isTensor()) throw std::runtime_error("output " + io.name + " of " + p.file + " is not a tensor");
    const auto& t = o[i].toTensor();
    if (t.scalar_type() != ScalarType::Float || size_t(t.numel()) != numel(io.shape))
      throw std::runtime_error("output " + io.name + " of " + p.file + " is not float32 " + shape_str(io.shape));
    const float* d = t.const_data_ptr<float>();
    res[io.name] = FTensor{io.shape, std::vector<float>(d, d + t.numel())};
  }
  return res;
}

}  // namespace blockskip
