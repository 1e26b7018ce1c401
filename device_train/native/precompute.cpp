#include "precompute.h"

#include <algorithm>
#include <cstdio>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

#include "bundle.h"
#include "common.h"
#include "driver.h"
#include "formats.h"
#include "images.h"
#include "json.h"
#include "programs.h"
#include "rng.h"
#include "safetensors.h"
#include "sha256.h"
#include "weights.h"

namespace blockskip {

using executorch::aten::ScalarType;
using executorch::extension::Module;
using json::Value;

namespace {

using formats::kEmbed;  // the embed program's shape id and role

bool starts(const std::string& s, const char* p) { return s.rfind(p, 0) == 0; }

// ---------------------------------------------------------------------------------------------
// the photo encoder (runtime/tiles.py)

struct Latent {  // [1, C, h, w]
  int64_t c = 0, h = 0, w = 0;
  std::vector<float> d;
  float& at(int64_t ch, int64_t y, int64_t x) { return d[size_t((ch * h + y) * w + x)]; }
  float at(int64_t ch, int64_t y, int64_t x) const { return d[size_t((ch * h + y) * w + x)]; }
};

class Encoder {
 public:
  Encoder(const std::string& file) : file_(file), module_(file, Module::LoadMode::Mmap) {
    auto err = module_.load_method("forward");
    if (err != executorch::runtime::Error::Ok)
      throw InputError("cannot load the encoder program " + file + " (" + et_error_text(err) + "); export the bundle again");
  }
  // image [1, 3, h, w] float32 -> its latent
  Latent run(std::vector<float>& image, int64_t h, int64_t w) {
    std::vector<executorch::aten::SizesType> sizes{1, 3, executorch::aten::SizesType(h), executorch::aten::SizesType(w)};
    auto t = executorch::extension::from_blob(image.data(), sizes, ScalarType::Float);
    auto out = module_.forward(t);
    if (!out.ok()) throw std::runtime_error("the encoder program " + file_ + " failed (" + et_error_text(out.error()) + ")");
    const auto& r = out.get();
    if (r.empty() || !r[0].isTensor()) throw std::runtime_error("the encoder program " + file_ + " gave no tensor");
    const auto& o = r[0].toTensor();
    if (o.scalar_type() != ScalarType::Float || o.dim() != 4)
      throw std::runtime_error("the encoder program " + file_ + " did not give a float32 [1, C, h, w] latent");
    Latent l;
    l.c = o.size(1), l.h = o.size(2), l.w = o.size(3);
    const float* p = o.const_data_ptr<float>();
    l.d.assign(p, p + o.numel());
    return l;
  }

 private:
  std::string file_;
  Module module_;
};

// (start, padded length) of the tiles along one side (runtime/tiles.py tile_spans)
// The manifest's tiles record (tile and stride in px, the encoder's compression ratio).
struct Tiling {
  int64_t tile = 0, stride = 0, ratio = 0;
};

std::vector<std::pair<int64_t, int64_t>> tile_spans(int64_t size, const Tiling& g) {
  const int64_t ratio = g.ratio;
  std::vector<std::pair<int64_t, int64_t>> out;
  for (int64_t s = 0; s < size; s += g.stride) {
    int64_t n = std::min<int64_t>(g.tile, size - s);
    out.emplace_back(s, n + (ratio - n % ratio) % ratio);
  }
  return out;
}

// photo [3, S, S] -> the tile at (i, j), zero-padded to a multiple of `ratio`: [1, 3, th, tw]
std::vector<float> tile_of(const float* photo, int64_t S, int64_t tile, int64_t i, int64_t j, int64_t th, int64_t tw) {
  std::vector<float> t(size_t(3 * th * tw), 0.0f);
  const int64_t h = std::min<int64_t>(tile, S - i), w = std::min<int64_t>(tile, S - j);
  for (int64_t c = 0; c < 3; ++c)
    for (int64_t y = 0; y < h; ++y)
      std::copy(photo + (c * S + i + y) * S + j, photo + (c * S + i + y) * S + j + w, t.begin() + (c * th + y) * tw);
  return t;
}

// runtime/tiles.py blend_tiles: rows of latent tiles (blended in place) -> the photo's latent
Latent blend_tiles(std::vector<std::vector<Latent>>& rows, int64_t height, int64_t width, const Tiling& g) {
  const int64_t ratio = g.ratio, lat_tile = g.tile / ratio, lat_stride = g.stride / ratio, blend = lat_tile - lat_stride;
  for (size_t r = 0; r < rows.size(); ++r)
    for (size_t c = 0; c < rows[r].size(); ++c) {
      Latent& t = rows[r][c];
      if (r > 0) {
        const Latent& a = rows[r - 1][c];
        const int64_t e = std::min({a.h, t.h, blend});
        for (int64_t y = 0; y < e; ++y) {
          const float wa = float(1.0 - double(y) / double(e)), wt = float(double(y) / double(e));
          for (int64_t ch = 0; ch < t.c; ++ch)
            for (int64_t x = 0; x < t.w; ++x) t.at(ch, y, x) = a.at(ch, a.h - e + y, x) * wa + t.at(ch, y, x) * wt;
        }
      }
      if (c > 0) {
        const Latent& a = rows[r][c - 1];
        const int64_t e = std::min({a.w, t.w, blend});
        for (int64_t x = 0; x < e; ++x) {
          const float wa = float(1.0 - double(x) / double(e)), wt = float(double(x) / double(e));
          for (int64_t ch = 0; ch < t.c; ++ch)
            for (int64_t y = 0; y < t.h; ++y) t.at(ch, y, x) = a.at(ch, y, a.w - e + x) * wa + t.at(ch, y, x) * wt;
        }
      }
    }
  Latent out;
  out.c = rows[0][0].c, out.h = height / ratio, out.w = width / ratio;
  out.d.assign(size_t(out.c * out.h * out.w), 0.0f);
  int64_t y0 = 0;
  for (auto& row : rows) {
    int64_t x0 = 0, rh = 0;
    for (auto& t : row) {
      const int64_t th = std::min(t.h, lat_stride), tw = std::min(t.w, lat_stride);
      for (int64_t ch = 0; ch < out.c; ++ch)
        for (int64_t y = 0; y < th && y0 + y < out.h; ++y)
          for (int64_t x = 0; x < tw && x0 + x < out.w; ++x) out.at(ch, y0 + y, x0 + x) = t.at(ch, y, x);
      x0 += tw, rh = th;
    }
    y0 += rh;
  }
  return out;
}

// photos [N, 3, S, S] -> latents, one encoder program loaded at a time (runtime/tiles.py encode_photos)
std::vector<Latent> encode_photos(const Bundle& b, const FTensor& photos) {
  const Value* pte = b.manifest.find("pte");
  const Value* sec = pte ? pte->find("encoder") : nullptr;
  if (!sec) throw InputError("bundle '" + b.root + "' has no ExecuTorch photo encoder; export it with --format pte");
  std::vector<int64_t> want;
  for (const auto& d : sec->at("input").as_array("pte.encoder.input")) want.push_back(d.as_int("dimension"));
  const int64_t N = photos.shape[0], S = photos.shape[2];
  if (want.size() != 4 || want[1] != 3 || want[2] != S || want[3] != S)
    throw InputError("photo tensor [3, " + std::to_string(S) + ", " + std::to_string(S) +
                     "] does not match the exported encoder input " + shape_str(want));
  std::map<std::string, std::string> programs;
  if (const Value* p = sec->find("programs"))
    for (const auto& kv : p->as_object("pte.encoder.programs")) programs[kv.first] = kv.second.at("file").as_string("file");
  else
    programs[std::to_string(S) + "x" + std::to_string(S)] = sec->at("file").as_string("pte.encoder.file");
  auto program = [&](const std::string& key) {
    auto it = programs.find(key);
    if (it == programs.end()) throw InputError("the bundle has no encoder program for " + key + " px inputs; export it again");
    return std::make_unique<Encoder>(b.listed(it->second));
  };
  const float* base = photos.data.data();
  const size_t per = size_t(3 * S * S);
  std::vector<Latent> out;
  const Value* tiles = sec->find("tiles");
  if (!tiles) {
    auto enc = program(std::to_string(S) + "x" + std::to_string(S));
    for (int64_t n = 0; n < N; ++n) {
      std::vector<float> im(base + n * per, base + (n + 1) * per);
      out.push_back(enc->run(im, S, S));
    }
    return out;
  }
  // the declared format checked tile, stride and ratio (positive, stride <= tile, both multiples of ratio)
  const Tiling g{tiles->at("tile").as_int("tiles.tile"), tiles->at("stride").as_int("tiles.stride"),
                 tiles->at("ratio").as_int("tiles.ratio")};
  const auto spans = tile_spans(S, g);
  std::vector<std::string> keys;  // tile shapes in first-use order (row-major grid)
  for (const auto& r : spans)
    for (const auto& c : spans) {
      std::string k = std::to_string(r.second) + "x" + std::to_string(c.second);
      if (std::find(keys.begin(), keys.end(), k) == keys.end()) keys.push_back(k);
    }
  std::vector<std::vector<std::vector<Latent>>> lat(size_t(N), std::vector<std::vector<Latent>>(
                                                                   spans.size(), std::vector<Latent>(spans.size())));
  for (const auto& key : keys) {
    auto enc = program(key);
    for (int64_t n = 0; n < N; ++n)
      for (size_t r = 0; r < spans.size(); ++r)
        for (size_t c = 0; c < spans.size(); ++c) {
          if (std::to_string(spans[r].second) + "x" + std::to_string(spans[c].second) != key) continue;
          auto t = tile_of(base + n * per, S, g.tile, spans[r].first, spans[c].first, spans[r].second, spans[c].second);
          lat[size_t(n)][r][c] = enc->run(t, spans[r].second, spans[c].second);
        }
  }
  for (int64_t n = 0; n < N; ++n) out.push_back(blend_tiles(lat[size_t(n)], S, S, g));
  return out;
}

// ---------------------------------------------------------------------------------------------
// a schedule entry's sample (runtime/precompute.py crop_resize, sample_inputs)

// [n_out][n_in] area weights: output i averages inputs floor(i n_in / n_out) .. ceil((i+1) n_in / n_out)
std::vector<std::pair<int64_t, int64_t>> area_windows(int64_t n_in, int64_t n_out) {
  std::vector<std::pair<int64_t, int64_t>> w;
  for (int64_t i = 0; i < n_out; ++i) w.emplace_back(i * n_in / n_out, ((i + 1) * n_in + n_out - 1) / n_out);
  return w;
}

FTensor crop_resize(const Latent& lat, const ScheduleEntry& e, int64_t s_min, int64_t f) {
  const int64_t side = e.side / f, top = e.top / f, left = e.left / f, low = s_min / f, C = lat.c;
  if (top + side > lat.h || left + side > lat.w) throw std::logic_error("a crop leaves the latent");
  FTensor out{{1, C, low, low}, std::vector<float>(size_t(C * low * low))};
  if (side == low) {
    for (int64_t c = 0; c < C; ++c)
      for (int64_t y = 0; y < low; ++y)
        for (int64_t x = 0; x < low; ++x) out.data[size_t((c * low + y) * low + x)] = lat.at(c, top + y, left + x);
    return out;
  }
  const auto win = area_windows(side, low);
  std::vector<double> rows(size_t(C * side * low));  // along each row first: [C, side, low]
  for (int64_t c = 0; c < C; ++c)
    for (int64_t y = 0; y < side; ++y)
      for (int64_t o = 0; o < low; ++o) {
        const double wt = 1.0 / double(win[size_t(o)].second - win[size_t(o)].first);
        double s = 0.0;
        for (int64_t x = win[size_t(o)].first; x < win[size_t(o)].second; ++x) s += double(lat.at(c, top + y, left + x)) * wt;
        rows[size_t((c * side + y) * low + o)] = s;
      }
  for (int64_t c = 0; c < C; ++c)  // then along each column: [C, low, low]
    for (int64_t o = 0; o < low; ++o) {
      const double wt = 1.0 / double(win[size_t(o)].second - win[size_t(o)].first);
      for (int64_t x = 0; x < low; ++x) {
        double s = 0.0;
        for (int64_t y = win[size_t(o)].first; y < win[size_t(o)].second; ++y) s += wt * rows[size_t((c * side + y) * low + x)];
        out.data[size_t((c * low + o) * low + x)] = float(s);
      }
    }
  return out;
}

// ---------------------------------------------------------------------------------------------
// the cache

// runtime/precompute.py residual_gaps: the skipped spans [a, b) after the first trained block whose
// residual the cache holds
std::vector<std::pair<int, int>> residual_gaps(const std::vector<int>& trained, int L, bool back_residual) {
  std::vector<std::pair<int, int>> g, out;
  for (size_t k = 0; k + 1 < trained.size(); ++k)
    if (trained[k + 1] - trained[k] > 1) g.emplace_back(trained[k] + 1, trained[k + 1]);
  if (trained.back() < L - 1) g.emplace_back(trained.back() + 1, L);
  for (const auto& ab : g)
    if (back_residual || ab.second != L) out.push_back(ab);
  return out;
}

// runtime/precompute.py record_boundary
void record_boundary(FTensors& saved, const FTensors& state, int i, const std::vector<int>& trained,
                     const std::vector<std::pair<int, int>>& gap_list, int L, bool before) {
  if (before && i == trained[0])
    for (const auto& kv : state) saved[formats::kEntryIn + kv.first] = kv.second;
  for (const auto& [a, b] : gap_list) {
    const std::string tmp = "tmp." + std::to_string(a) + ".";
    if (before && i == a)
      for (const auto& kv : state) saved[tmp + kv.first] = kv.second;
    if (!before && i == b - 1) {
      std::vector<std::string> keys;
      if (b == L)
        keys.push_back(formats::kStateHidden);  // only the hidden residual of the back span reaches the head
      else
        for (const auto& kv : state) keys.push_back(kv.first);
      for (const auto& n : keys) {
        auto t = saved.find(tmp + n);
        auto s = state.find(n);
        if (t == saved.end() || s == state.end()) continue;
        FTensor d{s->second.shape, std::vector<float>(s->second.data.size())};
        for (size_t q = 0; q < d.data.size(); ++q) d.data[q] = s->second.data[q] - t->second.data[q];
        saved[formats::kEntryDelta + std::to_string(a) + "." + n] = std::move(d);
      }
      for (auto it = saved.begin(); it != saved.end();) it = starts(it->first, tmp.c_str()) ? saved.erase(it) : std::next(it);
    }
  }
}

Feed feed_of(const FTensors& t, const std::string& prefix) {
  Feed f;
  for (const auto& kv : t) f[prefix + kv.first] = TensorRef{kv.second.data.data(), "float32", &kv.second.shape};
  return f;
}

FTensors strip_prefix(const FTensors& t, const char* prefix) {
  FTensors out;
  const size_t n = std::string(prefix).size();
  for (const auto& kv : t)
    if (starts(kv.first, prefix)) out[kv.first.substr(n)] = kv.second;
  return out;
}

// every tensor of a safetensors file as float32 under `prefix` + its name
FTensors floats_of(const std::string& path, const std::string& prefix) {
  SafetensorsFile f = SafetensorsFile::read(path);
  FTensors out;
  for (const auto& kv : f.tensors()) out[prefix + kv.first] = FTensor{kv.second.shape, f.to_floats(kv.first)};
  return out;
}

Value source_json(const Bundle& b, const std::string& images_dir, const std::vector<std::string>& names) {
  Value src = Value::object();
  src.set(formats::kSourceBundle, Value::string(b.manifest_sha256));
  Value im = Value::object();
  for (const auto& n : names) im.set(n, Value::string(sha256_file(join(images_dir, n))));
  src.set(formats::kSourceImages, im);
  return src;
}

void write_index(const std::string& path, const Value& index) {
  json::DumpOptions o;
  o.indent = 1;
  o.sort_keys = true;
  atomic_write(path, json::dump(index, o));
}

}  // namespace

std::string precompute(const PrecomputeOptions& opt) {
  const double start_rss_mib = double(rss_bytes()) / double(1 << 20);  // the runtime before precompute
  Bundle b = load_bundle(opt.bundle, opt.verify);
  const Value& m = b.manifest;
  std::vector<std::string> names;
  FTensor photos;
  int64_t s_min = 0, s_max = 0, f = 0, chunk = 0;
  bool back_residual = true, prefetch = true;
  std::vector<int> trained;
  int L = 0;
  Value schedule_sec;
  try {
    s_min = b.plan.at("s_min").as_int("plan.s_min");
    s_max = b.plan.at("s_max").as_int("plan.s_max");
    if (const Value* c = b.plan.find("precompute_chunk"); c && !c->is_null()) chunk = c->as_int("plan.precompute_chunk");
    if (const Value* r = b.plan.find("back_residual"); r && !r->is_null()) back_residual = r->as_bool("plan.back_residual");
    if (const Value* p = b.plan.find("prefetch"); p && !p->is_null()) prefetch = p->as_bool("plan.prefetch");
    f = m.at("vae_factor").as_int("vae_factor");
    for (const auto& t : m.at("model").at("trained").as_array("model.trained")) trained.push_back(int(t.as_int("block")));
    L = int(m.at("model").at("blocks").size());
    schedule_sec = m.at("schedule");
    if (trained.empty() || f <= 0 || s_min <= 0 || s_max < s_min || chunk < 0)
      throw InputError("the bundle's plan is out of range (trained blocks, s_min, s_max, vae_factor); export it again");
  } catch (const json::Error& e) {
    throw InputError("bundle manifest " + join(b.root, "manifest.json") + " is not as expected: " + e.what());
  }
  const Value* stream = m.find("stream");
  const Value* shapes = stream ? stream->find("shapes") : nullptr;
  if (!shapes || !shapes->find(kEmbed))
    throw InputError("bundle '" + b.root + "' has no embed program (it predates native precompute); export it again "
                     "with --format pte");
  photos = load_photos(opt.images, int(s_max), &names);
  const Value source = source_json(b, opt.images, names);
  const std::string source_sha = sha256_hex(json::dump_python_sorted(source));
  if (!opt.out.empty()) check_checkpoint_source(opt.out, source_sha);  // nothing written over another run
  const auto schedule = build_schedule(schedule_sec, int64_t(names.size()));

  // the cache: resume when it was computed from the same bundle and photos
  make_dirs(opt.cache, "cache folder");
  lock_cache(opt.cache);  // one run per folder, until this process ends; and OUT when training follows
  if (!opt.out.empty()) {
    make_dirs(opt.out, "output folder");
    lock_output(opt.out);
  }
  const std::string ipath = join(opt.cache, formats::kCacheIndex);
  Value index;
  Value realised = schedule_json(schedule_sec, int64_t(names.size()), schedule);
  if (is_file(ipath)) {
    // a damaged index is refused (runtime/cache.py): its entries' records could not be trusted
    Value old = read_cache_index(ipath);
    if (json::dump_python_sorted(old.at(formats::kIndexSource)) == json::dump_python_sorted(source)) {
      check_cache_schedule(old, realised, ipath);
      index = old;
    }
  }
  if (!index.is_object()) {
    index = Value::object();
    index.set(formats::kIndexSource, source);
    index.set(formats::kIndexSourceSha256, Value::string(source_sha));
    index.set(formats::kIndexSchedule, std::move(realised));
    index.set(formats::kIndexEntries, Value::object());
    write_index(ipath, index);
  }
  auto shard = [](size_t k) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%s%0*zu%s", formats::kShardPrefix, formats::kShardDigits, k, formats::kShardSuffix);
    return std::string(buf);
  };
  std::vector<size_t> todo;
  for (size_t k = 0; k < schedule.size(); ++k) {
    const Value* rec = index.at(formats::kIndexEntries).find(std::to_string(k));
    const Value* file = rec ? rec->find(formats::kRecordFile) : nullptr;
    const Value* digest = rec ? rec->find(formats::kRecordSha256) : nullptr;
    bool ok = file && digest && file->is_string() && digest->is_string() && is_file(join(opt.cache, file->as_string())) &&
              sha256_file(join(opt.cache, file->as_string())) == digest->as_string();
    if (!ok) todo.push_back(k);
  }
  if (todo.empty()) {
    if (!opt.quiet) std::printf("cache complete: %zu entries in %s\n", schedule.size(), opt.cache.c_str());
    return source_sha;
  }
  check_budget(m, "precompute");

  // what runs: blocks [0, stop), each with its shape's forward program
  const std::vector<std::pair<int, int>> gap_list = residual_gaps(trained, L, back_residual);
  const int stop = std::max(trained[0], gap_list.empty() ? 0 : gap_list.back().second);
  std::vector<std::pair<int, std::string>> order;
  std::vector<std::string> paths;
  try {
    for (const auto& p : stream->at("block_paths").as_array("stream.block_paths")) paths.push_back(p.as_string());
    for (const auto& t : stream->at("precompute").as_array("stream.precompute")) {
      const auto& pair = t.as_array("stream.precompute entry");
      if (pair.size() != 2) throw InputError("stream.precompute entries should be [block, shape]; export again");
      if (pair[0].as_int("block") < stop) order.emplace_back(int(pair[0].as_int("block")), pair[1].as_string("shape"));
    }
  } catch (const json::Error& e) {
    throw InputError("bundle manifest " + join(b.root, "manifest.json") + " is not as expected: " + e.what());
  }
  for (int i = 0; i < stop; ++i)
    if (size_t(i) >= order.size() || order[size_t(i)].first != i || size_t(i) >= paths.size())
      throw InputError("the bundle's stream section lacks precompute programs for some blocks; export it again");

  // photos -> latents (the encoder programs are loaded only here)
  if (!opt.quiet) std::printf("precompute: encoding %zu photos\n", names.size());
  std::fflush(stdout);
  std::vector<Latent> latents = encode_photos(b, photos);
  photos = FTensor();
  for (const auto& l : latents)
    if (l.h != s_max / f || l.w != s_max / f)
      throw InputError("the encoder gave a " + std::to_string(l.h) + "x" + std::to_string(l.w) +
                       " latent; the bundle's plan expects " + std::to_string(s_max / f) + "; export it again");

  // the programs: embed, then every precompute shape's forward (one arena: one runs at a time)
  std::vector<std::pair<std::string, std::string>> wanted{{kEmbed, kEmbed}};
  for (const auto& o : order) wanted.emplace_back(o.second, "forward");
  BlockPrograms programs(*stream, wanted, [&b](const std::string& rel) { return b.listed(rel); });
  FTensors text = floats_of(b.listed(m.at("prompt").as_string("prompt")), formats::kText);
  FTensors embed_w = floats_of(b.listed(m.at("model").at("embed").as_string("model.embed")), formats::kWeight);
  const Feed text_feed = feed_of(text, ""), embed_feed = feed_of(embed_w, "");
  std::map<std::string, FTensors> zero_lora;  // per shape: its forward's LoRA inputs, zero
  for (const auto& o : order) {
    if (zero_lora.count(o.second)) continue;
    FTensors z;
    for (const auto& io : programs.inputs(o.second, "forward"))
      if (starts(io.name, formats::kLora)) z[io.name] = FTensor{io.shape, std::vector<float>(numel(io.shape), 0.0f)};
    zero_lora[o.second] = std::move(z);
  }
  std::map<std::string, Feed> lora_feed;
  for (const auto& kv : zero_lora) lora_feed[kv.first] = feed_of(kv.second, "");
  std::map<int, std::string> files;
  const auto& blocks = m.at("model").at("blocks");
  for (const auto& o : order) {
    const Value& rel = blocks[size_t(o.first)];
    if (!rel.is_string()) throw InputError("the bundle has no weights for block " + std::to_string(o.first) + "; export it again");
    files[o.first] = b.listed(rel.as_string());
  }
  WeightSource weights([&](int i) { return read_weights(files.at(i), paths[size_t(i)]); }, false, prefetch);

  const size_t n_chunk = chunk > 0 ? size_t(chunk) : todo.size();
  size_t done = 0;
  for (size_t c0 = 0; c0 < todo.size(); c0 += n_chunk) {
    const std::vector<size_t> ks(todo.begin() + long(c0), todo.begin() + long(std::min(todo.size(), c0 + n_chunk)));
    std::vector<FTensors> states(ks.size()), consts(ks.size()), saved(ks.size());
    for (size_t j = 0; j < ks.size(); ++j) {
      const ScheduleEntry& e = schedule[ks[j]];
      FTensors in;
      in["x0"] = crop_resize(latents[size_t(e.image)], e, s_min, f);
      in["noise"] = FTensor{in["x0"].shape, rng::normals(uint64_t(e.noise_seed), in["x0"].data.size())};
      in["sigma"] = FTensor{{1}, {float(e.sigma)}};
      const double geom_v[3] = {double(e.top / f), double(e.left / f), double(e.side / f)};
      const std::vector<int64_t> geom_shape{3};
      Feed sample = feed_of(in, "");
      sample["geom"] = TensorRef{geom_v, "float64", &geom_shape};
      FTensors out = programs.run(kEmbed, kEmbed, {&sample, &text_feed, &embed_feed});
      states[j] = strip_prefix(out, formats::kState);
      consts[j] = strip_prefix(out, formats::kConst);
      auto t = out.find(formats::kEntryTarget);
      if (t == out.end()) throw InputError("the bundle's embed program gives no target; export it again");
      saved[j][formats::kEntryTarget] = std::move(t->second);
    }
    std::vector<int> seq;
    for (const auto& o : order) seq.push_back(o.first);
    weights.plan(seq);
    for (const auto& [i, sid] : order) {
      const BlockWeights& w = weights.get(i);
      for (size_t j = 0; j < ks.size(); ++j) {
        record_boundary(saved[j], states[j], i, trained, gap_list, L, true);
        const Feed st = feed_of(states[j], formats::kState), cs = feed_of(consts[j], formats::kConst);
        states[j] = strip_prefix(programs.run(sid, "forward", {&st, &cs, &w.feed, &lora_feed.at(sid)}), formats::kOut);
        record_boundary(saved[j], states[j], i, trained, gap_list, L, false);
      }
      if (!opt.quiet) std::printf("precompute: block %d of %d (%zu entries)\n", i + 1, stop, ks.size());
      std::fflush(stdout);
    }
    if (stop == trained[0])  // nothing is skipped after the span: its exact input is all we need
      for (size_t j = 0; j < ks.size(); ++j) record_boundary(saved[j], states[j], stop, trained, gap_list, L, true);
    for (size_t j = 0; j < ks.size(); ++j) {
      for (const auto& kv : consts[j]) saved[j][formats::kEntryConst + kv.first] = kv.second;
      std::vector<TensorOut> t;
      for (const auto& kv : saved[j]) t.push_back({kv.first, kv.second.shape, kv.second.data.data()});
      const std::string bytes = safetensors_bytes(std::move(t), {});
      const std::string name = shard(ks[j]);
      atomic_write(join(opt.cache, name), bytes);
      Value rec = Value::object();
      rec.set(formats::kRecordFile, Value::string(name));
      rec.set(formats::kRecordSha256, Value::string(sha256_hex(bytes)));
      Value entries = index.at(formats::kIndexEntries);
      entries.set(std::to_string(ks[j]), rec);
      index.set(formats::kIndexEntries, entries);
      write_index(ipath, index);
      ++done;
    }
    if (!opt.quiet) std::printf("precompute: %zu of %zu entries written\n", done, todo.size());
    if (events_on()) {
      Value e = Value::object();
      e.set("done", Value::integer(int64_t(done)));
      e.set("total", Value::integer(int64_t(todo.size())));
      emit_event("precompute_progress", e);
    }
    std::fflush(stdout);
  }
  weights.close();
  index.set(formats::kIndexMaxResidentBlocks, Value::integer(1));
  index.set(formats::kIndexPeakRssMib, Value::number(double(peak_rss_bytes()) / double(1 << 20)));
  index.set(formats::kIndexStartRssMib, Value::number(start_rss_mib));
  write_index(ipath, index);
  if (!opt.quiet) std::printf("cache ready in %s\n", opt.cache.c_str());
  return source_sha;
}

}  // namespace blockskip
