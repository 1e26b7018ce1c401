// The resident span's trainer. The program's `forward` returns [loss, gradients..., parameters...];
// the methods __et_training_gradients_index_forward / __et_training_parameters_index_forward say
// where the gradients and the parameters start and __et_training_fqn_forward names them. The
// parameter outputs alias the program's mutable weights, so AdamW updates them in place.

#include "resident.h"

#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

#include "formats.h"
#include "programs.h"

namespace blockskip {

namespace {

using executorch::extension::Module;
using executorch::runtime::EValue;
using executorch::runtime::Error;
using json::Value;

const char* kGradsIndex = "__et_training_gradients_index_";
const char* kParamsIndex = "__et_training_parameters_index_";
const char* kFqn = "__et_training_fqn_";
const char* kMethod = "forward";
const char* kLossScale = formats::kLossScale;

class ResidentTrainer : public Trainer {
 public:
  explicit ResidentTrainer(const Bundle& b) {
    const Value* pte = b.manifest.find("pte");  // load_bundle checked that pte.train is there
    std::vector<std::string> lora;
    std::string program, data;
    try {
      const Value& t = pte->at("train");
      adamw_.lr = b.lr;
      const Value& opt = t.at("optimizer");
      if (const Value* ty = opt.find("type"); ty && ty->as_string("optimizer.type") != "adamw")
        throw InputError("the bundle's optimizer is " + ty->as_string() + "; this runner trains with AdamW only");
      const auto& betas = opt.at("betas").as_array("optimizer.betas");
      if (betas.size() != 2) throw InputError("optimizer.betas should hold two numbers");
      adamw_.beta1 = betas[0].as_double("beta1");
      adamw_.beta2 = betas[1].as_double("beta2");
      adamw_.eps = opt.at("eps").as_double("optimizer.eps");
      adamw_.weight_decay = opt.at("weight_decay").as_double("optimizer.weight_decay");
      for (const auto& n : t.at("inputs").as_array("pte.train.inputs")) inputs_.push_back(n.as_string("input name"));
      if (inputs_.empty() || inputs_.back() != kLossScale)
        throw InputError("pte.train.inputs should end with loss_scale; export the bundle again");
      inputs_.pop_back();
      const Value& shapes = t.at("shapes");
      for (const auto& n : inputs_) {
        std::vector<int64_t> s;
        for (const auto& d : shapes.at(n).as_array("shape of " + n)) s.push_back(d.as_int("dimension"));
        shapes_[n] = s;
      }
      for (const auto& n : t.at("lora").as_array("pte.train.lora")) lora.push_back(n.as_string("LoRA name"));
      if (lora.empty()) throw InputError("the bundle lists no LoRA parameters");
      program = b.listed(t.at("file").as_string("pte.train.file"));
      data = b.listed(t.at("data").as_string("pte.train.data"));
    } catch (const json::Error& e) {
      throw InputError("bundle manifest " + join(b.root, formats::kManifest) + " is not as expected: " + e.what());
    }
    load(program, data, lora);
  }

  void check_entry(const Entry& e) const override {
    for (const auto& name : inputs_) {
      auto it = e.tensors.find(name);
      if (it == e.tensors.end())
        throw InputError("cache shard " + e.file + " has no tensor \"" + name + "\"; it was made for another "
                         "bundle: precompute again into a new folder");
      if (it->second.shape != shapes_.at(name))
        throw InputError("cache shard " + e.file + ": tensor \"" + name + "\" has shape " +
                         shape_str(it->second.shape) + ", the training program takes " + shape_str(shapes_.at(name)));
    }
  }

  double loss_and_grad(const Entry& e, double scale) override {
    float loss = run(e, float(scale), true);
    return double(loss) / scale;
  }

  double eval_loss(const Entry& e) override { return double(run(e, 1.0f, false)); }

  std::vector<Param>& params() override { return params_; }
  const AdamWConfig& adamw() const override { return adamw_; }
  void info(Value&) const override {}

 private:
  void load(const std::string& program, const std::string& data, const std::vector<std::string>& lora) {
    module_ = std::make_unique<Module>(program, data, Module::LoadMode::Mmap);
    Error err = module_->load();
    if (err != Error::Ok)
      throw InputError("cannot load the training program " + program + " with " + data + " (" + et_error_text(err) +
                       "); export the bundle again");
    const std::string method = kMethod;
    err = module_->load_method(method);
    if (err != Error::Ok)
      throw InputError("cannot load method '" + method + "' of " + program + " (" + et_error_text(err) + ")");
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
    size_t num_inputs = meta->num_inputs();
    if (num_inputs != inputs_.size() + 1)
      throw InputError("the training program takes " + std::to_string(num_inputs) + " inputs, the manifest lists " +
                       std::to_string(inputs_.size() + 1));
    for (size_t i = 0; i <= inputs_.size(); ++i) {
      const std::string name = i < inputs_.size() ? inputs_[i] : kLossScale;
      auto tm = meta->input_tensor_meta(i);
      if (!tm.ok() || tm->scalar_type() != executorch::aten::ScalarType::Float)
        throw InputError("input " + std::to_string(i) + " (" + name + ") of the training program is not a float32 tensor");
      std::vector<int64_t> have(tm->sizes().begin(), tm->sizes().end());
      std::vector<int64_t> want = i < inputs_.size() ? shapes_.at(name) : std::vector<int64_t>{1};
      if (have != want)
        throw InputError("input " + name + " of the training program has shape " + shape_str(have) +
                         ", the manifest says " + shape_str(want) + "; export the bundle again");
    }
    auto outs = module_->get_outputs(method);
    if (!outs.ok()) throw InputError("cannot read the outputs of method '" + method + "' (" + et_error_text(outs.error()) + ")");
    size_t n_out = outs->size();
    if (!(0 < grad_start_ && grad_start_ <= param_start_ && param_start_ <= n_out) ||
        param_start_ - grad_start_ != n_out - param_start_ || names.size() != n_out - param_start_)
      throw InputError("the training program's outputs are not [loss, gradients..., parameters...]");
    std::set<std::string> want(lora.begin(), lora.end()), got(names.begin(), names.end());
    if (want != got)
      throw InputError("the training program's parameters differ from the manifest's LoRA list; export again");
    for (const auto& n : names) {
      Param p;
      p.name = n;
      params_.push_back(std::move(p));
    }
    bind(outs.get());
    for (auto& p : params_) p.grad.assign(p.numel, 0.0f);
  }

  // One forward-backward pass; returns the (scaled) loss. With `grads`, the gradients go into
  // Param::grad (assigned on the first micro-step after an update, added after that).
  float run(const Entry& e, float loss_scale, bool grads) {
    std::vector<executorch::extension::TensorPtr> keep;
    std::vector<EValue> in;
    keep.reserve(inputs_.size() + 1);
    for (const auto& name : inputs_) {
      const FTensor& t = e.tensors.at(name);
      std::vector<executorch::aten::SizesType> sizes(t.shape.begin(), t.shape.end());
      keep.push_back(executorch::extension::from_blob(const_cast<float*>(t.data.data()), sizes,
                                                      executorch::aten::ScalarType::Float));
      in.emplace_back(*keep.back());
    }
    scale_ = loss_scale;
    keep.push_back(executorch::extension::from_blob(&scale_, {1}, executorch::aten::ScalarType::Float));
    in.emplace_back(*keep.back());
    auto out = module_->execute(kMethod, in);
    if (!out.ok())
      throw std::runtime_error("the training program failed on cache entry " + std::to_string(e.index) + " (" +
                               et_error_text(out.error()) + ")");
    const auto& o = out.get();
    if (!o[0].isTensor() || o[0].toTensor().numel() != 1) throw std::runtime_error("the program's first output is not a scalar loss");
    float loss = o[0].toTensor().const_data_ptr<float>()[0];
    if (grads) {
      for (size_t i = 0; i < params_.size(); ++i) {
        const auto& g = o[grad_start_ + i].toTensor();
        Param& p = params_[i];
        if (size_t(g.numel()) != p.numel) throw std::runtime_error("gradient of " + p.name + " has the wrong size");
        const float* gp = g.const_data_ptr<float>();
        if (fresh_grads_) {
          p.grad.assign(gp, gp + p.numel);
        } else {
          for (size_t j = 0; j < p.numel; ++j) p.grad[j] += gp[j];
        }
      }
      fresh_grads_ = false;
    }
    bind(o);
    return loss;
  }

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

  std::vector<std::string> inputs_;  // entry tensors in the method's order (loss_scale excluded)
  std::map<std::string, std::vector<int64_t>> shapes_;
  AdamWConfig adamw_;
  std::unique_ptr<Module> module_;
  size_t grad_start_ = 0, param_start_ = 0;
  std::vector<Param> params_;
  float scale_ = 1.0f;
};

}  // namespace

std::unique_ptr<Trainer> make_resident_trainer(const Bundle& b) {
  return std::make_unique<ResidentTrainer>(b);
}

}  // namespace blockskip
