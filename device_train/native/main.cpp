// blockskip-train-native: the LoRA training loop of a bundle's ExecuTorch programs, with no Python
// and no libtorch. Reads BUNDLE/manifest.json and the residual cache made by `device-train precompute`
// and trains the span as the plan says: "resident" runs the bundle's joint forward-backward training
// program (resident.cpp); "streamed" runs per-block-shape forward / VJP / head programs one block at a
// time with the frozen weights streamed from the block files (stream.cpp). AdamW on the LoRA, an
// atomic resumable checkpoint, the LoRA as safetensors in diffusers naming and train_log.json
// (driver.cpp).
//
// The order of entries, the gradient accumulation, the optimizer arithmetic, the checkpoint and the
// output files are those of the Python backends, so a run here reproduces their losses.

#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <executorch/runtime/platform/platform.h>

#include "bundle.h"
#include "common.h"
#include "driver.h"
#include "formats.h"
#include "images.h"
#include "json.h"
#include "lora_layouts.h"
#include "precompute.h"
#include "rng.h"
#include "safetensors.h"
#include "schema.h"
#include "schemas.h"

namespace {

using blockskip::InputError;
using blockskip::Options;
using blockskip::UsageError;
namespace json = blockskip::json;
namespace rng = blockskip::rng;
using blockskip::build_schedule;
using blockskip::schedule_json;

const char* kProg = "blockskip-train-native";

// SIGTERM (how Android and service managers stop a process) and SIGINT end a run at once, with one
// line: every file is written atomically (a temporary, then a rename), so the last checkpoint and the
// cache shards already written are whole, and the same command resumes.
const char kTerminated[] = "blockskip-train-native: terminated; completed work is kept, run the same command to resume\n";
const char kInterrupted[] = "blockskip-train-native: interrupted; completed work is kept, run the same command to resume\n";

extern "C" void on_stop_signal(int sig) {
  ssize_t r = sig == SIGTERM ? write(2, kTerminated, sizeof kTerminated - 1) : write(2, kInterrupted, sizeof kInterrupted - 1);
  (void)r;
  _exit(128 + sig);
}

void handle_stop_signals() {
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
}

const char* kUsage =
    "usage: blockskip-train-native run BUNDLE --images DIR -o OUT [--cache DIR] [--stop-after N] [--quiet] [--no-verify]\n"
    "       blockskip-train-native precompute BUNDLE --images DIR --cache DIR [--quiet] [--no-verify]\n"
    "       blockskip-train-native [train] BUNDLE --cache DIR -o OUT [--stop-after N] [--quiet] [--no-verify]\n"
    "\n"
    "Personalise the model of BUNDLE (exported with --format pte) on your photos with the bundle's\n"
    "ExecuTorch programs; no Python needed, and the photos never leave this device.\n"
    "  run         precompute the cache for the photos in DIR (if it is not complete yet), then train\n"
    "              the LoRA; resumes where it stopped\n"
    "  precompute  read and encode the photos, realise the seeded patch schedule and run the frozen\n"
    "              blocks: the residual cache (the same cache `device-train precompute` writes)\n"
    "  train       train the LoRA on a finished cache: the training program (a resident span) or the\n"
    "              per-block programs (a streamed span)\n"
    "\n"
    "positional arguments:\n"
    "  BUNDLE            the bundle folder (holds manifest.json and the .pte programs)\n"
    "\n"
    "options:\n"
    "  --images DIR      the folder of your photos (PNG, JPEG or BMP; 3-10 photos of the subject)\n"
    "  --cache DIR       the residual cache folder (holds index.json); run: default OUT/cache\n"
    "  -o, --out OUT     output folder: lora.safetensors, train_log.json, checkpoint/\n"
    "  --stop-after N    stop after step N (a later run resumes from the last checkpoint)\n"
    "  --quiet           no progress lines\n"
    "  --no-verify       check file sizes only, not sha256 digests\n"
    "  --lora-format F   also write the LoRA as kohya (lora_kohya.safetensors), comfy (lora_comfy.safetensors)\n"
    "                    or all; lora.safetensors (diffusers naming) is always written\n"
    "  --events FILE     the run's events as JSON lines ('-': stdout; the messages go to stderr; docs/events.md)\n"
    "  -h, --help        show this help and exit\n"
    "\n"
    "A run resumes from OUT/checkpoint/checkpoint.safetensors when it is there, and precompute keeps\n"
    "the cache entries already written.\n"
    "\n"
    "       blockskip-train-native schedule BUNDLE --images N [--noise-values M]\n"
    "\n"
    "Print, as JSON, the patch schedule that precompute draws for N photos (the same as the Python\n"
    "runtime's), with the first M values of each entry's noise when asked.\n"
    "\n"
    "       blockskip-train-native photos DIR --size S -o FILE\n"
    "\n"
    "Write the photos of DIR as precompute reads them ([N, 3, S, S] float32 in [-1, 1], tensor\n"
    "\"photos\", their file names in the metadata) to the safetensors FILE.\n";

// A count >= 0 given to option `name`.
long long parse_count(const std::string& name, const std::string& v) {
  char* end = nullptr;
  errno = 0;
  long long n = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end || errno || n < 0) throw UsageError(name + " needs a count >= 0, got '" + v + "'");
  return n;
}

int schedule_command(int argc, char** argv) {
  std::string bundle;
  long long images = -1, values = 0;
  for (int i = 2; i < argc; ++i) {
    std::string a = argv[i];
    auto number = [&](const char* name) {
      if (i + 1 >= argc) throw UsageError(std::string(name) + " needs a value");
      return parse_count(name, argv[++i]);
    };
    if (a == "--images") {
      images = number("--images");
    } else if (a == "--noise-values") {
      values = number("--noise-values");
    } else if (a.size() > 1 && a[0] == '-') {
      throw UsageError("unknown option " + a);
    } else if (bundle.empty()) {
      bundle = a;
    } else {
      throw UsageError("expected one BUNDLE");
    }
  }
  if (bundle.empty()) throw UsageError("missing BUNDLE");
  if (images < 1) throw UsageError("missing --images N (N >= 1)");
  const std::string mpath = bundle + "/manifest.json";
  json::Value manifest = json::parse_file(mpath);
  const json::Value* sched = manifest.find("schedule");
  if (!sched) throw InputError(mpath + " has no schedule section; export the bundle again");
  const auto entries = build_schedule(*sched, images);
  json::Value out = schedule_json(*sched, images, entries);
  if (values > 0) {
    json::Value noise = json::Value::array();
    for (const auto& e : entries) {
      json::Value head = json::Value::array();
      for (float x : rng::normals(uint64_t(e.noise_seed), size_t(values))) head.push_back(json::Value::number(x));
      noise.push_back(std::move(head));
    }
    out.set("noise_values", std::move(noise));
  }
  json::DumpOptions opts;
  opts.indent = 1;
  std::printf("%s\n", json::dump(out, opts).c_str());
  return 0;
}

int photos_command(int argc, char** argv) {
  std::string dir, out;
  long long size = 0;
  for (int i = 2; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&](const char* name) -> std::string {
      if (i + 1 >= argc) throw UsageError(std::string(name) + " needs a value");
      return argv[++i];
    };
    if (a == "--size") {
      size = parse_count("--size", value("--size"));
    } else if (a == "-o" || a == "--out") {
      out = value("-o");
    } else if (a.size() > 1 && a[0] == '-') {
      throw UsageError("unknown option " + a);
    } else if (dir.empty()) {
      dir = a;
    } else {
      throw UsageError("expected one DIR");
    }
  }
  if (dir.empty()) throw UsageError("missing DIR");
  if (size < 1 || size > 65536) throw UsageError("missing --size S (1 <= S <= 65536)");
  if (out.empty()) throw UsageError("missing -o FILE");
  std::vector<std::string> names;
  const blockskip::FTensor photos = blockskip::load_photos(dir, int(size), &names);
  json::Value list = json::Value::array();
  for (const auto& n : names) list.push_back(json::Value::string(n));
  blockskip::write_safetensors(out, {{"photos", photos.shape, photos.data.data()}}, {{"names", json::dump(list)}});
  return 0;
}

// `check KIND FILE`: the checks the runner makes of what it reads, alone, so tests can hold its verdicts
// against the Python runtime's: the schema and rules of KIND (+ the integrity record of a manifest or a
// checkpoint). FILE: the JSON document (manifest, cache_index), or a safetensors file or its header as a
// JSON document (cache_entry, checkpoint). Prints "ok" (exit 0) or the refusal (exit 2).
int check_command(int argc, char** argv) {
  if (argc != 4) throw UsageError("expected KIND FILE");
  const std::string kind = argv[2], file = argv[3];
  if (kind != "manifest" && kind != "cache_index" && kind != "cache_entry" && kind != "checkpoint")
    throw UsageError("KIND must be manifest, cache_index, cache_entry or checkpoint, got '" + kind + "'");
  try {
    if (!blockskip::is_file(file)) throw InputError(file + " does not exist");
    if (kind == "manifest") {
      blockskip::check_manifest(blockskip::read_json(file, "bundle manifest", "export the bundle again"), file);
    } else if (kind == "cache_index") {
      const char* again = "delete the cache folder and precompute again";
      blockskip::schema::check_document(blockskip::formats::kSchemaCacheIndex, blockskip::read_json(file, "cache index", again),
                                        file, again);
    } else {
      char first = 0;
      if (FILE* fp = std::fopen(file.c_str(), "rb")) {
        int c;
        while ((c = std::fgetc(fp)) != EOF && (c == ' ' || c == '\n' || c == '\t' || c == '\r')) {
        }
        first = c == EOF ? 0 : char(c);
        std::fclose(fp);
      }
      const bool header_json = first == '{';
      if (kind == "cache_entry") {
        const char* again = "delete it and run `device-train precompute` again to rebuild it";
        const json::Value h = header_json ? blockskip::read_json(file, "cache shard header", again)
                                          : blockskip::SafetensorsFile::read(file).header();
        blockskip::schema::check_document(blockskip::formats::kSchemaCacheEntry, h, "cache shard " + file, again);
      } else {
        const std::string again = "delete the checkpoint folder to start over";
        if (header_json)
          blockskip::schema::check_document(blockskip::formats::kSchemaCheckpoint,
                                            blockskip::read_json(file, "checkpoint header", again),
                                            "checkpoint " + file, again);
        else
          blockskip::check_checkpoint_file(blockskip::SafetensorsFile::read(file), file, again);
      }
    }
  } catch (const UsageError&) {
    throw;
  } catch (const std::exception& e) {  // every refusal, and a file that is no safetensors file
    std::printf("%s\n", e.what());
    return 2;
  }
  std::printf("ok\n");
  return 0;
}

// `mode`: "train", "run" or "precompute"; argv[first..] are its arguments.
Options parse_args(int argc, char** argv, int first, const std::string& mode) {
  Options o;
  std::vector<std::string> pos;
  for (int i = first; i < argc; ++i) {
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
    } else if (mode != "train" && is("--images")) {
      o.images = value("--images");
    } else if (mode != "precompute" && (a == "-o" || is("--out"))) {
      o.out = value("-o/--out");
    } else if (mode != "precompute" && is("--stop-after")) {
      o.stop_after = parse_count("--stop-after", value("--stop-after"));
    } else if (a == "--quiet" || a == "-q") {
      o.quiet = true;
    } else if (mode != "precompute" && is("--lora-format")) {
      o.lora_format = value("--lora-format");
      if (o.lora_format != "diffusers" && o.lora_format != "kohya" && o.lora_format != "comfy" && o.lora_format != "all")
        throw UsageError("--lora-format: choose diffusers, kohya, comfy or all");
    } else if (is("--events")) {
      o.events = value("--events");
    } else if (a == "--no-verify") {
      o.verify = false;
    } else if (a.size() > 1 && a[0] == '-') {
      throw UsageError("unknown option " + a + (mode == "train" ? "" : " for " + mode));
    } else {
      pos.push_back(a);
    }
  }
  if (pos.size() != 1) throw UsageError(pos.empty() ? "missing BUNDLE" : "expected one BUNDLE, got " + std::to_string(pos.size()));
  o.bundle = pos[0];
  if (mode != "train" && o.images.empty()) throw UsageError("missing --images DIR");
  if (mode != "precompute" && o.out.empty()) throw UsageError("missing -o OUT");
  if (mode == "run" && o.cache.empty()) o.cache = blockskip::join(o.out, "cache");
  if (o.cache.empty()) throw UsageError("missing --cache DIR");
  return o;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

blockskip::json::Value phase(const char* name, double seconds = -1.0) {
  auto v = blockskip::json::Value::object();
  v.set("phase", blockskip::json::Value::string(name));
  if (seconds >= 0.0) v.set("seconds", blockskip::json::Value::number(seconds));
  return v;
}

int run_command(const Options& opt, const std::string& mode) {
  using blockskip::emit_event;
  using blockskip::json::Value;
  Value outputs = Value::object();
  outputs.set("cache", Value::string(opt.cache));
  if (mode != "train") {
    blockskip::PrecomputeOptions p;
    p.bundle = opt.bundle, p.images = opt.images, p.cache = opt.cache, p.quiet = opt.quiet, p.verify = opt.verify;
    if (mode == "run") p.out = opt.out;
    const auto t0 = std::chrono::steady_clock::now();
    emit_event("phase_start", phase("precompute"));
    blockskip::precompute(p);
    emit_event("phase_end", phase("precompute", seconds_since(t0)));
    if (mode == "precompute") {
      std::printf("cache ready in %s\n", opt.cache.c_str());
      Value done = Value::object();
      done.set("outputs", outputs);
      emit_event("done", done);
      return 0;
    }
  }
  const auto t0 = std::chrono::steady_clock::now();
  emit_event("phase_start", phase("train"));
  const int rc = blockskip::train(opt);
  emit_event("phase_end", phase("train", seconds_since(t0)));
  const std::string lora = blockskip::join(opt.out, blockskip::formats::kLoraFile);
  if (blockskip::is_file(lora)) {
    outputs.set("lora", Value::string(lora));
    for (const auto& [key, file] : {std::pair<const char*, const char*>{"lora_kohya", blockskip::lora_layouts::kKohyaFile},
                                    {"lora_comfy", blockskip::lora_layouts::kComfyFile}}) {
      const std::string path = blockskip::join(opt.out, file);
      if ((opt.lora_format == "all" || "lora_" + opt.lora_format == key) && blockskip::is_file(path))
        outputs.set(key, Value::string(path));
    }
  }
  outputs.set("train_log", Value::string(blockskip::join(opt.out, blockskip::formats::kTrainLog)));
  Value done = Value::object();
  done.set("outputs", outputs);
  emit_event("done", done);
  return rc;
}

// The error event of a failed run: `kind` is the error's type (FormatError: a damaged input; InputError:
// one the user can fix; internal: anything else).
int fail(const char* kind, const std::exception& e, int rc) {
  std::fprintf(stderr, "%s: error: %s\n", kProg, e.what());
  auto v = blockskip::json::Value::object();
  v.set("kind", blockskip::json::Value::string(kind));
  v.set("message", blockskip::json::Value::string(e.what()));
  blockskip::emit_event("error", v);
  return rc;
}

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
  handle_stop_signals();
  if (argc > 1 && std::string(argv[1]) == "schedule") {
    try {
      return schedule_command(argc, argv);
    } catch (const UsageError& e) {
      std::fprintf(stderr, "usage: %s schedule BUNDLE --images N [--noise-values M]\n%s: error: %s\n", kProg, kProg,
                   e.what());
      return 2;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "%s: error: %s\n", kProg, e.what());
      return 1;
    }
  }
  if (argc > 1 && std::string(argv[1]) == "check") {
    try {
      return check_command(argc, argv);
    } catch (const UsageError& e) {
      std::fprintf(stderr, "usage: %s check KIND FILE\n%s: error: %s\n", kProg, kProg, e.what());
      return 2;
    }
  }
  if (argc > 1 && std::string(argv[1]) == "photos") {
    try {
      return photos_command(argc, argv);
    } catch (const UsageError& e) {
      std::fprintf(stderr, "usage: %s photos DIR --size S -o FILE\n%s: error: %s\n", kProg, kProg, e.what());
      return 2;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "%s: error: %s\n", kProg, e.what());
      return 1;
    }
  }
  std::string mode = "train";
  int first = 1;
  if (argc > 1 && (std::string(argv[1]) == "run" || std::string(argv[1]) == "precompute" ||
                   std::string(argv[1]) == "train")) {
    mode = argv[1];
    first = 2;
  }
  Options opt;
  try {
    opt = parse_args(argc, argv, first, mode);
  } catch (const UsageError& e) {
    std::string usage(kUsage);
    std::fprintf(stderr, "%s\n%s: error: %s\n", usage.substr(0, usage.find('\n')).c_str(), kProg, e.what());
    return 2;
  }
  try {
    if (!opt.events.empty()) blockskip::events_open(opt.events);
    return run_command(opt, mode);
  } catch (const blockskip::FormatError& e) {  // a damaged input: exit status 2
    return fail("FormatError", e, 2);
  } catch (const InputError& e) {
    return fail("InputError", e, 1);
  } catch (const std::exception& e) {
    return fail("internal", e, 1);
  }
}
