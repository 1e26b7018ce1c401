#include "stream.h"

#include <stdlib.h>

#include <map>
#include <set>
#include <stdexcept>
#include <utility>
#include <vector>

#include "formats.h"
#include "programs.h"
#include "safetensors.h"
#include "weights.h"

namespace blockskip {

namespace {

using json::Value;

const std::string kState = formats::kState, kGrad = formats::kGrad, kLora = formats::kLora, kOut = formats::kOut,
                  kGradIn = formats::kGradIn, kLoraGrad = formats::kLoraGrad, kEntryIn = formats::kEntryIn,
                  kEntryConst = formats::kEntryConst, kEntryDelta = formats::kEntryDelta, kHidden = formats::kStateHidden;

bool starts(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }

// `attn.to_q.lora_A` of `transformer_blocks.3` -> `transformer_blocks.3.attn.to_q.lora_A.default.weight`
std::string peft_name(const std::string& block_path, const std::string& rel) {
  size_t dot = rel.rfind('.');
  std::string module = dot == std::string::npos ? "" : rel.substr(0, dot);
  std::string ab = dot == std::string::npos ? rel : rel.substr(dot + 1);
  return block_path + "." + module + "." + ab + ".default.weight";
}

// `prefix<name>` -> each tensor of `t`
Feed refs(const FTensors& t, const std::string& prefix) {
  Feed f;
  for (const auto& kv : t) f[prefix + kv.first] = TensorRef{kv.second.data.data(), "float32", &kv.second.shape};
  return f;
}

class StreamedSpan : public Trainer {
 public:
  StreamedSpan(const Bundle& b, const std::string& out_dir) {
    std::string head_file, init_file;
    try {
      const Value& plan = b.plan;
      const Value* w = plan.find("weights");
      const Value* pf = plan.find("prefetch");
      const Value* st = plan.find("stash");
      const bool resident = w && w->as_string("plan.weights") == "resident";
      const bool prefetch = !pf || pf->as_bool("plan.prefetch");
      if (st && st->as_string("plan.stash") == "disk") {
        stash_dir_ = join(out_dir, "stash");
        Stash::remove_stale(stash_dir_);  // what a killed run left (the folders of a finished step are gone)
      }
      adamw_ = AdamWConfig{b.lr, 0.9, 0.999, 1e-8, b.weight_decay};

      const Value& sec = b.manifest.at("stream");
      storage_ = sec.at("storage").as_string("stream.storage");
      for (const auto& p : sec.at("block_paths").as_array("stream.block_paths")) paths_.push_back(p.as_string());
      const auto& files = b.manifest.at("model").at("blocks").as_array("model.blocks");
      const Value& shapes = sec.at("shapes");
      for (const auto& t : sec.at("train").as_array("stream.train")) {
        const auto& pair = t.as_array("stream.train entry");
        if (pair.size() != 2) throw InputError("stream.train entries should be [block, shape]; export again");
        Block blk;
        blk.index = int(pair[0].as_int("block"));
        blk.shape = pair[1].as_string("shape");
        if (!shapes.find(blk.shape))
          throw InputError("the bundle's stream section names an unknown block shape '" + blk.shape + "'; export again");
        if (blk.index < 0 || size_t(blk.index) >= paths_.size() || size_t(blk.index) >= files.size() ||
            !files[size_t(blk.index)].is_string())
          throw InputError("the bundle has no weights for block " + std::to_string(blk.index) + "; export it again");
        blocks_.push_back(std::move(blk));
      }
      if (blocks_.empty()) throw InputError("the bundle's streamed span trains no block; export it again");
      // every file this mode reads, checked once before the run
      for (const auto& blk : blocks_)
        if (!block_files_.count(blk.index))
          block_files_[blk.index] = b.listed(files[size_t(blk.index)].as_string());
      head_file = b.listed(b.manifest.at("model").at("head").as_string("model.head"));
      init_file = b.listed(sec.at("lora_init").as_string("stream.lora_init"));

      std::vector<std::pair<std::string, std::string>> wanted;
      for (const auto& blk : blocks_) {
        wanted.emplace_back(blk.shape, "forward");
        wanted.emplace_back(blk.shape, "vjp");
      }
      wanted.emplace_back("head", "head");
      programs_ = std::make_unique<BlockPrograms>(sec, wanted, [&b](const std::string& rel) { return b.listed(rel); });
      weights_ = std::make_unique<WeightSource>(
          [this](int i) { return read_weights(block_files_.at(i), paths_[size_t(i)]); }, resident, prefetch);
    } catch (const json::Error& e) {
      throw InputError("bundle manifest " + join(b.root, formats::kManifest) + " is not as expected: " + e.what());
    }
    head_w_ = read_weights(head_file, "");
    load_lora(init_file);
  }

  void check_entry(const Entry& e) const override {
    for (const std::string& name : {kEntryIn + kHidden, std::string(formats::kEntryTarget)})
      if (!e.tensors.count(name))
        throw InputError("cache shard " + e.file + " has no tensor \"" + name + "\"; it was made for another "
                         "bundle: precompute again into a new folder");
  }

  double loss_and_grad(const Entry& e, double scale) override {
    const Feed consts = const_feed(e);
    std::vector<int> order;
    for (const auto& blk : blocks_) order.push_back(blk.index);
    for (auto it = blocks_.rbegin(); it != blocks_.rend(); ++it) order.push_back(it->index);
    weights_->plan(order);
    std::string folder;
    if (!stash_dir_.empty()) {
      make_dirs(stash_dir_, "stash folder");
      std::string tmpl = join(stash_dir_, "stash-XXXXXX");
      if (!::mkdtemp(&tmpl[0])) throw InputError("cannot create a stash folder in " + stash_dir_);
      folder = tmpl;
    }
    Stash stash(folder);
    auto state = std::make_shared<const FTensors>(initial_state(e));
    for (size_t k = 0; k < blocks_.size(); ++k) {
      const BlockWeights& w = weights_->get(blocks_[k].index);
      stash.put(k, state);
      state = forward(blocks_[k], *state, consts, w, e);
    }
    FTensors grads;
    const float loss = head(*state, consts, e, float(scale), grads);
    state.reset();
    const bool assign = fresh_grads_;
    std::vector<bool> got(params_.size(), false);
    for (size_t k = blocks_.size(); k-- > 0;) {
      const Block& blk = blocks_[k];
      const BlockWeights& w = weights_->get(blk.index);
      auto x = stash.pop(k);
      const Feed sf = refs(*x, kState), gf = refs(grads, kGrad);
      FTensors out = programs_->run(blk.shape, "vjp", {&sf, &consts, &gf, &w.feed, &blk.lora_feed});
      x.reset();
      FTensors g_in;
      for (auto& kv : out) {
        if (starts(kv.first, kGradIn)) {
          g_in[kv.first.substr(kGradIn.size())] = std::move(kv.second);
        } else if (starts(kv.first, kLoraGrad)) {
          auto it = blk.lora.find(kv.first.substr(kLoraGrad.size()));
          if (it == blk.lora.end()) continue;
          Param& p = params_[it->second];
          const std::vector<float>& g = kv.second.data;
          if (g.size() != p.numel) throw std::runtime_error("the LoRA gradient of " + p.name + " has the wrong size");
          if (got[it->second]) throw std::runtime_error("two LoRA gradients for " + p.name);
          got[it->second] = true;
          if (assign) {
            p.grad = g;
          } else {
            for (size_t j = 0; j < p.numel; ++j) p.grad[j] += g[j];
          }
        }
      }
      grads = std::move(g_in);
    }
    for (size_t j = 0; j < params_.size(); ++j)
      if (!got[j]) throw InputError("the VJP programs give no gradient for " + params_[j].name + "; export the bundle again");
    fresh_grads_ = false;
    return double(loss) / scale;
  }

  double eval_loss(const Entry& e) override {
    const Feed consts = const_feed(e);
    std::vector<int> order;
    for (const auto& blk : blocks_) order.push_back(blk.index);
    weights_->plan(order);
    auto state = std::make_shared<const FTensors>(initial_state(e));
    for (const auto& blk : blocks_) state = forward(blk, *state, consts, weights_->get(blk.index), e);
    FTensors grads;
    return double(head(*state, consts, e, 1.0f, grads));
  }

  std::vector<Param>& params() override { return params_; }
  const AdamWConfig& adamw() const override { return adamw_; }

  void info(Value& log) const override {
    log.set("span", Value::string("streamed"));
    log.set("weight_file_reads", Value::integer(weights_->reads()));
    log.set("storage", Value::string(storage_));
  }

 private:
  struct Block {
    int index = 0;
    std::string shape;
    std::map<std::string, size_t> lora;  // rel -> index into params_
    Feed lora_feed;                      // "lora.<rel>" -> the parameter's values
  };

  void load_lora(const std::string& init_file) {
    SafetensorsFile init = [&] {
      try {
        return SafetensorsFile::read(init_file);
      } catch (const std::exception& e) {
        throw InputError(std::string(e.what()) + "; export the bundle again");
      }
    }();
    std::map<std::string, size_t> index;
    values_.reserve(init.tensors().size());
    for (const auto& kv : init.tensors()) {
      values_.push_back(init.to_floats(kv.first));
      Param p;
      p.name = kv.first;
      p.shape = kv.second.shape;
      p.numel = values_.back().size();
      p.data = values_.back().data();
      p.grad.assign(p.numel, 0.0f);
      index[p.name] = params_.size();
      params_.push_back(std::move(p));
    }
    std::set<std::string> listed;
    for (auto& blk : blocks_) {
      for (const IoRec& io : programs_->inputs(blk.shape, "forward")) {
        if (!starts(io.name, kLora)) continue;
        const std::string rel = io.name.substr(kLora.size());
        const std::string peft = peft_name(paths_[size_t(blk.index)], rel);
        auto it = index.find(peft);
        if (it == index.end()) throw InputError("the bundle's initial LoRA lacks " + peft + "; export it again");
        const Param& p = params_[it->second];
        if (p.shape != io.shape || io.dtype != "float32")
          throw InputError("the bundle's initial LoRA " + peft + " does not fit its program; export it again");
        blk.lora[rel] = it->second;
        blk.lora_feed[io.name] = TensorRef{p.data, "float32", &p.shape};
        listed.insert(peft);
      }
    }
    if (listed.size() != params_.size())
      throw InputError("the bundle's initial LoRA does not match its trained blocks; export it again");
  }

  FTensors initial_state(const Entry& e) const {
    FTensors s;
    for (const auto& kv : e.tensors)
      if (starts(kv.first, kEntryIn)) s[kv.first.substr(kEntryIn.size())] = kv.second;
    return s;
  }

  Feed const_feed(const Entry& e) const {
    Feed f;
    for (const auto& kv : e.tensors)
      if (starts(kv.first, kEntryConst)) f[kv.first] = TensorRef{kv.second.data.data(), "float32", &kv.second.shape};
    return f;
  }

  // The block's forward program, then a skipped span's residual added after it.
  std::shared_ptr<const FTensors> forward(const Block& blk, const FTensors& state, const Feed& consts,
                                          const BlockWeights& w, const Entry& e) {
    const Feed sf = refs(state, kState);
    FTensors out = programs_->run(blk.shape, "forward", {&sf, &consts, &w.feed, &blk.lora_feed});
    auto next = std::make_shared<FTensors>();
    for (auto& kv : out)
      if (starts(kv.first, kOut)) (*next)[kv.first.substr(kOut.size())] = std::move(kv.second);
    for (auto& kv : *next) {
      auto d = e.tensors.find(kEntryDelta + std::to_string(blk.index + 1) + "." + kv.first);
      if (d == e.tensors.end()) continue;
      std::vector<float>& s = kv.second.data;
      if (d->second.data.size() != s.size())
        throw InputError("cache shard " + e.file + ": " + d->first + " has shape " + shape_str(d->second.shape) +
                         ", the state is " + shape_str(kv.second.shape) + "; it was made for another bundle");
      for (size_t j = 0; j < s.size(); ++j) s[j] = s[j] + d->second.data[j];
    }
    return next;
  }

  // The head program: returns the loss times `scale`; `grads` becomes the gradient at each state
  // tensor (the head's at `hidden`, zeros elsewhere).
  float head(const FTensors& state, const Feed& consts, const Entry& e, float scale, FTensors& grads) {
    auto hidden = state.find(kHidden);
    if (hidden == state.end()) throw InputError("the span's last block gives no hidden state; export the bundle again");
    const FTensor& target = e.tensors.at(formats::kEntryTarget);
    scale_ = scale;
    const std::vector<int64_t> one{1};
    Feed f{{kState + kHidden, TensorRef{hidden->second.data.data(), "float32", &hidden->second.shape}},
           {formats::kEntryTarget, TensorRef{target.data.data(), "float32", &target.shape}},
           {formats::kLossScale, TensorRef{&scale_, "float32", &one}}};
    FTensors out = programs_->run("head", "head", {&f, &consts, &head_w_->feed});
    auto loss = out.find(formats::kLoss);
    auto g = out.find(kGradIn + kHidden);
    if (loss == out.end() || loss->second.data.size() != 1 || g == out.end())
      throw InputError("the head program does not give loss and grad_in.hidden; export the bundle again");
    grads.clear();
    for (const auto& kv : state)
      grads[kv.first] = kv.first == kHidden ? std::move(g->second)
                                              : FTensor{kv.second.shape, std::vector<float>(kv.second.data.size(), 0.0f)};
    return loss->second.data[0];
  }

  AdamWConfig adamw_;
  std::string storage_, stash_dir_;
  std::vector<std::string> paths_;
  std::map<int, std::string> block_files_;
  std::vector<Block> blocks_;
  std::unique_ptr<BlockPrograms> programs_;
  std::unique_ptr<WeightSource> weights_;
  std::shared_ptr<BlockWeights> head_w_;
  std::vector<std::vector<float>> values_;  // the LoRA (Param::data points here)
  std::vector<Param> params_;
  float scale_ = 1.0f;
};

}  // namespace

std::unique_ptr<Trainer> make_streamed_trainer(const Bundle& b, const std::string& out_dir) {
  return std::make_unique<StreamedSpan>(b, out_dir);
}

}  // namespace blockskip
