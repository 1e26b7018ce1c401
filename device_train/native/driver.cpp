#include "driver.h"

#include <algorithm>
#include <chrono>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <future>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "bundle.h"
#include "common.h"
#include "formats.h"
#include "json.h"
#include "lora_layouts.h"
#include "resident.h"
#include "safetensors.h"
#include "schema.h"
#include "schemas.h"
#include "sha256.h"
#include "stream.h"
#include "trainer.h"

namespace blockskip {

namespace {

using json::Value;

const char* kCheckpoint = formats::kCheckpoint;

struct Log {
  Value plan;
  std::vector<double> losses, step_seconds;
  long long resumed_from = 0;
  std::string cache_source, delegate, lora;  // lora: set once the LoRA is written
  Value extra = Value::object();             // what the run adds at the end (trainer info, peak RSS)
  bool has_loss_without_lora = false;        // the first entry's loss before any update (the no-op check)
  double loss_without_lora = 0.0;

  // `timings`: with step_seconds (train_log.json); a checkpoint's log has none, so two identical runs
  // write identical checkpoints
  Value to_json(bool timings = true) const {
    Value v = Value::object();
    v.set("plan", plan);
    v.set("backend", Value::string("native"));
    Value l = Value::array(), s = Value::array();
    for (double x : losses) l.push_back(Value::number(x));
    for (double x : step_seconds) s.push_back(Value::number(x));
    v.set(formats::kLogLosses, std::move(l));
    if (timings) v.set(formats::kLogStepSeconds, std::move(s));
    v.set("resumed_from", Value::integer(resumed_from));
    v.set(formats::kLogCacheSource, Value::string(cache_source));
    v.set("delegate", Value::string(delegate));
    for (const auto& kv : extra.as_object()) v.set(kv.first, kv.second);
    if (has_loss_without_lora) v.set(formats::kLogLossWithoutLora, Value::number(loss_without_lora));
    if (!lora.empty()) v.set("lora", Value::string(lora));
    return v;
  }
};

std::string number_text(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  return json::format_double(x);
}

// A checkpoint of the ORT backend (its own format) in OUT: say which backend resumes it.
void refuse_foreign_checkpoint(const std::string& ckpt_dir) {
  const std::string p = join(ckpt_dir, "ort_checkpoint");
  if (is_file(p))
    throw InputError(p + " was written by the ort backend; resume with --backend ort, or use a new output folder (-o)");
}

void save_checkpoint(const std::string& dir, std::vector<Param>& params, long long step, const Log& log) {
  make_dirs(dir, "checkpoint folder");
  std::vector<TensorOut> t;
  std::vector<float> steps;
  steps.reserve(params.size());
  for (auto& p : params) steps.push_back(p.state.step);
  size_t i = 0;
  for (auto& p : params) {
    t.push_back({formats::kParam + p.name, p.shape, p.data});
    if (!p.state.exp_avg.empty()) {
      t.push_back({formats::kOptExpAvg + p.name, p.shape, p.state.exp_avg.data()});
      t.push_back({formats::kOptExpAvgSq + p.name, p.shape, p.state.exp_avg_sq.data()});
      t.push_back({formats::kOptStep + p.name, {1}, &steps[i]});
    }
    ++i;
  }
  // never a checkpoint holding a NaN or an Inf: the last good one stays
  for (const auto& x : t)
    if (!std::all_of(x.data, x.data + numel(x.shape), [](float v) { return std::isfinite(v); }))
      throw InputError("step " + std::to_string(step) + " made " + x.name + " non-finite; the checkpoint was not "
                       "written (the last one is kept). Lower --lr when exporting, or check the cache");
  // the integrity record: sha256 of the file the same tensors and the other metadata make
  std::vector<std::pair<std::string, std::string>> meta = {
      {formats::kMetaStep, std::to_string(step)}, {formats::kMetaLog, json::dump_python_sorted(log.to_json(false))}};
  meta.emplace_back(formats::kMetaSha256, sha256_hex(safetensors_bytes(t, meta)));
  write_safetensors(join(dir, kCheckpoint), std::move(t), meta);
}

}  // namespace

void check_checkpoint_file(const SafetensorsFile& f, const std::string& path, const std::string& advice) {
  Value header = f.header();
  if (!header.find("__metadata__")) header.set("__metadata__", Value::object());  // as runtime/checkpoint.py reads it
  schema::check_document(formats::kSchemaCheckpoint, header, "checkpoint " + path, advice);
  if (f.canonical_sha256(formats::kMetaSha256) != *f.meta(formats::kMetaSha256))
    throw FormatError("checkpoint " + path + " does not match its integrity record (" + formats::kMetaSha256 +
                      "): it is corrupt; " + advice);
  if (const std::string bad = f.first_nonfinite(); !bad.empty()) {
    std::string a = advice;
    if (!a.empty()) a[0] = char(std::toupper(static_cast<unsigned char>(a[0])));
    throw FormatError("checkpoint " + path + " holds NaN or Inf values (" + bad + "); it cannot be resumed. " + a);
  }
}

namespace {

// Restores weights, optimizer state and the log; returns the step to continue from (0: none).
long long load_checkpoint(const std::string& dir, std::vector<Param>& params, Log& log) {
  std::string path = join(dir, kCheckpoint);
  if (!is_file(path)) return 0;
  SafetensorsFile f = [&] {
    try {
      return SafetensorsFile::read(path);
    } catch (const std::exception& e) {
      throw FormatError("checkpoint " + path + " is unreadable (" + e.what() + "); delete " + dir + " to start over");
    }
  }();
  check_checkpoint_file(f, path, "delete " + dir + " to start over");
  const std::string* step_s = f.meta(formats::kMetaStep);
  const std::string* log_s = f.meta(formats::kMetaLog);
  if (!step_s || !log_s) throw InputError("checkpoint " + path + " has no step/log metadata; delete it to start over");
  Value saved;
  long long step = 0;
  try {
    saved = json::parse(*log_s);
    step = std::stoll(*step_s);
  } catch (const std::exception& e) {
    throw InputError("checkpoint " + path + " is unreadable (" + e.what() + "); delete it to start over");
  }
  const Value* src = saved.find(formats::kLogCacheSource);
  if (!src || !src->is_string() || src->as_string() != log.cache_source)
    throw InputError(path + " belongs to a training run on other photos or another bundle; use a new output folder "
                     "(-o), or delete " + dir + " to start over");
  for (const auto& kv : f.tensors()) {
    if (kv.first.rfind(formats::kParam, 0) != 0) continue;
    if (std::none_of(params.begin(), params.end(), [&](const Param& p) { return formats::kParam + p.name == kv.first; }))
      throw InputError("checkpoint " + path + " does not belong to this bundle's plan; use another -o");
  }
  try {
    for (auto& p : params) {
      f.copy_floats(formats::kParam + p.name, p.data, p.numel);
      if (f.has(formats::kOptExpAvg + p.name)) {
        p.state.exp_avg = f.floats(formats::kOptExpAvg + p.name);
        p.state.exp_avg_sq = f.floats(formats::kOptExpAvgSq + p.name);
        p.state.step = f.floats(formats::kOptStep + p.name).at(0);
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
    numbers(formats::kLogLosses, log.losses);  // step_seconds: this process's steps only
    if (const Value* w = saved.find(formats::kLogLossWithoutLora)) {
      log.loss_without_lora = w->as_double(formats::kLogLossWithoutLora);
      log.has_loss_without_lora = true;
    }
  } catch (const json::Error& e) {
    throw InputError("checkpoint " + path + " has a malformed log (" + e.what() + "); delete it to start over");
  }
  return step;
}

std::string diffusers_name(const std::string& peft) {
  std::string n = peft;
  const std::string adapter = formats::kPeftAdapter;
  size_t at = n.find(adapter);
  if (at != std::string::npos) n.replace(at, adapter.size(), ".");
  return formats::kLoraPrefix + n;
}

bool is_lora_b(const Param& p) { return p.name.find(formats::kLoraB) != std::string::npos; }

bool any_lora_b_nonzero(const std::vector<Param>& params) {
  for (const auto& p : params)
    if (is_lora_b(p) && std::any_of(p.data, p.data + p.numel, [](float x) { return x != 0.0f; })) return true;
  return false;
}

// The LoRA file: diffusers names, lora_B times alpha/rank, the bundle's lora.metadata.
void save_lora(const std::string& path, const std::vector<Param>& params, const Bundle& b) {
  std::vector<std::vector<float>> scaled;
  scaled.reserve(params.size());
  std::vector<TensorOut> t;
  const float scale = static_cast<float>(b.lora_scale);
  for (const auto& p : params) {
    const float* data = p.data;
    if (is_lora_b(p)) {
      scaled.emplace_back(p.data, p.data + p.numel);
      for (float& x : scaled.back()) x *= scale;
      data = scaled.back().data();
    }
    t.push_back({diffusers_name(p.name), p.shape, data});
    if (!std::all_of(data, data + p.numel, [](float v) { return std::isfinite(v); }))
      throw InputError("the trained LoRA holds NaN or Inf values (" + p.name + ", scaled by alpha/rank); it was not "
                       "written. Lower --lr or lora_alpha when exporting");
  }
  write_safetensors(path, std::move(t), b.lora_metadata);
}

// The LoRA in the kohya or ComfyUI layout (runtime/lora_layouts.py, whose declaration generated
// lora_layouts.h): per fused Linear of the original checkpoint, A stacked and B block-diagonal over its
// parts (zeros where the LoRA has none), alpha = the fused rank. The bytes runtime/lora_layouts.py's
// convert_file writes from OUT/lora.safetensors.
void save_lora_layout(const std::string& path, const std::vector<Param>& params, const Bundle& b,
                      const std::string& layout) {
  const std::string family = b.manifest.at("family").as_string("family");
  struct Got {
    const lora_layouts::Fused* fused = nullptr;
    std::map<int, std::pair<const Param*, const Param*>> parts;  // part index -> (A, B)
  };
  std::map<std::string, Got> groups;  // original module (block prefix and index included)
  for (const auto& a : params) {
    if (a.name.find(formats::kLoraA) == std::string::npos) continue;
    const std::string module = a.name.substr(0, a.name.find(formats::kLoraA));
    std::string b_name = a.name;
    b_name.replace(b_name.find(formats::kLoraA), std::string(formats::kLoraA).size(), formats::kLoraB);
    auto bp = std::find_if(params.begin(), params.end(), [&](const Param& p) { return p.name == b_name; });
    if (bp == params.end()) throw InputError("LoRA " + module + " has lora_A but no lora_B");
    bool placed = false;
    for (const auto& f : lora_layouts::kFused) {
      const std::string pre = std::string(f.diffusers_block) + ".";
      if (family != f.family || module.compare(0, pre.size(), pre) != 0) continue;
      const size_t dot = module.find('.', pre.size());
      const std::string index = module.substr(pre.size(), dot - pre.size());
      if (dot == std::string::npos || index.empty() ||
          !std::all_of(index.begin(), index.end(), [](char c) { return std::isdigit(static_cast<unsigned char>(c)); }))
        continue;
      for (int j = 0; j < f.num_parts && !placed; ++j) {
        if (module.substr(dot + 1) != f.parts[j].module) continue;
        Got& g = groups[std::string(f.original_block) + "." + index + "." + f.original];
        g.fused = &f;
        g.parts[j] = {&a, &*bp};
        placed = true;
      }
      if (placed) break;
    }
    if (!placed)
      throw InputError("LoRA module " + module + " has no place in the original " + family + " checkpoint layout");
  }
  const float scale = static_cast<float>(b.lora_scale);
  std::vector<std::vector<float>> store;
  store.reserve(groups.size() * 3);
  std::vector<TensorOut> t;
  for (const auto& [orig, g] : groups) {
    const lora_layouts::Fused& f = *g.fused;
    const Param& a0 = *g.parts.begin()->second.first;
    const Param& b0 = *g.parts.begin()->second.second;
    const int64_t rank = a0.shape.at(0), fan_in = a0.shape.at(1);
    const int64_t unit = b0.shape.at(0) / f.parts[g.parts.begin()->first].width;
    int64_t rows_total = 0;
    for (int j = 0; j < f.num_parts; ++j) rows_total += f.parts[j].width * unit;
    const int64_t n = f.num_parts, cols = n * rank;
    std::vector<float> down(size_t(n * rank * fan_in), 0.0f), up(size_t(rows_total * cols), 0.0f);
    int64_t row = 0;
    for (int j = 0; j < f.num_parts; ++j) {
      const int64_t rows = f.parts[j].width * unit;
      auto it = g.parts.find(j);
      if (it != g.parts.end()) {
        const Param& pa = *it->second.first;
        const Param& pb = *it->second.second;
        if (pa.shape != a0.shape || pb.shape.at(1) != rank || pb.shape.at(0) != rows)
          throw InputError("the LoRA parts of " + orig + " differ in rank or size; they cannot be fused");
        std::copy(pa.data, pa.data + pa.numel, down.begin() + j * rank * fan_in);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < rank; ++c) up[size_t((row + r) * cols + j * rank + c)] = pb.data[r * rank + c] * scale;
      }
      row += rows;
    }
    std::string stem = orig;
    if (layout == "kohya") {
      std::replace(stem.begin(), stem.end(), '.', '_');
      stem = lora_layouts::kKohyaPrefix + stem;
    } else {
      stem = lora_layouts::kComfyPrefix + stem;
    }
    store.push_back(std::move(down));
    t.push_back({stem + ".lora_down.weight", {n * rank, fan_in}, store.back().data()});
    store.push_back(std::move(up));
    t.push_back({stem + ".lora_up.weight", {rows_total, cols}, store.back().data()});
    store.push_back({float(cols)});
    t.push_back({stem + ".alpha", {}, store.back().data()});
  }
  write_safetensors(path, std::move(t), {{"blockskip_family", family}, {"blockskip_layout", layout}, {"format", "pt"}});
}

void write_log(const std::string& path, const Log& log) {
  json::DumpOptions o;
  o.indent = 1;
  atomic_write(path, json::dump(log.to_json(), o));
}

}  // namespace

void check_checkpoint_source(const std::string& out, const std::string& source_sha256) {
  const std::string dir = join(out, formats::kCheckpointDir);
  refuse_foreign_checkpoint(dir);
  const std::string path = join(dir, kCheckpoint);
  if (!is_file(path)) return;
  std::string saved;
  try {
    SafetensorsFile f = SafetensorsFile::read(path);
    const std::string* log_s = f.meta(formats::kMetaLog);
    const Value* src = nullptr;
    Value v;
    if (log_s) {
      v = json::parse(*log_s);
      src = v.find(formats::kLogCacheSource);
    }
    if (src && src->is_string()) saved = src->as_string();
  } catch (const std::exception&) {
    return;  // unreadable: training reports it
  }
  if (saved != source_sha256)
    throw InputError(path + " belongs to a training run on other photos or another bundle; use a new output folder "
                     "(-o), or delete " + dir + " to start over");
}

int train(const Options& opt) {
  Bundle b = load_bundle(opt.bundle, opt.verify);
  load_cache(opt.cache, b);  // refused before OUT is made
  make_dirs(opt.out, "output folder");
  lock_output(opt.out);  // one run per folder, until this process ends
  lock_cache(opt.cache);
  Cache cache = load_cache(opt.cache, b);  // again, now that no other run can change it
  verify_cache(cache, opt.verify);         // every shard, before any work
  check_budget(b.manifest, "train");
  const double start_rss_mib = double(rss_bytes()) / double(1 << 20);  // the runtime before training
  std::unique_ptr<Trainer> trainer = b.span == "streamed" ? make_streamed_trainer(b, opt.out) : make_resident_trainer(b);
  const std::string ckpt_dir = join(opt.out, formats::kCheckpointDir);
  refuse_foreign_checkpoint(ckpt_dir);
  std::vector<Param>& params = trainer->params();
  const long long steps = b.steps, ga = b.grad_accum;

  Log log;
  log.plan = b.plan;
  log.cache_source = cache.source_sha256;
  log.delegate = b.delegate;
  long long start = load_checkpoint(ckpt_dir, params, log);
  if (start > steps) start = steps;
  log.resumed_from = start;
  if (start && !opt.quiet) std::printf("resuming from step %lld (%s)\n", start, ckpt_dir.c_str());

  const std::vector<size_t> order = entry_order(cache.files.size(), steps, ga);
  size_t pos = size_t(start * ga);
  const Trainer* checker = trainer.get();
  auto fetch = [&cache, checker, v = opt.verify](size_t k) {
    return std::async(std::launch::async, [&cache, checker, k, v] {
      Entry e = load_entry(cache, k, v);
      checker->check_entry(e);
      return e;
    });
  };
  std::future<Entry> next;
  if (pos < order.size()) next = fetch(order[pos]);

  // the numerics checks of a fresh run: the first entry's loss before and after the first update
  std::shared_ptr<const Entry> first;  // shares the entry (no copy: the dry run counts two entries)
  double first_loss = 0.0;
  bool first_taken = false;

  const long long end = opt.stop_after < 0 ? steps : std::max(start, std::min(steps, opt.stop_after));
  const double scale = 1.0 / double(ga);
  for (long long step = start; step < end; ++step) {
    auto t0 = std::chrono::steady_clock::now();
    double total = 0.0;
    for (long long j = 0; j < ga; ++j) {
      auto e = std::make_shared<const Entry>(next.get());
      ++pos;
      if (pos < order.size()) next = fetch(order[pos]);  // prefetch while this entry trains
      if (start == 0 && !first_taken) {
        first_taken = true;
        first = e;
        first_loss = trainer->eval_loss(*e);
        log.loss_without_lora = first_loss;  // kept in the checkpoint's log: a resumed run checks against it
        log.has_loss_without_lora = true;
      }
      const double loss = trainer->loss_and_grad(*e, scale);
      if (!std::isfinite(loss))
        throw InputError("step " + std::to_string(step + 1) + " produced a non-finite loss (" + number_text(loss) +
                         "); nothing was written over the last checkpoint. Check the photos and the cache "
                         "(device-train precompute again), or lower --lr when exporting");
      total += loss / double(ga);
    }
    trainer->update();
    for (const auto& p : params)
      if (!std::all_of(p.data, p.data + p.numel, [](float x) { return std::isfinite(x); }))
        throw InputError("step " + std::to_string(step + 1) + " made the LoRA non-finite (" + p.name +
                         ", ...); nothing was written over the last checkpoint. Lower --lr when exporting, or "
                         "check the cache");
    if (first) {
      if (!any_lora_b_nonzero(params))
        throw InputError("the first step left every LoRA B at zero: the LoRA gets no gradient. Check the "
                         "bundle's LoRA targets and --lr");
      if (trainer->eval_loss(*first) == first_loss)
        throw InputError("the first step changed the LoRA but not the loss: the LoRA does not reach the output; "
                         "export the bundle again");
      first.reset();
    }
    double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    log.losses.push_back(total);
    log.step_seconds.push_back(dt);
    if (!opt.quiet) {
      std::printf("step %lld/%lld  loss %.6f  %.3f s\n", step + 1, steps, total, dt);
      std::fflush(stdout);
    }
    if (events_on()) {
      double mean = 0.0;
      for (double x : log.step_seconds) mean += x;
      mean /= double(log.step_seconds.size());
      Value e = Value::object();
      e.set("step", Value::integer(step + 1));
      e.set("steps", Value::integer(steps));
      e.set("loss", Value::number(total));
      e.set("step_seconds", Value::number(dt));
      e.set("peak_rss_mib", Value::number(double(peak_rss_bytes()) / double(1 << 20)));
      e.set("eta_seconds", Value::number(double(steps - step - 1) * mean));
      emit_event("step", e);
    }
    if ((step + 1) % b.checkpoint_every == 0 || step + 1 == steps) {
      save_checkpoint(ckpt_dir, params, step + 1, log);
      Value e = Value::object();
      e.set("step", Value::integer(step + 1));
      e.set("path", Value::string(join(ckpt_dir, formats::kCheckpoint)));
      emit_event("checkpoint", e);
    }
  }
  if (next.valid()) {
    try {
      next.get();  // let a prefetch still in flight finish before its inputs go away
    } catch (...) {
    }
  }
  log.extra.set("peak_rss_mib", Value::number(double(peak_rss_bytes()) / double(1 << 20)));
  log.extra.set("start_rss_mib", Value::number(start_rss_mib));
  trainer->info(log.extra);
  if (end == steps) {
    if (!any_lora_b_nonzero(params))
      throw InputError("training finished with an all-zero LoRA (it would change nothing); not writing it. "
                       "Check --lr and the cache");
    if (log.has_loss_without_lora) {
      // the trained LoRA against none, on the first entry (runtime/driver.py): equal losses mean the
      // span's output did not change
      Entry e = load_entry(cache, order.at(0), opt.verify);
      trainer->check_entry(e);
      const double after = trainer->eval_loss(e);
      if (after == log.loss_without_lora)
        throw InputError("the trained LoRA does not change the model's output on cache entry 0 (loss " +
                         number_text(after) + " with and without it); not writing it. Raise --lr when exporting, "
                         "or export the bundle again");
    }
    std::string lora = join(opt.out, formats::kLoraFile);
    save_lora(lora, params, b);
    log.lora = lora;
    for (const char* layout : {"kohya", "comfy"})
      if (opt.lora_format == layout || opt.lora_format == "all")
        save_lora_layout(join(opt.out, layout == std::string("kohya") ? lora_layouts::kKohyaFile : lora_layouts::kComfyFile),
                         params, b, layout);
    if (!opt.quiet) std::printf("LoRA: %s\n", lora.c_str());
  } else if (!opt.quiet) {
    std::printf("stopped after step %lld of %lld; run again to resume\n", end, steps);
  }
  write_log(join(opt.out, formats::kTrainLog), log);
  return 0;
}

}  // namespace blockskip
