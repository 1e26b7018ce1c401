#include "common.h"

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>

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

json::Value read_json(const std::string& path, const std::string& what) {
  try {
    return json::parse_file(path);
  } catch (const json::Error& e) {
    throw InputError(what + ": " + e.what());
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

}  // namespace blockskip
