// Runs the unit test cases: `blockskip-native-tests [suite...]` (all suites without arguments),
// `blockskip-native-tests --list` prints suite.name of each case.
#include <cstdio>
#include <exception>
#include <set>
#include <string>

#include "check.h"

int main(int argc, char** argv) {
  std::set<std::string> wanted;
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--list") {
      for (const auto& c : bstest::registry()) std::printf("%s.%s\n", c.suite, c.name);
      return 0;
    }
    wanted.insert(argv[i]);
  }
  std::set<std::string> seen;
  int cases = 0, failed_cases = 0;
  for (const auto& c : bstest::registry()) {
    if (!wanted.empty() && !wanted.count(c.suite)) continue;
    seen.insert(c.suite);
    ++cases;
    const long before = bstest::counters().failures;
    std::printf("[ RUN  ] %s.%s\n", c.suite, c.name);
    std::fflush(stdout);
    try {
      c.fn();
    } catch (const std::exception& e) {
      bstest::fail(__FILE__, __LINE__, std::string("unexpected exception: ") + e.what());
    } catch (...) {
      bstest::fail(__FILE__, __LINE__, "unexpected exception of an unknown type");
    }
    const bool ok = bstest::counters().failures == before;
    failed_cases += ok ? 0 : 1;
    std::printf("[ %s ] %s.%s\n", ok ? " OK " : "FAIL", c.suite, c.name);
    std::fflush(stdout);
  }
  int status = failed_cases ? 1 : 0;
  for (const auto& s : wanted)
    if (!seen.count(s)) {
      std::fprintf(stderr, "no test cases in suite \"%s\"\n", s.c_str());
      status = 1;
    }
  if (cases == 0) status = 1;
  std::printf("%d cases, %d failed; %ld checks, %ld failed\n", cases, failed_cases, bstest::counters().checks,
              bstest::counters().failures);
  return status;
}
