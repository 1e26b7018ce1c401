#include "schema.h"

#include <cmath>
#include <map>
#include <memory>
#include <mutex>
#include <regex>
#include <unordered_map>
#include <utility>
#include <vector>

#include "common.h"
#include "formats.h"

namespace blockskip {
namespace schema {

namespace {

using json::Value;
using T = Value::Type;

// One schema, parsed, its definitions found and its patterns compiled (immutable once made, so the
// prefetching threads share it).
struct Compiled {
  Value doc;
  std::map<std::string, const Value*> defs;
  std::unordered_map<std::string, std::regex> regex;
  struct Rule {
    std::string check;
    const Value* a = nullptr;
    const Value* b = nullptr;
  };
  std::vector<Rule> rules;

  void compile_patterns(const Value& s) {
    if (s.is_array()) {
      for (const auto& x : s.as_array()) compile_patterns(x);
      return;
    }
    if (!s.is_object()) return;
    for (const auto& kv : s.as_object()) {
      if (kv.first == "pattern" && kv.second.is_string()) add(kv.second.as_string());
      if (kv.first == "patternProperties" && kv.second.is_object())
        for (const auto& p : kv.second.as_object()) add(p.first);
      compile_patterns(kv.second);
    }
  }
  void add(const std::string& p) {
    if (!regex.count(p)) regex.emplace(p, std::regex(p, std::regex::ECMAScript));
  }
};

const Compiled& compiled(const char* text) {
  static std::mutex mu;
  static std::map<const char*, std::unique_ptr<Compiled>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = cache[text];
  if (!slot) {
    auto c = std::make_unique<Compiled>();
    c->doc = json::parse(text);
    if (const Value* defs = c->doc.find("$defs"))
      for (const auto& kv : defs->as_object()) c->defs[kv.first] = &kv.second;
    c->compile_patterns(c->doc);
    if (const Value* rules = c->doc.find("x-rules"))
      for (const auto& r : rules->as_array()) c->rules.push_back({r.at("check").as_string(), &r.at("a"), &r.at("b")});
    slot = std::move(c);
  }
  return *slot;
}

// ------------------------------------------------------------------------------------------------
// words (runtime/schema_check.py: _path, _got, _describe)

// A path: object keys and array indices.
struct Part {
  bool index = false;
  size_t i = 0;
  std::string key;
};
using Path = std::vector<Part>;

Path plus(const Path& p, const std::string& key) {
  Path out = p;
  out.push_back({false, 0, key});
  return out;
}
Path plus(const Path& p, size_t i) {
  Path out = p;
  out.push_back({true, i, {}});
  return out;
}

std::string path_text(const Path& parts) {
  std::string out;
  for (const auto& p : parts) {
    if (p.index) out += "[" + std::to_string(p.i) + "]";
    else out += (out.empty() ? "" : ".") + p.key;
  }
  return out.empty() ? "the document" : out;
}

// Python's json.dumps(value) of the value Python reads
std::string py(const Value& v) {
  json::DumpOptions o;
  o.python_separators = true;
  o.ensure_ascii = true;
  o.python_numbers = true;
  return json::dump(v, o);
}

std::string got(const Value& v) {
  std::string t = py(v);
  return t.size() <= 60 ? t : t.substr(0, 57) + "...";
}

const char* article(const std::string& t) {
  static const std::map<std::string, const char*> a = {
      {"object", "an object"}, {"array", "an array"}, {"string", "a string"}, {"boolean", "true or false"},
      {"null", "null"}, {"integer", "an integer"}, {"number", "a number"}};
  auto it = a.find(t);
  return it == a.end() ? "a value" : it->second;
}

std::string ref_name(const Value& s) {
  const std::string& r = s.at("$ref").as_string();
  return r.substr(r.rfind('/') + 1);
}

std::string plural(const std::string& words) {
  static const std::pair<const char*, const char*> forms[] = {
      {"an integer", "integers"}, {"a number", "numbers"}, {"a string", "strings"}, {"an object", "objects"},
      {"an array", "arrays"}};
  for (const auto& f : forms) {
    const std::string one = f.first;
    if (words.compare(0, one.size(), one) == 0) return f.second + words.substr(one.size());
  }
  return words;
}

std::vector<std::string> types_of(const Value* t) {
  std::vector<std::string> out;
  if (!t) return out;
  if (t->is_string()) out.push_back(t->as_string());
  else if (t->is_array())
    for (const auto& x : t->as_array()) out.push_back(x.as_string());
  return out;
}

// ------------------------------------------------------------------------------------------------
// numbers

bool small_int(const Value& v, int64_t& out) {
  if (!v.is_integer_token()) return false;
  const std::string& t = v.number_token();
  char* end = nullptr;
  errno = 0;
  long long x = std::strtoll(t.c_str(), &end, 10);
  if (errno || *end) return false;
  out = x;
  return true;
}

// -1, 0, 1 as a < b, a == b, a > b (both numbers; exact for integers that fit int64)
int compare(const Value& a, const Value& b) {
  int64_t x = 0, y = 0;
  if (small_int(a, x) && small_int(b, y)) return x < y ? -1 : (x > y ? 1 : 0);
  const double p = a.as_double(), q = b.as_double();
  return p < q ? -1 : (p > q ? 1 : 0);
}

bool is_type(const Value& v, const std::string& t) {
  if (t == "integer") return v.is_integer_token();
  if (t == "number") return v.is_number();
  if (t == "object") return v.is_object();
  if (t == "array") return v.is_array();
  if (t == "string") return v.is_string();
  if (t == "boolean") return v.is_bool();
  if (t == "null") return v.is_null();
  return false;
}

bool nonfinite(const Value& v) { return v.is_number() && !v.is_integer_token() && !std::isfinite(v.as_double()); }

std::string float_text(double d) { return std::isnan(d) ? "nan" : (d > 0 ? "inf" : "-inf"); }

// ------------------------------------------------------------------------------------------------
// the checker (runtime/schema_check.py _Checker, keyword by keyword in the same order)

class Checker {
 public:
  explicit Checker(const Compiled& c) : c_(c) {}

  std::string describe(const Value& s) const {
    if (s.find("$ref") && s.size() == 1) return describe(def(s));
    if (const Value* k = s.find("const")) return py(*k);
    if (const Value* e = s.find("enum")) {
      std::string out = "one of ";
      for (size_t i = 0; i < e->size(); ++i) out += (i ? ", " : "") + py((*e)[i]);
      return out;
    }
    if (const Value* any = s.find("anyOf")) {
      std::string out;
      for (size_t i = 0; i < any->size(); ++i) out += (i ? " or " : "") + describe((*any)[i]);
      return out;
    }
    const Value* t = s.find("type");
    if (s.find("$ref") && !t) t = def(s).find("type");
    const std::vector<std::string> types = types_of(t);
    std::string words;
    for (size_t i = 0; i < types.size(); ++i) words += (i ? " or " : "") + std::string(article(types[i]));
    if (words.empty()) words = "a value";
    std::vector<std::string> bounds;
    for (const auto& kb : {std::make_pair("minimum", ">="), std::make_pair("exclusiveMinimum", ">"),
                           std::make_pair("maximum", "<="), std::make_pair("exclusiveMaximum", "<")})
      if (const Value* v = s.find(kb.first)) bounds.push_back(std::string(kb.second) + " " + py(*v));
    const Value* lo_v = s.find("minItems");
    const Value* hi_v = s.find("maxItems");
    if (lo_v || hi_v) {
      const std::string lo = lo_v ? py(*lo_v) : "0";
      if (hi_v && lo == py(*hi_v)) {
        bounds.push_back("of " + lo + " items");
      } else {
        const bool hi = hi_v && !(hi_v->is_number() && hi_v->as_double() == 0);
        bounds.push_back("of at least " + lo + (hi ? " and at most " + py(*hi_v) : "") + " items");
      }
    }
    if (const Value* p = s.find("pattern")) bounds.push_back("matching " + p->as_string());
    if (const Value* items = s.find("items"); items && types == std::vector<std::string>{"array"})
      words = "an array of " + plural(describe(*items));
    std::string b;
    for (size_t i = 0; i < bounds.size(); ++i) b += (i ? " and " : " ") + bounds[i];
    return words + b;
  }

  std::string fail(const Path& parts, const Value& s, const Value& value) const {
    return path_text(parts) + " must be " + describe(s) + " (got " + got(value) + ")";
  }

  std::string check(const Value& s, const Value& value, const Path& parts) const {
    if (s.is_bool()) return s.as_bool() ? "" : path_text(parts) + " is not allowed";
    if (!s.is_object() || s.size() == 0) return "";
    if (s.find("$ref")) {
      std::string err = check(def(s), value, parts);
      if (!err.empty()) return err;
    }
    if (nonfinite(value)) return path_text(parts) + " must be a finite number (got " + float_text(value.as_double()) + ")";
    if (const Value* t = s.find("type")) {
      bool ok = false;
      for (const auto& x : types_of(t)) ok = ok || is_type(value, x);
      if (!ok) return fail(parts, s, value);
    }
    if (const Value* k = s.find("const"); k && !json::equal(value, *k)) return fail(parts, s, value);
    if (const Value* e = s.find("enum")) {
      bool ok = false;
      for (const auto& x : e->as_array()) ok = ok || json::equal(value, x);
      if (!ok) return fail(parts, s, value);
    }
    if (value.is_number()) {
      const Value* v;
      if (((v = s.find("minimum")) && compare(value, *v) < 0) || ((v = s.find("maximum")) && compare(value, *v) > 0) ||
          ((v = s.find("exclusiveMinimum")) && compare(value, *v) <= 0) ||
          ((v = s.find("exclusiveMaximum")) && compare(value, *v) >= 0))
        return fail(parts, s, value);
    }
    if (value.is_string()) {
      if (const Value* p = s.find("pattern"); p && !matches(p->as_string(), value.as_string()))
        return fail(parts, s, value);
      if (const Value* inner_s = s.find("contentSchema")) {
        Value inner;
        try {
          inner = json::parse(value.as_string());
        } catch (const json::Error& e) {
          return path_text(parts) + " is not a JSON document (" + e.what() + ")";
        }
        std::string err = check(*inner_s, inner, parts);
        if (!err.empty()) return err;
      }
    }
    if (value.is_array()) {
      const auto& a = value.as_array();
      const Value* lo = s.find("minItems");
      const Value* hi = s.find("maxItems");
      if ((lo && double(a.size()) < lo->as_double()) || (hi && double(a.size()) > hi->as_double()))
        return fail(parts, s, value);
      size_t n_prefix = 0;
      if (const Value* prefix = s.find("prefixItems")) {
        n_prefix = prefix->size();
        for (size_t i = 0; i < n_prefix && i < a.size(); ++i) {
          std::string err = check((*prefix)[i], a[i], plus(parts, i));
          if (!err.empty()) return err;
        }
      }
      if (const Value* items = s.find("items"))
        for (size_t i = n_prefix; i < a.size(); ++i) {
          std::string err = check(*items, a[i], plus(parts, i));
          if (!err.empty()) return err;
        }
    }
    if (value.is_object()) {
      std::string err = object(s, value, parts);
      if (!err.empty()) return err;
    }
    if (const Value* all = s.find("allOf"))
      for (const auto& sub : all->as_array()) {
        std::string err = check(sub, value, parts);
        if (!err.empty()) return err;
      }
    if (const Value* any = s.find("anyOf")) {
      std::vector<std::string> errs;
      bool all_fail = true;
      for (const auto& sub : any->as_array()) {
        errs.push_back(check(sub, value, parts));
        all_fail = all_fail && !errs.back().empty();
      }
      if (all_fail) {
        // a value of the right type that breaks its own alternative: say that one's problem
        std::vector<std::string> typed;
        for (size_t i = 0; i < errs.size(); ++i)
          if (type_fits((*any)[i], value)) typed.push_back(errs[i]);
        return typed.size() == 1 ? typed[0] : fail(parts, s, value);
      }
    }
    if (const Value* n = s.find("not"); n && check(*n, value, parts).empty())
      return path_text(parts) + " is not allowed here (got " + got(value) + ")";
    return "";
  }

  bool matches(const std::string& pattern, const std::string& text) const {
    auto it = c_.regex.find(pattern);
    if (it != c_.regex.end()) return std::regex_search(text, it->second);
    return std::regex_search(text, std::regex(pattern, std::regex::ECMAScript));  // not met: every one is compiled
  }

 private:
  const Compiled& c_;

  const Value& def(const Value& s) const {
    auto it = c_.defs.find(ref_name(s));
    if (it == c_.defs.end()) throw std::logic_error("schema: unknown $ref " + s.at("$ref").as_string());
    return *it->second;
  }

  bool type_fits(const Value& s, const Value& value) const {
    const Value* t = s.find("type");
    if (!t && s.find("$ref")) t = def(s).find("type");
    if (!t) return true;
    for (const auto& x : types_of(t))
      if (is_type(value, x)) return true;
    return false;
  }

  std::string object(const Value& s, const Value& value, const Path& parts) const {
    if (const Value* req = s.find("required"))
      for (const auto& k : req->as_array())
        if (!value.find(k.as_string())) return path_text(plus(parts, k.as_string())) + " is missing";
    const Value* props = s.find("properties");
    const Value* pats = s.find("patternProperties");
    const Value* names = s.find("propertyNames");
    const Value* extra = s.find("additionalProperties");
    for (const auto& kv : value.as_object()) {
      const Path here = plus(parts, kv.first);
      if (names) {
        std::string err = check(*names, Value::string(kv.first), here);
        if (!err.empty())
          return path_text(here) + ": the key " + got(Value::string(kv.first)) + " is not a valid name (" + err + ")";
      }
      bool matched = false;
      if (const Value* sub = props ? props->find(kv.first) : nullptr) {
        matched = true;
        std::string err = check(*sub, kv.second, here);
        if (!err.empty()) return err;
      }
      if (pats)
        for (const auto& p : pats->as_object())
          if (matches(p.first, kv.first)) {
            matched = true;
            std::string err = check(p.second, kv.second, here);
            if (!err.empty()) return err;
          }
      if (!matched && extra) {
        if (extra->is_bool() && !extra->as_bool()) return path_text(here) + " is not a key " + path_text(parts) + " may have";
        if (extra->is_object()) {
          std::string err = check(*extra, kv.second, here);
          if (!err.empty()) return err;
        }
      }
    }
    return "";
  }
};

// ------------------------------------------------------------------------------------------------
// the rules between values (runtime/schema_check.py _select, _rule)

std::vector<std::pair<Path, const Value*>> select(const Value& doc, const Value& path) {
  std::vector<std::pair<Path, const Value*>> out{{Path{}, &doc}};
  for (const auto& seg : path.as_array()) {
    std::vector<std::pair<Path, const Value*>> next;
    for (const auto& pv : out) {
      const Value& v = *pv.second;
      if (seg.is_string() && seg.as_string() == "*") {
        if (v.is_array())
          for (size_t i = 0; i < v.size(); ++i) next.emplace_back(plus(pv.first, i), &v[i]);
        else if (v.is_object())
          for (const auto& kv : v.as_object()) next.emplace_back(plus(pv.first, kv.first), &kv.second);
      } else if (seg.is_number()) {
        const int64_t i = seg.as_int();
        if (v.is_array() && i >= 0 && size_t(i) < v.size()) next.emplace_back(plus(pv.first, size_t(i)), &v[size_t(i)]);
      } else if (const Value* x = v.find(seg.as_string())) {
        next.emplace_back(plus(pv.first, seg.as_string()), x);
      }
    }
    out = std::move(next);
  }
  return out;
}

// "123" (ASCII digits) below n
bool decimal_below(const std::string& key, size_t n) {
  if (key.empty() || key.find_first_not_of("0123456789") != std::string::npos) return false;
  const size_t nz = key.find_first_not_of('0');
  if (nz == std::string::npos) return n > 0;
  const std::string d = key.substr(nz);
  if (d.size() > 18) return false;
  return std::stoull(d) < n;
}

std::string rule(const std::string& check, const Value& a, const Value& b, const Value& doc) {
  const auto target = select(doc, b);
  if (target.empty()) return "";
  const Value& bv = *target[0].second;
  const std::string bn = path_text(target[0].first);
  for (const auto& ap : select(doc, a)) {
    const Value& av = *ap.second;
    const std::string an = path_text(ap.first);
    if ((check == "lt" || check == "le") && av.is_number() && bv.is_number()) {
      const int c = compare(av, bv);
      if (!(check == "lt" ? c < 0 : c <= 0))
        return an + " (" + got(av) + ") must be " + (check == "lt" ? "<" : "<=") + " " + bn + " (" + got(bv) + ")";
    } else if (check == "eq") {
      if (!json::equal(av, bv)) return an + " (" + got(av) + ") must equal " + bn + " (" + got(bv) + ")";
    } else if (check == "multiple_of" && av.is_integer_token() && bv.is_integer_token() && compare(bv, Value::integer(0)) > 0) {
      int64_t x = 0, y = 0;
      const bool exact = small_int(av, x) && small_int(bv, y);
      const bool multiple = exact ? x % y == 0 : std::fmod(av.as_double(), bv.as_double()) == 0;
      if (!multiple) return an + " (" + py(av) + ") must be a multiple of " + bn + " (" + py(bv) + ")";
    } else if (check == "index_into" && bv.is_array()) {
      if (!(av.is_integer_token() && compare(av, Value::integer(0)) >= 0 &&
            compare(av, Value::integer(int64_t(bv.size()))) < 0))
        return an + " (" + got(av) + ") must index " + bn + ": an integer from 0 to " + std::to_string(int64_t(bv.size()) - 1);
    } else if (check == "key_in" && bv.is_object()) {
      if (!av.is_null() && (!av.is_string() || !bv.find(av.as_string())))
        return an + " (" + got(av) + ") is not a key of " + bn;
    } else if (check == "same_length" && av.is_array() && bv.is_array()) {
      if (av.size() != bv.size())
        return an + " has " + std::to_string(av.size()) + " items but " + bn + " has " + std::to_string(bv.size()) +
               ": they must have as many";
    } else if (check == "keys_index" && av.is_object() && bv.is_array()) {
      for (const auto& kv : av.as_object())
        if (!decimal_below(kv.first, bv.size()))
          return an + " has the key " + got(Value::string(kv.first)) + ", which does not index " + bn + " (0 to " +
                 std::to_string(int64_t(bv.size()) - 1) + ")";
    }
  }
  return "";
}

// the nesting of containers (a document's top level is 1)
int depth(const Value& doc) {
  int deepest = 0;
  std::vector<std::pair<const Value*, int>> todo{{&doc, 1}};
  while (!todo.empty()) {
    auto [v, d] = todo.back();
    todo.pop_back();
    if (!v->is_array() && !v->is_object()) continue;
    deepest = std::max(deepest, d);
    if (d > formats::kMaxJsonDepth) continue;
    if (v->is_array())
      for (const auto& x : v->as_array()) todo.emplace_back(&x, d + 1);
    else
      for (const auto& kv : v->as_object()) todo.emplace_back(&kv.second, d + 1);
  }
  return deepest;
}

}  // namespace

std::string problem(const char* schema_text, const json::Value& doc) {
  if (depth(doc) > formats::kMaxJsonDepth) return "nested deeper than " + std::to_string(formats::kMaxJsonDepth) + " levels";
  const Compiled& c = compiled(schema_text);
  std::string err = Checker(c).check(c.doc, doc, Path{});
  if (!err.empty()) return err;
  for (const auto& r : c.rules) {
    err = rule(r.check, *r.a, *r.b, doc);
    if (!err.empty()) return err;
  }
  return "";
}

void check_document(const char* schema_text, const json::Value& doc, const std::string& what, const std::string& advice) {
  const std::string err = problem(schema_text, doc);
  if (!err.empty()) throw FormatError(what + ": " + err + "; " + advice);
}

}  // namespace schema
}  // namespace blockskip
