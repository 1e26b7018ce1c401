// The streamed span's ExecuTorch programs (stream/<shape>.<role>.pte), fed by name as the manifest's
// calling convention says (runtime/backends/programs.py). Their inputs are not memory planned: each
// input is the caller's own buffer. Every loaded method plans its memory into ONE shared arena (the
// largest method's planned buffers), which is safe because one program runs at a time; a program's
// outputs live in that arena, so run() copies them out before returning.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <executorch/runtime/core/error.h>
#include <executorch/runtime/core/exec_aten/exec_aten.h>

#include "common.h"
#include "json.h"

namespace blockskip {

std::string et_error_text(executorch::runtime::Error e);

// A manifest dtype name ("float32", "int8", ...) and the safetensors dtype that stores it.
executorch::aten::ScalarType scalar_type(const std::string& dtype);
const char* safetensors_dtype(const std::string& dtype);

struct IoRec {
  std::string name, dtype;
  std::vector<int64_t> shape;
};

// A tensor the caller owns, fed to a program input (raw bytes in the input's dtype).
struct TensorRef {
  const void* data = nullptr;
  std::string dtype;  // manifest dtype name
  const std::vector<int64_t>* shape = nullptr;
};
using Feed = std::map<std::string, TensorRef>;

class BlockPrograms {
 public:
  // `wanted`: (shape id, role) pairs to load; `manifest_stream` is manifest["stream"].
  BlockPrograms(const json::Value& manifest_stream, const std::vector<std::pair<std::string, std::string>>& wanted,
                const std::function<std::string(const std::string&)>& listed_path);
  ~BlockPrograms();

  const std::vector<IoRec>& inputs(const std::string& shape, const std::string& role) const;
  // Runs one program, each input looked up by name in the first of `feeds` that has it; returns its
  // float32 outputs by manifest name.
  FTensors run(const std::string& shape, const std::string& role, const std::vector<const Feed*>& feeds);
  size_t arena_bytes() const { return arena_size_; }

 private:
  struct Program;
  Program& get(const std::string& shape, const std::string& role) const;
  std::map<std::pair<std::string, std::string>, std::unique_ptr<Program>> programs_;
  uint8_t* arena_ = nullptr;
  size_t arena_size_ = 0;
};

}  // namespace blockskip
