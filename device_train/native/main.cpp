// blockskip-train-native: the LoRA training loop of a bundle's ExecuTorch training program, with no
// Python and no libtorch. Reads BUNDLE/manifest.json and the residual cache made by
// `device-train precompute`, runs the program's forward-backward method once per cache entry, updates
// the LoRA weights in place with AdamW, checkpoints atomically (resuming from the checkpoint when
// one is there) and writes the LoRA as safetensors in diffusers naming.
//
// The order of entries, the gradient accumulation, the optimizer arithmetic, the checkpoint and the
// output files are those of the Python backends, so a run here reproduces their losses.

#include <sys/stat.h>

#include <cerrno>
#include <chrono>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <future>
#include <map>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

#include "adamw.h"
#include "json.h"
#include "safetensors.h"
#include "sha256.h"

namespace {

using blockskip::AdamWConfig;
using blockskip::AdamWState;
using blockskip::SafetensorsFile;
using blockskip::json::Value;
using executorch::extension::Module;
using executorch::runtime::EValue;
using executorch::runtime::Error;

const char* kProg = "blockskip-train-native";
const char* kGradsIndex = "__et_training_gradients_index_";
const char* kParamsIndex = "__et_training_parameters_index_";
const char* kFqn = "__et_training_fqn_";
const char* kMethod = "forward";
const char* kLossScale = "loss_scale";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct InputError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

const char* kUsage =
    "usage: blockskip-train-native BUNDLE --cache DIR -o OUT [--stop-after N] [--quiet] [--no-verify]\n"
    "\n"
    "Train the LoRA of BUNDLE (exported with --format pte) on the residual cache DIR (made by\n"
    "`device-train precompute`) with the bundle's ExecuTorch training program; no Python needed.\n"
    "\n"
    "positional arguments:\n"
    "  BUNDLE            the bundle folder (holds manifest.json and pte/train/span.pte)\n"
    "\n"
    "options:\n"
    "  --cache DIR       the residual cache folder (holds index.json)\n"
    "  -o, --out OUT     output folder: lora.safetensors, train_log.json, checkpoint/\n"
    "  --stop-after N    stop after step N (a later run resumes from the last checkpoint)\n"
    "  --quiet           no progress lines\n"
    "  --no-verify       check file sizes only, not sha256 digests\n"
    "  -h, --help        show this help and exit\n"
    "\n"
    "A run resumes from OUT/checkpoint/checkpoint.safetensors when it is there.\n";

struct Options {
  std::string bundle, cache, out;
  long long stop_after = -1;
  bool quiet = false;
  bool verify = true;
};

Options parse_args(int argc, char** argv) {
  Options o;
  std::vector<std::string> pos;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&](const std::string& name) -> std::string {
      size_t eq = a.find('=');
      if (eq != std::string::npos && a.compare(0, 2, "--") == 0) return a.substr(eq + 1);
      if (i + 1 >= argc) throw UsageError(name + " needs a value");
      return argv[++i];
    };
    auto is = [&](const char* name) { return a == name || a.rfind(std::string(name) + "=", 0) == 0; };
    if (a == "-h" || a == "--help") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    } else if (is("--cache")) {
      o.cache = value("--cache");
    } else if (a == "-o" || is("--out")) {
      o.out = value("-o/--out");
    } else if (is("--stop-after")) {
      std::string v = value("--stop-after");
      char* end = nullptr;
      errno = 0;
      long long n = std::strtoll(v.c_str(), &end, 10);
      if (v.empty() || *end || errno || n < 0) throw UsageError("--stop-after needs a step count >= 0, got '" + v + "'");
      o.stop_after = n;
    } else if (a == "--quiet" || a == "-q") {
      o.quiet = true;
    } else if (a == "--no-verify") {
      o.verify = false;
    } else if (a.size() > 1 && a[0] == '-') {
      throw UsageError("unknown option " + a);
    } else {
      pos.push_back(a);
    }
  }
  if (pos.size() != 1) throw UsageError(pos.empty() ? "missing BUNDLE" : "expected one BUNDLE, got " + std::to_string(pos.size()));
  o.bundle = pos[0];
  if (o.cache.empty()) throw UsageError("missing --cache DIR");
  if (o.out.empty()) throw UsageError("missing -o OUT");
  return o;
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// ------------------------------------------------------------------------------------------
// files

bool is_file(const std::string& p) {
  struct stat s;
  return ::stat(p.c_str(), &s) == 0 && S_ISREG(s.st_mode);
}

bool is_dir(const std::string& p) {
  struct stat s;
  return ::stat(p.c_str(), &s) == 0 && S_ISDIR(s.st_mode);
}

long long file_size(const std::string& p) {
  struct stat s;
  return ::stat(p.c_str(), &s) == 0 ? static_cast<long long>(s.st_size) : -1;
}

std::string join(const std::string& a, const std::string& b) {
  if (a.empty() || a.back() == '/') return a + b;
  return a + "/" + b;
}

void make_dirs(const std::string& path, const std::string& what) {
  std::string cur;
  size_t i = 0;
  while (i <= path.size()) {
    size_t j = path.find('/', i);
    if (j == std::string::npos) j = path.size();
    cur = path.substr(0, j);
    if (!cur.empty() && !is_dir(cur)) {
      if (::mkdir(cur.c_str(), 0777) != 0 && errno != EEXIST)
        throw InputError("cannot create " + what + " '" + path + "': " + std::strerror(errno) +
                         "; choose another path with -o");
    }
    i = j + 1;
  }
  if (!is_dir(path)) throw InputError(what + " '" + path + "' exists and is not a folder; choose another path with -o");
}

Value read_json(const std::string& path, const std::string& what) {
  try {
    return blockskip::json::parse_file(path);
  } catch (const blockskip::json::Error& e) {
    throw InputError(what + ": " + e.what());
  }
}

// ------------------------------------------------------------------------------------------
// the bundle

struct Bundle {
  std::string root, manifest_sha256;
  Value plan;
  long long steps = 0, grad_accum = 1, checkpoint_every = 0;
  std::string program, data;  // absolute-ish paths of span.pte and span.ptd
  std::vector<std::string> inputs;  // entry tensors in the method's order (loss_scale excluded)
  std::map<std::string, std::vector<int64_t>> shapes;
  std::vector<std::string> lora;
  AdamWConfig adamw;
  std::vector<std::pair<std::string, std::string>> lora_metadata;
  double lora_scale = 1.0;
  std::string delegate = "none";  // the program's delegate, for the log
};

Bundle load_bundle(const std::string& root, bool verify) {
  Bundle b;
  b.root = root;
  std::string mpath = join(root, "manifest.json");
  if (!is_dir(root)) throw InputError("bundle folder '" + root + "' does not exist");
  if (!is_file(mpath)) throw InputError("'" + root + "' is not a bundle: it has no manifest.json (make one with blockskip-export)");
  Value m = read_json(mpath, "bundle manifest");
  b.manifest_sha256 = blockskip::sha256_file(mpath);
  try {
    const Value* pte = m.find("pte");
    if (!pte || !pte->find("train")) {
      std::string formats;
      if (const Value* f = m.find("formats"))
        for (const auto& x : f->as_array("formats")) formats += (formats.empty() ? "" : ",") + x.as_string();
      throw InputError("bundle '" + root + "' has no ExecuTorch training program (exported with --format " +
                       (formats.empty() ? std::string("torch") : formats) +
                       "); export it again with --format pte (e.g. --format torch,pte)");
    }
    const Value& t = pte->at("train");
    if (const Value* d = pte->find("delegate"); d && d->is_string()) b.delegate = d->as_string();
    b.plan = m.at("plan");
    b.steps = b.plan.at("steps").as_int("plan.steps");
    b.grad_accum = b.plan.at("grad_accum").as_int("plan.grad_accum");
    b.checkpoint_every = b.plan.at("checkpoint_every").as_int("plan.checkpoint_every");
    if (b.steps < 0 || b.grad_accum < 1 || b.checkpoint_every < 1)
      throw InputError("bundle plan has steps/grad_accum/checkpoint_every out of range");
    b.adamw.lr = b.plan.at("lr").as_double("plan.lr");
    const Value& opt = t.at("optimizer");
    if (const Value* ty = opt.find("type"); ty && ty->as_string("optimizer.type") != "adamw")
      throw InputError("the bundle's optimizer is " + ty->as_string() + "; this runner trains with AdamW only");
    const auto& betas = opt.at("betas").as_array("optimizer.betas");
    if (betas.size() != 2) throw InputError("optimizer.betas should hold two numbers");
    b.adamw.beta1 = betas[0].as_double("beta1");
    b.adamw.beta2 = betas[1].as_double("beta2");
    b.adamw.eps = opt.at("eps").as_double("optimizer.eps");
    b.adamw.weight_decay = opt.at("weight_decay").as_double("optimizer.weight_decay");

    const Value& names = t.at("inputs");
    for (const auto& n : names.as_array("pte.train.inputs")) b.inputs.push_back(n.as_string("input name"));
    if (b.inputs.empty() || b.inputs.back() != kLossScale)
      throw InputError("pte.train.inputs should end with loss_scale; export the bundle again");
    b.inputs.pop_back();
    const Value& shapes = t.at("shapes");
    for (const auto& n : b.inputs) {
      std::vector<int64_t> s;
      for (const auto& d : shapes.at(n).as_array("shape of " + n)) s.push_back(d.as_int("dimension"));
      b.shapes[n] = s;
    }
    for (const auto& n : t.at("lora").as_array("pte.train.lora")) b.lora.push_back(n.as_string("LoRA name"));
    if (b.lora.empty()) throw InputError("the bundle lists no LoRA parameters");
    for (const auto& kv : t.at("lora_metadata").as_object("lora_metadata"))
      b.lora_metadata.emplace_back(kv.first, kv.second.as_string("lora_metadata." + kv.first));
    b.lora_scale = t.at("lora_scale").as_double("lora_scale");

    const Value& files = m.at("files");
    auto listed = [&](const std::string& rel) {
      const Value* rec = files.find(rel);
      if (!rec) throw InputError("bundle manifest does not list " + rel + "; export the bundle again");
      std::string p = join(root, rel);
      if (!is_file(p)) throw InputError("bundle file " + rel + " is missing; copy the whole bundle folder or export again");
      long long want = rec->at("size").as_int("size of " + rel);
      if (file_size(p) != want)
        throw InputError("bundle file " + rel + " has " + std::to_string(file_size(p)) + " bytes, the manifest says " +
                         std::to_string(want) + ": it is truncated or corrupt; copy it again or export again");
      if (verify && blockskip::sha256_file(p) != rec->at("sha256").as_string("sha256 of " + rel))
        throw InputError("bundle file " + rel + " does not match its recorded sha256: it is corrupt; export again");
      return p;
    };
    b.program = listed(t.at("file").as_string("pte.train.file"));
    b.data = listed(t.at("data").as_string("pte.train.data"));
  } catch (const blockskip::json::Error& e) {
    throw InputError("bundle manifest " + mpath + " is not as expected: " + e.what());
  }
  return b;
}

// ------------------------------------------------------------------------------------------
// the residual cache

struct Cache {
  std::string root;
  std::vector<std::string> files;     // shard per schedule entry
  std::vector<std::string> digests;   // their recorded sha256
  std::string source_sha256;          // identity of what the cache was computed from
};

Cache load_cache(const std::string& root, const Bundle& b) {
  Cache c;
  c.root = root;
  std::string ipath = join(root, "index.json");
  if (!is_dir(root)) throw InputError("cache folder '" + root + "' does not exist: run `device-train precompute` first");
  if (!is_file(ipath)) throw InputError("no cache in '" + root + "': run `device-train precompute` first");
  Value idx = read_json(ipath, "cache index");
  try {
    if (!idx.find("schedule")) throw InputError("no cache index in '" + root + "': run `device-train precompute` first");
    const Value null;
    const Value* source = idx.find("source");
    // what the Python side records: sha256 of json.dumps(source, sort_keys=True)
    c.source_sha256 = blockskip::sha256_hex(blockskip::json::dump_python_sorted(source ? *source : null));
    const Value* bundle_sha = source ? source->find("bundle") : nullptr;
    if (!bundle_sha || !bundle_sha->is_string() || bundle_sha->as_string() != b.manifest_sha256)
      throw InputError("this cache was computed for another bundle; precompute again into a new folder");
    size_t K = idx.at("schedule").at("entries").as_array("schedule.entries").size();
    if (K == 0) throw InputError("the cache's schedule is empty; precompute again");
    const Value* entries = idx.find("entries");
    size_t missing = 0;
    for (size_t k = 0; k < K; ++k) {
      const Value* rec = entries ? entries->find(std::to_string(k)) : nullptr;
      if (!rec || !is_file(join(root, rec->at("file").as_string("file")))) {
        ++missing;
        c.files.emplace_back();
        c.digests.emplace_back();
        continue;
      }
      c.files.push_back(join(root, rec->at("file").as_string()));
      c.digests.push_back(rec->at("sha256").as_string("sha256"));
    }
    if (missing)
      throw InputError("cache is incomplete (" + std::to_string(missing) + " of " + std::to_string(K) +
                       " entries missing); run `device-train precompute` again to finish it");
  } catch (const blockskip::json::Error& e) {
    throw InputError("cache index " + ipath + " is not as expected: " + e.what());
  }
  return c;
}

struct Entry {
  size_t index = 0;
  std::vector<std::vector<float>> tensors;  // in Bundle::inputs order
};

Entry load_entry(const Cache& c, const Bundle& b, size_t k, bool verify) {
  Entry e;
  e.index = k;
  SafetensorsFile f = [&] {
    try {
      return SafetensorsFile::read(c.files[k]);
    } catch (const std::exception& ex) {
      throw InputError(std::string("cache entry ") + std::to_string(k) + ": " + ex.what() +
                       "; delete it and run `device-train precompute` again to rebuild it");
    }
  }();
  if (verify && blockskip::sha256_hex(f.bytes().data(), f.bytes().size()) != c.digests[k])
    throw InputError("cache shard " + c.files[k] + " does not match its recorded sha256 (corrupt); delete it and "
                     "run `device-train precompute` again to rebuild it");
  for (const auto& name : b.inputs) {
    if (!f.has(name))
      throw InputError("cache shard " + c.files[k] + " has no tensor \"" + name + "\"; it was made for another "
                       "bundle: precompute again into a new folder");
    const auto& info = f.info(name);
    if (info.shape != b.shapes.at(name)) {
      throw InputError("cache shard " + c.files[k] + ": tensor \"" + name + "\" has shape " + shape_str(info.shape) +
                       ", the training program takes " + shape_str(b.shapes.at(name)));
    }
    try {
      e.tensors.push_back(f.floats(name));
    } catch (const std::exception& ex) {
      throw InputError(ex.what());
    }
  }
  return e;
}

// ------------------------------------------------------------------------------------------
// the training program

std::string error_text(Error e) {
  return "ExecuTorch error " + std::to_string(static_cast<int>(e));
}

struct Param {
  std::string name;              // peft name (as in the manifest's lora list)
  float* data = nullptr;         // the program's mutable weight, updated in place
  size_t numel = 0;
  std::vector<int64_t> shape;
  std::vector<float> grad;       // summed over the micro-steps
  AdamWState state;
};

class Program {
 public:
  Program(const Bundle& b) : bundle_(b) {
    module_ = std::make_unique<Module>(b.program, b.data, Module::LoadMode::Mmap);
    Error err = module_->load();
    if (err != Error::Ok)
      throw InputError("cannot load the training program " + b.program + " with " + b.data + " (" + error_text(err) +
                       "); export the bundle again");
    const std::string method = kMethod;
    err = module_->load_method(method);
    if (err != Error::Ok)
      throw InputError("cannot load method '" + method + "' of " + b.program + " (" + error_text(err) + ")");
    grad_start_ = index_of(kGradsIndex + method);
    param_start_ = index_of(kParamsIndex + method);
    auto fqn = module_->execute(kFqn + method);
    if (!fqn.ok()) throw InputError(std::string("the program has no ") + kFqn + method + " method: it is not a training program");
    std::vector<std::string> names;
    for (const auto& v : fqn.get()) {
      if (!v.isString()) throw InputError("the program's parameter names are not strings");
      names.emplace_back(v.toString());
    }
    auto meta = module_->method_meta(method);
    if (!meta.ok()) throw InputError("cannot read the metadata of method '" + method + "'");
    num_inputs_ = meta->num_inputs();
    if (num_inputs_ != b.inputs.size() + 1)
      throw InputError("the training program takes " + std::to_string(num_inputs_) + " inputs, the manifest lists " +
                       std::to_string(b.inputs.size() + 1));
    for (size_t i = 0; i <= b.inputs.size(); ++i) {
      const std::string name = i < b.inputs.size() ? b.inputs[i] : kLossScale;
      auto tm = meta->input_tensor_meta(i);
      if (!tm.ok() || tm->scalar_type() != executorch::aten::ScalarType::Float)
        throw InputError("input " + std::to_string(i) + " (" + name + ") of the training program is not a float32 tensor");
      std::vector<int64_t> have(tm->sizes().begin(), tm->sizes().end());
      std::vector<int64_t> want = i < b.inputs.size() ? b.shapes.at(name) : std::vector<int64_t>{1};
      if (have != want)
        throw InputError("input " + name + " of the training program has shape " + shape_str(have) +
                         ", the manifest says " + shape_str(want) + "; export the bundle again");
    }
    auto outs = module_->get_outputs(method);
    if (!outs.ok()) throw InputError("cannot read the outputs of method '" + method + "' (" + error_text(outs.error()) + ")");
    size_t n_out = outs->size();
    if (!(0 < grad_start_ && grad_start_ <= param_start_ && param_start_ <= n_out) ||
        param_start_ - grad_start_ != n_out - param_start_ || names.size() != n_out - param_start_)
      throw InputError("the training program's outputs are not [loss, gradients..., parameters...]");
    std::set<std::string> want(b.lora.begin(), b.lora.end()), got(names.begin(), names.end());
    if (want != got)
      throw InputError("the training program's parameters differ from the manifest's LoRA list; export again");
    for (size_t i = 0; i < names.size(); ++i) {
      Param p;
      p.name = names[i];
      params_.push_back(std::move(p));
    }
    bind(outs.get());
  }

  size_t num_params() const { return params_.size(); }
  std::vector<Param>& params() { return params_; }
  Param* find(const std::string& name) {
    for (auto& p : params_)
      if (p.name == name) return &p;
    return nullptr;
  }

  // One forward-backward pass; returns the (scaled) loss. Gradients are added into Param::grad
  // (assigned when `first`).
  float forward_backward(Entry& e, float loss_scale, bool first) {
    std::vector<executorch::extension::TensorPtr> keep;
    std::vector<EValue> in;
    keep.reserve(e.tensors.size() + 1);
    for (size_t i = 0; i < e.tensors.size(); ++i) {
      const auto& shape = bundle_.shapes.at(bundle_.inputs[i]);
      std::vector<executorch::aten::SizesType> sizes(shape.begin(), shape.end());
      keep.push_back(executorch::extension::from_blob(e.tensors[i].data(), sizes, executorch::aten::ScalarType::Float));
      in.emplace_back(*keep.back());
    }
    scale_ = loss_scale;
    keep.push_back(executorch::extension::from_blob(&scale_, {1}, executorch::aten::ScalarType::Float));
    in.emplace_back(*keep.back());
    auto out = module_->execute(kMethod, in);
    if (!out.ok())
      throw std::runtime_error("the training program failed on cache entry " + std::to_string(e.index) + " (" +
                               error_text(out.error()) + ")");
    const auto& o = out.get();
    if (!o[0].isTensor() || o[0].toTensor().numel() != 1) throw std::runtime_error("the program's first output is not a scalar loss");
    float loss = o[0].toTensor().const_data_ptr<float>()[0];
    for (size_t i = 0; i < params_.size(); ++i) {
      const auto& g = o[grad_start_ + i].toTensor();
      Param& p = params_[i];
      if (size_t(g.numel()) != p.numel) throw std::runtime_error("gradient of " + p.name + " has the wrong size");
      const float* gp = g.const_data_ptr<float>();
      if (first) {
        p.grad.assign(gp, gp + p.numel);
      } else {
        for (size_t j = 0; j < p.numel; ++j) p.grad[j] += gp[j];
      }
    }
    bind(o);
    return loss;
  }

 private:
  size_t index_of(const std::string& name) {
    auto r = module_->execute(name);
    if (!r.ok() || r->empty() || !r.get()[0].isInt())
      throw InputError("the program has no " + name + " method: it is not an ExecuTorch training program; export again");
    return static_cast<size_t>(r.get()[0].toInt());
  }

  // The parameters are the method's last outputs and alias its mutable weights.
  void bind(const std::vector<EValue>& outs) {
    for (size_t i = 0; i < params_.size(); ++i) {
      const EValue& v = outs[param_start_ + i];
      if (!v.isTensor()) throw InputError("parameter output " + params_[i].name + " is not a tensor");
      auto t = v.toTensor();
      if (t.scalar_type() != executorch::aten::ScalarType::Float)
        throw InputError("parameter " + params_[i].name + " is not float32");
      Param& p = params_[i];
      p.data = t.mutable_data_ptr<float>();
      p.numel = size_t(t.numel());
      p.shape.assign(t.sizes().begin(), t.sizes().end());
    }
  }

  const Bundle& bundle_;
  std::unique_ptr<Module> module_;
  size_t grad_start_ = 0, param_start_ = 0, num_inputs_ = 0;
  std::vector<Param> params_;
  float scale_ = 1.0f;
};

// ------------------------------------------------------------------------------------------
// checkpoint, LoRA, log

struct Log {
  Value plan;
  std::vector<double> losses, step_seconds;
  long long resumed_from = 0;
  std::string cache_source;
  std::string delegate;
  std::string lora;  // set once the LoRA is written

  Value to_json() const {
    Value v = Value::object();
    v.set("plan", plan);
    v.set("backend", Value::string("native"));
    Value l = Value::array(), s = Value::array();
    for (double x : losses) l.push_back(Value::number(x));
    for (double x : step_seconds) s.push_back(Value::number(x));
    v.set("losses", std::move(l));
    v.set("step_seconds", std::move(s));
    v.set("resumed_from", Value::integer(resumed_from));
    v.set("cache_source", Value::string(cache_source));
    v.set("delegate", Value::string(delegate));
    if (!lora.empty()) v.set("lora", Value::string(lora));
    return v;
  }
};

std::string python_dumps(const Value& v) {
  blockskip::json::DumpOptions o;
  o.python_separators = true;
  return blockskip::json::dump(v, o);
}

void save_checkpoint(const std::string& dir, Program& prog, long long step, const Log& log) {
  make_dirs(dir, "checkpoint folder");
  std::vector<blockskip::TensorOut> t;
  std::vector<float> steps;
  steps.reserve(prog.num_params());
  for (auto& p : prog.params()) steps.push_back(p.state.step);
  size_t i = 0;
  for (auto& p : prog.params()) {
    t.push_back({"param." + p.name, p.shape, p.data});
    if (!p.state.exp_avg.empty()) {
      t.push_back({"opt.exp_avg." + p.name, p.shape, p.state.exp_avg.data()});
      t.push_back({"opt.exp_avg_sq." + p.name, p.shape, p.state.exp_avg_sq.data()});
      t.push_back({"opt.step." + p.name, {1}, &steps[i]});
    }
    ++i;
  }
  blockskip::write_safetensors(join(dir, "checkpoint.safetensors"), std::move(t),
                               {{"step", std::to_string(step)}, {"log", python_dumps(log.to_json())}});
}

// Restores weights, optimizer state and the log; returns the step to continue from (0: none).
long long load_checkpoint(const std::string& dir, Program& prog, Log& log) {
  std::string path = join(dir, "checkpoint.safetensors");
  if (!is_file(path)) return 0;
  SafetensorsFile f = [&] {
    try {
      return SafetensorsFile::read(path);
    } catch (const std::exception& e) {
      throw InputError("checkpoint " + path + " is unreadable (" + e.what() + "); delete it to start over");
    }
  }();
  const std::string* step_s = f.meta("step");
  const std::string* log_s = f.meta("log");
  if (!step_s || !log_s) throw InputError("checkpoint " + path + " has no step/log metadata; delete it to start over");
  Value saved;
  long long step = 0;
  try {
    saved = blockskip::json::parse(*log_s);
    step = std::stoll(*step_s);
  } catch (const std::exception& e) {
    throw InputError("checkpoint " + path + " is unreadable (" + e.what() + "); delete it to start over");
  }
  const Value* src = saved.find("cache_source");
  if (!src || !src->is_string() || src->as_string() != log.cache_source)
    throw InputError(path + " belongs to a training run on other photos or another bundle; use a new output folder "
                     "(-o), or delete " + dir + " to start over");
  for (const auto& kv : f.tensors()) {
    if (kv.first.rfind("param.", 0) == 0 && !prog.find(kv.first.substr(6)))
      throw InputError("checkpoint " + path + " does not belong to this bundle's plan; use another -o");
  }
  try {
    for (auto& p : prog.params()) {
      f.copy_floats("param." + p.name, p.data, p.numel);
      if (f.has("opt.exp_avg." + p.name)) {
        p.state.exp_avg = f.floats("opt.exp_avg." + p.name);
        p.state.exp_avg_sq = f.floats("opt.exp_avg_sq." + p.name);
        p.state.step = f.floats("opt.step." + p.name).at(0);
        if (p.state.exp_avg.size() != p.numel || p.state.exp_avg_sq.size() != p.numel)
          throw std::runtime_error("optimizer state of " + p.name + " has the wrong size");
      } else if (step > 0) {
        throw std::runtime_error("no optimizer state for " + p.name);
      }
    }
  } catch (const std::exception& e) {
    throw InputError("checkpoint " + path + " does not belong to this bundle's plan (" + e.what() + "); use another -o");
  }
  auto numbers = [&](const char* key, std::vector<double>& out) {
    out.clear();
    if (const Value* a = saved.find(key))
      for (const auto& x : a->as_array(key)) out.push_back(x.as_double(key));
    if (out.size() > size_t(step)) out.resize(size_t(step));
  };
  try {
    numbers("losses", log.losses);
    numbers("step_seconds", log.step_seconds);
  } catch (const blockskip::json::Error& e) {
    throw InputError("checkpoint " + path + " has a malformed log (" + e.what() + "); delete it to start over");
  }
  return step;
}

std::string diffusers_name(const std::string& peft) {
  std::string n = peft;
  size_t at = n.find(".default.");
  if (at != std::string::npos) n.replace(at, 9, ".");
  return "transformer." + n;
}

void save_lora(const std::string& path, Program& prog, const Bundle& b) {
  std::vector<std::vector<float>> scaled;
  scaled.reserve(prog.num_params());
  std::vector<blockskip::TensorOut> t;
  const float scale = static_cast<float>(b.lora_scale);
  for (auto& p : prog.params()) {
    const float* data = p.data;
    if (p.name.find(".lora_B.") != std::string::npos) {
      scaled.emplace_back(p.data, p.data + p.numel);
      for (float& x : scaled.back()) x *= scale;
      data = scaled.back().data();
    }
    t.push_back({diffusers_name(p.name), p.shape, data});
  }
  blockskip::write_safetensors(path, std::move(t), b.lora_metadata);
}

void write_log(const std::string& path, const Log& log) {
  blockskip::json::DumpOptions o;
  o.indent = 1;
  blockskip::atomic_write(path, blockskip::json::dump(log.to_json(), o));
}

// ------------------------------------------------------------------------------------------

int run(const Options& opt) {
  Bundle b = load_bundle(opt.bundle, opt.verify);
  Cache cache = load_cache(opt.cache, b);
  make_dirs(opt.out, "output folder");
  const size_t K = cache.files.size();
  const long long steps = b.steps, ga = b.grad_accum;

  Program prog(b);
  for (auto& p : prog.params()) p.grad.assign(p.numel, 0.0f);
  Log log;
  log.plan = b.plan;
  log.cache_source = cache.source_sha256;
  log.delegate = b.delegate;
  const std::string ckpt_dir = join(opt.out, "checkpoint");
  long long start = load_checkpoint(ckpt_dir, prog, log);
  if (start > steps) start = steps;
  log.resumed_from = start;
  if (start && !opt.quiet) std::printf("resuming from step %lld (%s)\n", start, ckpt_dir.c_str());

  std::vector<size_t> order;
  order.reserve(size_t(steps * ga));
  for (long long s = 0; s < steps; ++s)
    for (long long j = 0; j < ga; ++j) order.push_back(size_t((s * ga + j) % (long long)K));
  size_t pos = size_t(start * ga);
  auto fetch = [&](size_t k) {
    return std::async(std::launch::async, [&cache, &b, k, v = opt.verify] { return load_entry(cache, b, k, v); });
  };
  std::future<Entry> next;
  if (pos < order.size()) next = fetch(order[pos]);

  const long long end = opt.stop_after < 0 ? steps : std::max(start, std::min(steps, opt.stop_after));
  const float scale = static_cast<float>(1.0 / double(ga));
  for (long long step = start; step < end; ++step) {
    auto t0 = std::chrono::steady_clock::now();
    double total = 0.0;
    for (long long j = 0; j < ga; ++j) {
      Entry e = next.get();
      ++pos;
      if (pos < order.size()) next = fetch(order[pos]);  // prefetch while this entry trains
      float out = prog.forward_backward(e, scale, j == 0);
      total += (double(out) / double(scale)) / double(ga);
    }
    for (auto& p : prog.params()) blockskip::adamw_update(p.data, p.grad.data(), p.numel, p.state, b.adamw);
    double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    log.losses.push_back(total);
    log.step_seconds.push_back(dt);
    if (!opt.quiet) {
      std::printf("step %lld/%lld  loss %.6f  %.3f s\n", step + 1, steps, total, dt);
      std::fflush(stdout);
    }
    if ((step + 1) % b.checkpoint_every == 0 || step + 1 == steps) save_checkpoint(ckpt_dir, prog, step + 1, log);
  }
  if (next.valid()) {
    try {
      next.get();  // let a prefetch still in flight finish before its inputs go away
    } catch (...) {
    }
  }
  if (end == steps) {
    std::string lora = join(opt.out, "lora.safetensors");
    save_lora(lora, prog, b);
    log.lora = lora;
    if (!opt.quiet) std::printf("LoRA: %s\n", lora.c_str());
  } else if (!opt.quiet) {
    std::printf("stopped after step %lld of %lld; run again to resume\n", end, steps);
  }
  write_log(join(opt.out, "train_log.json"), log);
  return 0;
}

}  // namespace

namespace {

// ExecuTorch's log lines: errors always, the runtime's info/debug chatter only when
// BLOCKSKIP_NATIVE_LOG is set.
void emit_log(et_timestamp_t, et_pal_log_level_t level, const char* filename, const char*, size_t line,
              const char* message, size_t length) {
  static const bool verbose = std::getenv("BLOCKSKIP_NATIVE_LOG") != nullptr;
  if (!verbose && level != kError && level != kFatal) return;
  const char* base = filename ? std::strrchr(filename, '/') : nullptr;
  std::fprintf(stderr, "executorch %c %s:%zu] %.*s\n", char(level), base ? base + 1 : (filename ? filename : "?"), line,
               int(length), message);
}

}  // namespace

int main(int argc, char** argv) {
  executorch::runtime::register_pal(executorch::runtime::PalImpl::create(emit_log, __FILE__));
  Options opt;
  try {
    opt = parse_args(argc, argv);
  } catch (const UsageError& e) {
    std::string usage(kUsage);
    std::fprintf(stderr, "%s\n%s: error: %s\n", usage.substr(0, usage.find('\n')).c_str(), kProg, e.what());
    return 2;
  }
  try {
    return run(opt);
  } catch (const InputError& e) {
    std::fprintf(stderr, "%s: error: %s\n", kProg, e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: error: %s\n", kProg, e.what());
    return 1;
  }
}
