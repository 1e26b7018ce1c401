#include "common.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <set>
#include <sstream>

#include "formats.h"

namespace blockskip {

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
  size_t i = 0;
  while (i <= path.size()) {
    size_t j = path.find('/', i);
    if (j == std::string::npos) j = path.size();
    std::string cur = path.substr(0, j);
    if (!cur.empty() && !is_dir(cur)) {
      if (::mkdir(cur.c_str(), 0777) != 0 && errno != EEXIST)
        throw InputError("cannot create " + what + " '" + path + "': " + std::strerror(errno) +
                         "; choose another path with -o");
    }
    i = j + 1;
  }
  if (!is_dir(path)) throw InputError(what + " '" + path + "' exists and is not a folder; choose another path with -o");
}

void remove_flat_dir(const std::string& path) {
  if (DIR* d = ::opendir(path.c_str())) {
    while (dirent* e = ::readdir(d)) {
      std::string n = e->d_name;
      if (n != "." && n != "..") ::unlink(join(path, n).c_str());
    }
    ::closedir(d);
  }
  ::rmdir(path.c_str());
}

// ------------------------------------------------------------------------------------------
// one run per folder (runtime/files.py folder_lock)

namespace {

// An atomic write's temporary: TEMP_PREFIX NAME "." 6 or more of [A-Za-z0-9_] TEMP_SUFFIX (Python's
// mkstemp: 8 of [a-z0-9_], ours: 6 of [A-Za-z0-9]).
bool is_temp_name(const std::string& n) {
  const std::string pre = formats::kTempPrefix, suf = formats::kTempSuffix;
  if (n.size() <= pre.size() + suf.size() || n.compare(0, pre.size(), pre) != 0 ||
      n.compare(n.size() - suf.size(), suf.size(), suf) != 0)
    return false;
  const std::string mid = n.substr(pre.size(), n.size() - pre.size() - suf.size());  // NAME.<random>
  const size_t dot = mid.rfind('.');
  if (dot == std::string::npos || dot == 0 || mid.size() - dot - 1 < 6) return false;
  return std::all_of(mid.begin() + long(dot) + 1, mid.end(),
                     [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; });
}

// The pid written in a lock file (its holder writes it just after taking the lock).
std::string lock_holder(const std::string& lock) {
  for (int i = 0; i < 20; ++i) {
    std::ifstream f(lock);
    std::string v;
    if ((f >> v) && !v.empty() && std::all_of(v.begin(), v.end(), [](char c) { return c >= '0' && c <= '9'; }))
      return v;
    ::usleep(10000);
  }
  return "unknown";
}

}  // namespace

void remove_stale_temps(const std::string& folder) {
  if (DIR* d = ::opendir(folder.c_str())) {
    while (dirent* e = ::readdir(d)) {
      const std::string n = e->d_name;
      struct stat s;
      const std::string p = join(folder, n);
      if (is_temp_name(n) && ::lstat(p.c_str(), &s) == 0 && S_ISREG(s.st_mode)) ::unlink(p.c_str());
    }
    ::closedir(d);
  }
}

void lock_folder(const std::string& folder, const std::string& what, const std::string& hint,
                 const std::vector<std::string>& temps) {
  static std::set<std::string> held;  // real paths; a lock lasts until the process ends
  std::string key = folder;
  if (char* rp = ::realpath(folder.c_str(), nullptr)) {
    key = rp;
    std::free(rp);
  }
  if (held.count(key)) return;
  const std::string lock = join(folder, formats::kLockFile);
  const int fd = ::open(lock.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0)
    throw InputError("cannot create the lock file of " + what + " '" + folder + "' (" + std::strerror(errno) + "); " +
                     hint);
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const int e = errno;
    ::close(fd);
    if (e == EWOULDBLOCK || e == EAGAIN)
      throw InputError(what + " '" + folder + "' is in use by another run (pid " + lock_holder(lock) +
                       "); wait for it to end, or " + hint);
    if (e == ENOLCK || e == EOPNOTSUPP || e == ENOSYS || e == EINVAL) {  // no flock here: go on unlocked
      held.insert(key);
      return;
    }
    throw InputError("cannot lock " + what + " '" + folder + "' (" + std::strerror(e) + "); " + hint);
  }
  const std::string pid = std::to_string(::getpid()) + "\n";
  if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, pid.data(), pid.size(), 0) != ssize_t(pid.size())) {
    const int e = errno;
    ::close(fd);
    throw InputError("cannot write the lock file of " + what + " '" + folder + "' (" + std::strerror(e) + "); " + hint);
  }
  held.insert(key);  // the descriptor stays open: closing it would release the lock
  for (const auto& sub : temps) remove_stale_temps(sub == "." ? folder : join(folder, sub));
}

void lock_output(const std::string& out) {
  lock_folder(out, "output folder", "choose another output folder with -o", {".", formats::kCheckpointDir});
}

void lock_cache(const std::string& cache) { lock_folder(cache, "cache folder", "use another --cache folder"); }

json::Value read_json(const std::string& path, const std::string& what, const std::string& advice) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw InputError(what + " " + path + " cannot be read" + (advice.empty() ? "" : "; " + advice));
  std::stringstream ss;
  ss << f.rdbuf();
  try {
    return json::parse(ss.str());
  } catch (const json::Error& e) {
    throw FormatError(what + " " + path + " is not valid JSON (" + e.what() + ")" + (advice.empty() ? "" : "; " + advice));
  }
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

size_t numel(const std::vector<int64_t>& s) {
  size_t n = 1;
  for (int64_t d : s) n *= size_t(d);
  return n;
}

// ------------------------------------------------------------------------------------------
// memory (runtime/memory.py)

namespace {

long long status_kib(const char* key) {
  std::ifstream f("/proc/self/status");
  std::string line;
  size_t n = std::strlen(key);
  while (std::getline(f, line))
    if (line.compare(0, n, key) == 0) return std::atoll(line.c_str() + n);
  return -1;
}

// A file holding a plain decimal number ("max" and the like: none).
bool read_number(const std::string& path, long long& out) {
  std::ifstream f(path);
  std::string v;
  if (!(f >> v) || v.empty()) return false;
  for (char c : v)
    if (c < '0' || c > '9') return false;
  out = std::atoll(v.c_str());
  return true;
}

// What the memory cgroup still allows (limit minus usage); false without a limit.
bool cgroup_free(long long& out) {
  std::ifstream f("/proc/self/cgroup");
  std::string line;
  while (std::getline(f, line)) {
    size_t a = line.find(':'), b = a == std::string::npos ? a : line.find(':', a + 1);
    if (b == std::string::npos) continue;
    std::string controllers = line.substr(a + 1, b - a - 1), path = line.substr(b + 1);
    while (!path.empty() && path.back() == '/') path.pop_back();
    std::string limit_file, used_file;
    if (controllers.empty()) {  // cgroup v2
      limit_file = "/sys/fs/cgroup" + path + "/memory.max";
      used_file = "/sys/fs/cgroup" + path + "/memory.current";
    } else if (("," + controllers + ",").find(",memory,") != std::string::npos) {
      limit_file = "/sys/fs/cgroup/memory" + path + "/memory.limit_in_bytes";
      used_file = "/sys/fs/cgroup/memory" + path + "/memory.usage_in_bytes";
    } else {
      continue;
    }
    long long limit = 0, used = 0;
    if (read_number(limit_file, limit) && read_number(used_file, used) && limit < (1LL << 60)) {
      out = limit > used ? limit - used : 0;
      return true;
    }
  }
  return false;
}

std::string mib(double bytes) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.0f", bytes / double(1 << 20));
  return buf;
}

}  // namespace

long long rss_bytes() {
  long long k = status_kib("VmRSS:");
  return k < 0 ? 0 : k * 1024;
}

long long peak_rss_bytes() {
  long long k = status_kib("VmHWM:");
  return k < 0 ? 0 : k * 1024;
}

void check_budget(const json::Value& manifest, const std::string& phase) {
  const json::Value* mem = manifest.find("memory");
  const json::Value* phases = mem ? mem->find("phases") : nullptr;
  const json::Value* peak_v = phases ? phases->find(phase) : nullptr;
  const char* ignore = std::getenv("BLOCKSKIP_IGNORE_MEMORY_CHECK");
  if (!peak_v || !peak_v->is_number() || (ignore && *ignore)) return;
  const double peak = peak_v->as_double();
  if (peak == 0) return;
  long long have = -1;
  std::string source = "MemAvailable";
  {
    std::ifstream f("/proc/meminfo");
    std::string line;
    while (std::getline(f, line))
      if (line.compare(0, 13, "MemAvailable:") == 0) have = std::atoll(line.c_str() + 13) * 1024;
  }
  long long cg = 0;
  if (cgroup_free(cg) && (have < 0 || cg < have)) {
    have = cg;
    source = "the memory cgroup limit";
  }
  if (have < 0) have = 1LL << 62;
  const double held = double(rss_bytes());
  const double need = std::max(0.0, peak - held);
  if (need <= double(have)) return;
  std::string hint = "; free memory, or re-export with a smaller plan (blockskip-plan shows the options)";
  if (const json::Value* alts = mem->find("alternatives"); alts && alts->is_array()) {
    for (const auto& a : alts->as_array()) {
      const json::Value* ph = a.find("phases");
      const json::Value* p = ph ? ph->find(phase) : nullptr;
      const json::Value* opt = a.find("option");
      if (!p || !p->is_number() || !opt || !opt->is_string()) continue;
      if (p->as_double() - held <= double(have)) {
        hint = "; re-export with " + opt->as_string() + " (predicted " + mib(p->as_double()) + " MiB)";
        break;
      }
    }
  }
  throw InputError("not enough memory for " + phase + ": this plan's predicted peak is " + mib(peak) +
                   " MiB, this process holds " + mib(held) + " MiB and " + mib(double(have)) +
                   " MiB more are available (" + source + ")" + hint +
                   ". Set BLOCKSKIP_IGNORE_MEMORY_CHECK=1 to run anyway");
}

namespace {
FILE* g_events = nullptr;
}

void events_open(const std::string& path) {
  if (path == "-") {
    // the events keep the process's stdout; everything else printed to stdout goes to stderr
    std::fflush(stdout);
    const int fd = dup(1);
    if (fd < 0 || dup2(2, 1) < 0) throw InputError("--events -: cannot separate the events from the messages");
    g_events = fdopen(fd, "w");
  } else {
    g_events = std::fopen(path.c_str(), "a");  // a resumed run continues its log
  }
  if (!g_events) throw InputError("cannot open the events file " + path + " (" + std::strerror(errno) + ")");
}

bool events_on() { return g_events != nullptr; }

void emit_event(const std::string& kind, json::Value fields) {
  if (!g_events) return;
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  json::Value e = json::Value::object();
  e.set("event", json::Value::string(kind));
  e.set("time", json::Value::number(double(ts.tv_sec) + double(ts.tv_nsec) * 1e-9));
  for (const auto& kv : fields.as_object("event fields")) e.append(kv.first, kv.second);
  const std::string line = json::dump(e) + "\n";
  std::fwrite(line.data(), 1, line.size(), g_events);
  std::fflush(g_events);
}

}  // namespace blockskip
