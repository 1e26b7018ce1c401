#include "json.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <unordered_set>

#include "formats.h"

namespace blockskip {
namespace json {

// ------------------------------------------------------------------------------------------
// Value

Value Value::boolean(bool b) {
  Value v;
  v.type_ = Type::Bool;
  v.bool_ = b;
  return v;
}

Value Value::number(double d) {
  Value v;
  v.type_ = Type::Number;
  v.num_ = d;
  v.text_ = format_double(d);
  return v;
}

Value Value::integer(int64_t i) {
  Value v;
  v.type_ = Type::Number;
  v.num_ = static_cast<double>(i);
  v.text_ = std::to_string(i);
  return v;
}

Value Value::number_raw(double d, std::string token) {
  Value v;
  v.type_ = Type::Number;
  v.num_ = d;
  v.text_ = std::move(token);
  return v;
}

Value Value::string(std::string s) {
  Value v;
  v.type_ = Type::String;
  v.text_ = std::move(s);
  return v;
}

Value Value::array() {
  Value v;
  v.type_ = Type::Array;
  return v;
}

Value Value::object() {
  Value v;
  v.type_ = Type::Object;
  return v;
}

static const char* type_name(Value::Type t) {
  switch (t) {
    case Value::Type::Null: return "null";
    case Value::Type::Bool: return "a boolean";
    case Value::Type::Number: return "a number";
    case Value::Type::String: return "a string";
    case Value::Type::Array: return "an array";
    case Value::Type::Object: return "an object";
  }
  return "?";
}

static Error type_error(const std::string& what, const char* want, Value::Type got) {
  return Error(what + " should be " + want + ", got " + type_name(got));
}

bool Value::as_bool(const std::string& what) const {
  if (!is_bool()) throw type_error(what, "a boolean", type_);
  return bool_;
}

double Value::as_double(const std::string& what) const {
  if (!is_number()) throw type_error(what, "a number", type_);
  return num_;
}

int64_t Value::as_int(const std::string& what) const {
  if (!is_number()) throw type_error(what, "an integer", type_);
  if (std::floor(num_) != num_ || std::fabs(num_) > 9.007199254740992e15)
    throw Error(what + " should be an integer, got " + text_);
  return static_cast<int64_t>(num_);
}

const std::string& Value::as_string(const std::string& what) const {
  if (!is_string()) throw type_error(what, "a string", type_);
  return text_;
}

const std::vector<Value>& Value::as_array(const std::string& what) const {
  if (!is_array()) throw type_error(what, "an array", type_);
  return arr_;
}

const std::vector<std::pair<std::string, Value>>& Value::as_object(const std::string& what) const {
  if (!is_object()) throw type_error(what, "an object", type_);
  return obj_;
}

const Value* Value::find(const std::string& key) const {
  if (!is_object()) return nullptr;
  for (const auto& kv : obj_)
    if (kv.first == key) return &kv.second;
  return nullptr;
}

const Value& Value::at(const std::string& key) const {
  if (!is_object()) throw Error("expected an object holding \"" + key + "\", got " + type_name(type_));
  const Value* v = find(key);
  if (!v) throw Error("missing key \"" + key + "\"");
  return *v;
}

Value& Value::set(const std::string& key, Value v) {
  if (!is_object()) throw Error("set(\"" + key + "\") on " + type_name(type_));
  for (auto& kv : obj_)
    if (kv.first == key) {
      kv.second = std::move(v);
      return kv.second;
    }
  obj_.emplace_back(key, std::move(v));
  return obj_.back().second;
}

void Value::append(std::string key, Value v) {
  if (!is_object()) throw Error("append(\"" + key + "\") on " + type_name(type_));
  obj_.emplace_back(std::move(key), std::move(v));
}

bool Value::is_integer_token() const {
  return is_number() && text_.find_first_of(".eE") == std::string::npos;
}

bool Value::erase(const std::string& key) {
  if (!is_object()) return false;
  auto it = std::find_if(obj_.begin(), obj_.end(), [&](const auto& kv) { return kv.first == key; });
  if (it == obj_.end()) return false;
  obj_.erase(it);
  return true;
}

Value& Value::push_back(Value v) {
  if (!is_array()) throw Error(std::string("push_back on ") + type_name(type_));
  arr_.push_back(std::move(v));
  return arr_.back();
}

size_t Value::size() const {
  if (is_array()) return arr_.size();
  if (is_object()) return obj_.size();
  return 0;
}

const Value& Value::operator[](size_t i) const {
  if (!is_array()) throw Error(std::string("index into ") + type_name(type_));
  if (i >= arr_.size()) throw Error("index " + std::to_string(i) + " out of range");
  return arr_[i];
}

// ------------------------------------------------------------------------------------------
// parser

namespace {

class Parser {
 public:
  explicit Parser(const std::string& s) : s_(s) {}

  Value document() {
    Value v = value(0);
    ws();
    if (i_ != s_.size()) fail("trailing characters after the JSON value");
    return v;
  }

 private:
  const std::string& s_;
  size_t i_ = 0;

  [[noreturn]] void fail(const std::string& msg) const {
    size_t line = 1, col = 1;
    for (size_t k = 0; k < i_ && k < s_.size(); ++k) {
      if (s_[k] == '\n') {
        ++line;
        col = 1;
      } else {
        ++col;
      }
    }
    throw Error(msg + " (line " + std::to_string(line) + ", column " + std::to_string(col) + ")");
  }

  void ws() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r')) ++i_;
  }

  bool literal(const char* word) {
    size_t n = std::char_traits<char>::length(word);
    if (s_.compare(i_, n, word) == 0) {
      i_ += n;
      return true;
    }
    return false;
  }

  // `depth`: the containers around this value (a document's top-level object or array is at depth 0
  // and nests 1 level); a container that would nest more than formats::kMaxJsonDepth levels is refused
  Value value(int depth) {
    ws();
    if (i_ >= s_.size()) fail("unexpected end of JSON");
    char c = s_[i_];
    if ((c == '{' || c == '[') && depth >= formats::kMaxJsonDepth)
      fail("JSON nested deeper than " + std::to_string(formats::kMaxJsonDepth) + " levels");
    if (c == '{') return object(depth);
    if (c == '[') return array(depth);
    if (c == '"') return Value::string(string());
    if (literal("true")) return Value::boolean(true);
    if (literal("false")) return Value::boolean(false);
    if (literal("null")) return Value();
    // NaN, Infinity and -Infinity (what Python's json writes for non-finite floats) are not JSON
    if (s_.compare(i_, 3, "NaN") == 0 || s_.compare(i_, 8, "Infinity") == 0 || s_.compare(i_, 9, "-Infinity") == 0)
      fail("NaN and Infinity are not JSON numbers");
    if (c == '-' || (c >= '0' && c <= '9')) return number();
    const unsigned char u = static_cast<unsigned char>(c);
    if (u >= 0x20 && u < 0x7f) fail(std::string("unexpected character '") + c + "'");
    char hex[8];
    std::snprintf(hex, sizeof hex, "0x%02X", unsigned(u));
    fail(std::string("unexpected byte ") + hex + (u == 0xEF && i_ == 0 ? " (a byte-order mark: JSON is UTF-8 without one)" : ""));
  }

  Value object(int depth) {
    Value v = Value::object();
    std::unordered_set<std::string> keys;
    ++i_;  // {
    ws();
    if (i_ < s_.size() && s_[i_] == '}') {
      ++i_;
      return v;
    }
    for (;;) {
      ws();
      if (i_ >= s_.size() || s_[i_] != '"') fail("expected a string key");
      const size_t key_at = i_;
      std::string key = string();
      if (!keys.insert(key).second) {
        i_ = key_at;
        fail("the key \"" + key + "\" appears twice in an object");
      }
      ws();
      if (i_ >= s_.size() || s_[i_] != ':') fail("expected ':' after a key");
      ++i_;
      Value item = value(depth + 1);
      v.append(std::move(key), std::move(item));
      ws();
      if (i_ >= s_.size()) fail("unterminated object");
      if (s_[i_] == ',') {
        ++i_;
        continue;
      }
      if (s_[i_] == '}') {
        ++i_;
        return v;
      }
      fail("expected ',' or '}' in an object");
    }
  }

  Value array(int depth) {
    Value v = Value::array();
    ++i_;  // [
    ws();
    if (i_ < s_.size() && s_[i_] == ']') {
      ++i_;
      return v;
    }
    for (;;) {
      v.push_back(value(depth + 1));
      ws();
      if (i_ >= s_.size()) fail("unterminated array");
      if (s_[i_] == ',') {
        ++i_;
        continue;
      }
      if (s_[i_] == ']') {
        ++i_;
        return v;
      }
      fail("expected ',' or ']' in an array");
    }
  }

  unsigned hex4() {
    if (i_ + 4 > s_.size()) fail("truncated \\u escape");
    unsigned u = 0;
    for (int k = 0; k < 4; ++k) {
      char h = s_[i_++];
      u <<= 4;
      if (h >= '0' && h <= '9') u |= unsigned(h - '0');
      else if (h >= 'a' && h <= 'f') u |= unsigned(h - 'a' + 10);
      else if (h >= 'A' && h <= 'F') u |= unsigned(h - 'A' + 10);
      else fail("bad hex digit in a \\u escape");
    }
    return u;
  }

  static void utf8(std::string& out, unsigned cp) {
    if (cp < 0x80) {
      out += char(cp);
    } else if (cp < 0x800) {
      out += char(0xC0 | (cp >> 6));
      out += char(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += char(0xE0 | (cp >> 12));
      out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    } else {
      out += char(0xF0 | (cp >> 18));
      out += char(0x80 | ((cp >> 12) & 0x3F));
      out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    }
  }

  std::string string() {
    ++i_;  // "
    std::string out;
    for (;;) {
      if (i_ >= s_.size()) fail("unterminated string");
      char c = s_[i_++];
      if (c == '"') return out;
      const unsigned char u = static_cast<unsigned char>(c);
      if (u < 0x20) fail("control character in a string");
      if (u >= 0x80) {  // one UTF-8 sequence, as Python's decoder takes it (surrogates allowed: surrogatepass)
        size_t n = 0;
        unsigned char lo = 0x80, hi = 0xBF;
        if (u >= 0xC2 && u <= 0xDF) n = 1;
        else if (u == 0xE0) n = 2, lo = 0xA0;
        else if (u >= 0xE1 && u <= 0xEF) n = 2;
        else if (u == 0xF0) n = 3, lo = 0x90;
        else if (u >= 0xF1 && u <= 0xF3) n = 3;
        else if (u == 0xF4) n = 3, hi = 0x8F;
        else fail("a string is not valid UTF-8");
        out += c;
        for (size_t k = 0; k < n; ++k, lo = 0x80, hi = 0xBF) {
          const unsigned char cc = i_ < s_.size() ? static_cast<unsigned char>(s_[i_]) : 0;
          if (cc < lo || cc > hi) fail("a string is not valid UTF-8");
          out += s_[i_++];
        }
        continue;
      }
      if (c != '\\') {
        out += c;
        continue;
      }
      if (i_ >= s_.size()) fail("unterminated escape");
      char e = s_[i_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00 && s_.compare(i_, 2, "\\u") == 0) {
            size_t save = i_;
            i_ += 2;
            unsigned lo = hex4();
            if (lo >= 0xDC00 && lo < 0xE000) {
              cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            } else {
              i_ = save;  // a lone high surrogate: keep it as is
            }
          }
          utf8(out, cp);
          break;
        }
        default: fail(std::string("bad escape '\\") + e + "'");
      }
    }
  }

  Value number() {
    size_t start = i_;
    if (s_[i_] == '-') ++i_;
    if (i_ >= s_.size() || !isdigit(static_cast<unsigned char>(s_[i_]))) fail("bad number");
    if (s_[i_] == '0') {
      ++i_;
    } else {
      while (i_ < s_.size() && isdigit(static_cast<unsigned char>(s_[i_]))) ++i_;
    }
    if (i_ < s_.size() && s_[i_] == '.') {
      ++i_;
      if (i_ >= s_.size() || !isdigit(static_cast<unsigned char>(s_[i_]))) fail("bad number");
      while (i_ < s_.size() && isdigit(static_cast<unsigned char>(s_[i_]))) ++i_;
    }
    if (i_ < s_.size() && (s_[i_] == 'e' || s_[i_] == 'E')) {
      ++i_;
      if (i_ < s_.size() && (s_[i_] == '+' || s_[i_] == '-')) ++i_;
      if (i_ >= s_.size() || !isdigit(static_cast<unsigned char>(s_[i_]))) fail("bad number");
      while (i_ < s_.size() && isdigit(static_cast<unsigned char>(s_[i_]))) ++i_;
    }
    std::string tok = s_.substr(start, i_ - start);
    double d = 0.0;
    auto r = std::from_chars(tok.data(), tok.data() + tok.size(), d);
    if (r.ec == std::errc::result_out_of_range) {
      d = (tok[0] == '-') ? -HUGE_VAL : HUGE_VAL;  // as Python's float() does for huge literals
    } else if (r.ec != std::errc()) {
      fail("bad number " + tok);
    }
    return Value::number_raw(d, std::move(tok));
  }
};

}  // namespace

Value parse(const std::string& text) { return Parser(text).document(); }

Value parse_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error("cannot read " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  try {
    return parse(ss.str());
  } catch (const Error& e) {
    throw Error(path + " is not valid JSON: " + e.what());
  }
}

// ------------------------------------------------------------------------------------------
// writer

std::string format_double(double d) {
  if (std::isnan(d)) return "NaN";
  if (std::isinf(d)) return d > 0 ? "Infinity" : "-Infinity";
  std::string sign = std::signbit(d) ? "-" : "";
  double a = std::fabs(d);
  if (a == 0.0) return sign + "0.0";
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof(buf), a, std::chars_format::scientific);
  std::string sci(buf, r.ptr);  // shortest round-trip digits: d[.ddd]e[+-]XX
  size_t e = sci.find('e');
  std::string digits = sci.substr(0, e);
  digits.erase(std::remove(digits.begin(), digits.end(), '.'), digits.end());
  int exp = std::atoi(sci.c_str() + e + 1);
  std::string out;
  if (exp >= -4 && exp < 16) {  // Python's repr: positional for 1e-4 <= |x| < 1e16
    if (exp >= 0) {
      std::string intpart = digits.substr(0, std::min<size_t>(digits.size(), size_t(exp) + 1));
      while (intpart.size() < size_t(exp) + 1) intpart += '0';
      std::string frac = digits.size() > size_t(exp) + 1 ? digits.substr(size_t(exp) + 1) : "0";
      out = intpart + "." + frac;
    } else {
      out = "0." + std::string(size_t(-exp - 1), '0') + digits;
    }
  } else {
    out = digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    char eb[16];
    std::snprintf(eb, sizeof(eb), "e%c%02d", exp < 0 ? '-' : '+', exp < 0 ? -exp : exp);
    out += eb;
  }
  return sign + out;
}

namespace {

void dump_string(std::string& out, const std::string& s, bool ensure_ascii) {
  static const char* hexd = "0123456789abcdef";
  auto u_escape = [&](unsigned u) {
    out += "\\u";
    out += hexd[(u >> 12) & 0xF];
    out += hexd[(u >> 8) & 0xF];
    out += hexd[(u >> 4) & 0xF];
    out += hexd[u & 0xF];
  };
  out += '"';
  for (size_t i = 0; i < s.size();) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    switch (c) {
      case '"': out += "\\\""; ++i; continue;
      case '\\': out += "\\\\"; ++i; continue;
      case '\n': out += "\\n"; ++i; continue;
      case '\r': out += "\\r"; ++i; continue;
      case '\t': out += "\\t"; ++i; continue;
      case '\b': out += "\\b"; ++i; continue;
      case '\f': out += "\\f"; ++i; continue;
      default: break;
    }
    if (c < 0x20) {
      u_escape(c);
      ++i;
      continue;
    }
    if (c < 0x80) {
      if (ensure_ascii && c == 0x7F) u_escape(c);
      else out += char(c);
      ++i;
      continue;
    }
    if (!ensure_ascii) {
      out += char(c);
      ++i;
      continue;
    }
    // decode one UTF-8 sequence (invalid bytes are escaped one by one)
    unsigned cp = 0;
    size_t n = 0;
    if ((c & 0xE0) == 0xC0) { cp = c & 0x1F; n = 1; }
    else if ((c & 0xF0) == 0xE0) { cp = c & 0x0F; n = 2; }
    else if ((c & 0xF8) == 0xF0) { cp = c & 0x07; n = 3; }
    bool ok = n > 0 && i + n < s.size() + 1;
    for (size_t k = 1; ok && k <= n; ++k) {
      if (i + k >= s.size()) { ok = false; break; }
      unsigned char cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xC0) != 0x80) { ok = false; break; }
      cp = (cp << 6) | (cc & 0x3F);
    }
    if (!ok) {
      u_escape(c);
      ++i;
      continue;
    }
    i += n + 1;
    if (cp >= 0x10000) {
      cp -= 0x10000;
      u_escape(0xD800 + (cp >> 10));
      u_escape(0xDC00 + (cp & 0x3FF));
    } else {
      u_escape(cp);
    }
  }
  out += '"';
}

void newline(std::string& out, const DumpOptions& o, int level) {
  out += '\n';
  out.append(size_t(o.indent) * size_t(level), ' ');
}

void dump_value(std::string& out, const Value& v, const DumpOptions& o, int level) {
  const char* item_sep = (o.indent >= 0) ? "," : (o.python_separators ? ", " : ",");
  const char* key_sep = (o.indent >= 0 || o.python_separators) ? ": " : ":";
  switch (v.type()) {
    case Value::Type::Null: out += "null"; return;
    case Value::Type::Bool: out += v.as_bool() ? "true" : "false"; return;
    case Value::Type::Number:
      if (!o.python_numbers) {
        out += v.number_token();
      } else if (v.is_integer_token()) {
        const std::string& t = v.number_token();
        out += t.find_first_not_of("-0") == std::string::npos ? "0" : t;  // -0 reads as the int 0
      } else {
        if (!o.allow_nan && !std::isfinite(v.as_double()))
          throw Error("a number out of range (" + v.number_token() + ")");
        out += format_double(v.as_double());
      }
      return;
    case Value::Type::String: dump_string(out, v.as_string(), o.ensure_ascii); return;
    case Value::Type::Array: {
      const auto& a = v.as_array();
      if (a.empty()) {
        out += "[]";
        return;
      }
      out += '[';
      for (size_t i = 0; i < a.size(); ++i) {
        if (i) out += item_sep;
        if (o.indent >= 0) newline(out, o, level + 1);
        dump_value(out, a[i], o, level + 1);
      }
      if (o.indent >= 0) newline(out, o, level);
      out += ']';
      return;
    }
    case Value::Type::Object: {
      const auto& ob = v.as_object();
      if (ob.empty()) {
        out += "{}";
        return;
      }
      std::vector<const std::pair<std::string, Value>*> items;
      for (const auto& kv : ob) items.push_back(&kv);
      if (o.sort_keys) {
        // Python sorts str keys by code point; UTF-8 byte order is the same order
        std::stable_sort(items.begin(), items.end(), [](auto* a, auto* b) { return a->first < b->first; });
      }
      out += '{';
      for (size_t i = 0; i < items.size(); ++i) {
        if (i) out += item_sep;
        if (o.indent >= 0) newline(out, o, level + 1);
        dump_string(out, items[i]->first, o.ensure_ascii);
        out += key_sep;
        dump_value(out, items[i]->second, o, level + 1);
      }
      if (o.indent >= 0) newline(out, o, level);
      out += '}';
      return;
    }
  }
}

}  // namespace

std::string dump(const Value& v, const DumpOptions& opts) {
  std::string out;
  dump_value(out, v, opts, 0);
  return out;
}

std::string dump_python_sorted(const Value& v) {
  DumpOptions o;
  o.sort_keys = true;
  o.python_separators = true;
  o.ensure_ascii = true;
  return dump(v, o);
}

std::string dump_canonical(const Value& v) {
  DumpOptions o;
  o.sort_keys = true;
  o.ensure_ascii = true;
  o.python_numbers = true;
  o.allow_nan = false;
  return dump(v, o);
}

namespace {

// An integer token's value when it fits int64.
bool small_int(const Value& v, int64_t& out) {
  if (!v.is_integer_token()) return false;
  const std::string& t = v.number_token();
  auto r = std::from_chars(t.data(), t.data() + t.size(), out);
  return r.ec == std::errc() && r.ptr == t.data() + t.size();
}

}  // namespace

bool equal(const Value& a, const Value& b) {
  using T = Value::Type;
  if (a.type() != b.type()) return false;
  switch (a.type()) {
    case T::Null: return true;
    case T::Bool: return a.as_bool() == b.as_bool();
    case T::String: return a.as_string() == b.as_string();
    case T::Number: {
      int64_t x = 0, y = 0;
      if (small_int(a, x) && small_int(b, y)) return x == y;
      if (a.is_integer_token() && b.is_integer_token()) {  // beyond int64: the same digits
        auto digits = [](const std::string& t) { return t == "-0" ? std::string("0") : t; };
        return digits(a.number_token()) == digits(b.number_token());
      }
      return a.as_double() == b.as_double();
    }
    case T::Array: {
      if (a.size() != b.size()) return false;
      for (size_t i = 0; i < a.size(); ++i)
        if (!equal(a[i], b[i])) return false;
      return true;
    }
    case T::Object: {
      if (a.size() != b.size()) return false;
      for (const auto& kv : a.as_object()) {
        const Value* o = b.find(kv.first);
        if (!o || !equal(kv.second, *o)) return false;
      }
      return true;
    }
  }
  return false;
}

}  // namespace json
}  // namespace blockskip
