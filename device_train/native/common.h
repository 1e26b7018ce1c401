// What every part of the runner shares: the error kinds that become exit statuses, file helpers,
// float tensors, and the memory check before training.
#pragma once

#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "json.h"

namespace blockskip {

// A bad command line: exit status 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// Bad input or a failed run: exit status 1, one line saying what to do.
struct InputError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// A damaged input: a document that breaks its declared format (schema.h), a file that does not match its
// integrity record, non-finite values where numbers are read. Exit status 2, one line naming the file,
// the key and what to do.
struct FormatError : InputError {
  using InputError::InputError;
};

bool is_file(const std::string& p);
bool is_dir(const std::string& p);
long long file_size(const std::string& p);
std::string join(const std::string& a, const std::string& b);
// mkdir -p; `what` names the folder in the error ("output folder").
void make_dirs(const std::string& path, const std::string& what);
// Removes a folder and the files directly in it (the stash); errors ignored.
void remove_flat_dir(const std::string& path);
// Takes the run lock of `folder` (runtime/files.py folder_lock): an advisory flock on folder/LOCK_FILE,
// which holds this process's pid and lasts until the process ends, however it ends. Another process
// holding it is an InputError naming its pid (`what` names the folder, `hint` what to do instead).
// Taking it removes the temporaries a killed run's atomic writes left in `temps` (subfolders of
// `folder`, "." for itself). Taking a lock this process holds does nothing. `folder` must exist. On a
// file system without flock the run goes on unlocked.
void lock_folder(const std::string& folder, const std::string& what, const std::string& hint,
                 const std::vector<std::string>& temps = {"."});
// The run locks of an output folder (it and its checkpoint folder cleaned) and of a cache folder.
void lock_output(const std::string& out);
void lock_cache(const std::string& cache);
// Removes the atomic-write temporaries (.NAME.XXXXXX.tmp) directly in `folder`.
void remove_stale_temps(const std::string& folder);
// A JSON document (json::parse: no duplicate keys, no NaN/Infinity, nesting bounded); a file that is not
// one is a FormatError "<what> <path> is not valid JSON (...); <advice>".
json::Value read_json(const std::string& path, const std::string& what, const std::string& advice = "");
std::string shape_str(const std::vector<int64_t>& s);
size_t numel(const std::vector<int64_t>& s);

// A float32 tensor owned by the runner (cache entries, activations, gradients, LoRA).
struct FTensor {
  std::vector<int64_t> shape;
  std::vector<float> data;
};
using FTensors = std::map<std::string, FTensor>;

// Resident memory of this process now (VmRSS) and its high-water mark (VmHWM), bytes.
long long rss_bytes();
long long peak_rss_bytes();

// runtime/memory.py check_budget: refuse a phase whose predicted peak (manifest.memory.phases[phase])
// minus what this process already holds does not fit MemAvailable (or the memory cgroup's remaining
// allowance when smaller), naming an `alternatives` entry that fits. BLOCKSKIP_IGNORE_MEMORY_CHECK skips it.
void check_budget(const json::Value& manifest, const std::string& phase);

// The run's events as JSON lines (--events FILE; "-": stdout, and the runner's messages then go to
// stderr): one `event` record of runtime/formats.py a line (docs/schemas/event.schema.json,
// docs/events.md), flushed as it happens. Without events_open nothing is written.
void events_open(const std::string& path);
bool events_on();
// Writes {"event": kind, "time": now, ...fields}; `fields` is an object.
void emit_event(const std::string& kind, json::Value fields = json::Value::object());

}  // namespace blockskip
