// A minimal test harness for the runner's C++ unit tests (no external framework).
//
//   TEST_CASE(suite, name) { CHECK(x == 1); CHECK_EQ(a, b); CHECK_THROWS(f(), Error, "part of what()"); }
//
// A failed check reports its file, line and values and the case goes on; an exception escaping a case
// fails it. tests/main.cpp runs the cases of the suites named on its command line (all without
// arguments) and exits non-zero when a check failed or a named suite has no cases.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

namespace bstest {

struct Case {
  const char* suite;
  const char* name;
  void (*fn)();
};

inline std::vector<Case>& registry() {
  static std::vector<Case> cases;
  return cases;
}

struct Counters {
  long checks = 0;
  long failures = 0;
};

inline Counters& counters() {
  static Counters c;
  return c;
}

struct Register {
  Register(const char* suite, const char* name, void (*fn)()) { registry().push_back({suite, name, fn}); }
};

inline void fail(const char* file, int line, const std::string& what) {
  ++counters().failures;
  std::fprintf(stderr, "%s:%d: FAILED: %s\n", file, line, what.c_str());
}

template <typename T>
std::string show(const T& v) {
  std::ostringstream os;
  os.precision(17);
  os << v;
  return os.str();
}

inline std::string show(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c >= 0x20 && c < 0x7f && c != '"' && c != '\\') {
      out += char(c);
    } else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", unsigned(c));
      out += buf;
    }
  }
  return out + "\"";
}

inline std::string show(const char* s) { return show(std::string(s)); }
inline std::string show(bool b) { return b ? "true" : "false"; }

template <typename A, typename B>
void check_eq(const A& a, const B& b, const char* ea, const char* eb, const char* file, int line) {
  ++counters().checks;
  if (!(a == b)) fail(file, line, std::string(ea) + " == " + eb + "\n    left:  " + show(a) + "\n    right: " + show(b));
}

// |a - b| <= rel * max(|b|, floor): a relative tolerance, with `floor` the smallest magnitude it is taken of
inline void check_near(double a, double b, double rel, double floor, const char* ea, const char* eb, const char* file,
                       int line) {
  ++counters().checks;
  const double tol = rel * std::fmax(std::fabs(b), floor);
  if (!(std::fabs(a - b) <= tol))
    fail(file, line,
         std::string(ea) + " ~= " + eb + "\n    left:  " + show(a) + "\n    right: " + show(b) +
             "\n    diff:  " + show(std::fabs(a - b)) + " > " + show(tol));
}

// The distance in units in the last place between two finite floats (of the same sign or zero).
inline int64_t ulp_distance(float a, float b) {
  int32_t ia, ib;
  std::memcpy(&ia, &a, 4);
  std::memcpy(&ib, &b, 4);
  if (ia < 0) ia = INT32_MIN - ia;
  if (ib < 0) ib = INT32_MIN - ib;
  return ia > ib ? int64_t(ia) - ib : int64_t(ib) - ia;
}

}  // namespace bstest

#define BSTEST_CAT2(a, b) a##b
#define BSTEST_CAT(a, b) BSTEST_CAT2(a, b)

#define TEST_CASE(suite, name)                                                                        \
  static void BSTEST_CAT(test_, BSTEST_CAT(suite, BSTEST_CAT(_, name)))();                              \
  static const bstest::Register BSTEST_CAT(reg_, BSTEST_CAT(suite, BSTEST_CAT(_, name)))(               \
      #suite, #name, &BSTEST_CAT(test_, BSTEST_CAT(suite, BSTEST_CAT(_, name))));                       \
  static void BSTEST_CAT(test_, BSTEST_CAT(suite, BSTEST_CAT(_, name)))()

#define CHECK(cond)                                                   \
  do {                                                                \
    ++bstest::counters().checks;                                      \
    if (!(cond)) bstest::fail(__FILE__, __LINE__, "CHECK(" #cond ")"); \
  } while (0)

#define CHECK_EQ(a, b) bstest::check_eq((a), (b), #a, #b, __FILE__, __LINE__)

#define CHECK_NEAR(a, b, rel, floor) bstest::check_near((a), (b), (rel), (floor), #a, #b, __FILE__, __LINE__)

// `stmt` must throw `Exc` (or a type derived from it) whose what() contains `part`.
#define CHECK_THROWS(stmt, Exc, part)                                                                      \
  do {                                                                                                     \
    ++bstest::counters().checks;                                                                           \
    bool bstest_threw = false;                                                                             \
    try {                                                                                                  \
      stmt;                                                                                                \
    } catch (const Exc& bstest_e) {                                                                        \
      bstest_threw = true;                                                                                 \
      if (std::string(bstest_e.what()).find(part) == std::string::npos)                                   \
        bstest::fail(__FILE__, __LINE__,                                                                   \
                     std::string(#stmt " threw " #Exc " without \"") + (part) + "\": " + bstest_e.what()); \
    } catch (const std::exception& bstest_e) {                                                             \
      bstest_threw = true;                                                                                 \
      bstest::fail(__FILE__, __LINE__, std::string(#stmt " threw another exception: ") + bstest_e.what()); \
    }                                                                                                      \
    if (!bstest_threw) bstest::fail(__FILE__, __LINE__, #stmt " did not throw " #Exc);                     \
  } while (0)
