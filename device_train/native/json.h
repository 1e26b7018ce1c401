// A small JSON reader/writer for the runner's inputs and outputs: manifest.json, the cache's
// index.json, safetensors headers, checkpoints' embedded logs and train_log.json.
//
// Objects keep their key order. Numbers keep the exact text they were read from, so a value read
// from a file is written back unchanged (the cache's identity hash depends on that).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace blockskip {
namespace json {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class Value {
 public:
  enum class Type { Null, Bool, Number, String, Array, Object };

  Value() = default;
  static Value null() { return Value(); }
  static Value boolean(bool b);
  static Value number(double d);  // written as Python's repr(float) writes it
  static Value integer(int64_t i);
  static Value number_raw(double d, std::string token);  // a number written as `token` (as read)
  static Value string(std::string s);
  static Value array();
  static Value object();

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::Null; }
  bool is_bool() const { return type_ == Type::Bool; }
  bool is_number() const { return type_ == Type::Number; }
  bool is_string() const { return type_ == Type::String; }
  bool is_array() const { return type_ == Type::Array; }
  bool is_object() const { return type_ == Type::Object; }

  // Typed access; throws json::Error naming `what` when the type does not fit.
  bool as_bool(const std::string& what = "value") const;
  double as_double(const std::string& what = "value") const;
  int64_t as_int(const std::string& what = "value") const;  // integral numbers only
  const std::string& as_string(const std::string& what = "value") const;
  const std::vector<Value>& as_array(const std::string& what = "value") const;
  const std::vector<std::pair<std::string, Value>>& as_object(const std::string& what = "value") const;
  const std::string& number_token() const { return text_; }
  // A number written without '.', 'e' or 'E' (JSON Schema's "integer"; Python's json reads it as an int).
  bool is_integer_token() const;

  // Object access. find() returns nullptr when the key is absent (or this is not an object);
  // at() throws json::Error naming the key.
  const Value* find(const std::string& key) const;
  const Value& at(const std::string& key) const;
  Value& set(const std::string& key, Value v);  // replaces an existing key in place
  void append(std::string key, Value v);         // adds a member without looking for the key
  bool erase(const std::string& key);

  // Array access.
  Value& push_back(Value v);
  size_t size() const;  // elements of an array or members of an object
  const Value& operator[](size_t i) const;

 private:
  Type type_ = Type::Null;
  bool bool_ = false;
  double num_ = 0.0;
  std::string text_;  // string value, or a number's token
  std::vector<Value> arr_;
  std::vector<std::pair<std::string, Value>> obj_;
};

Value parse(const std::string& text);
Value parse_file(const std::string& path);

struct DumpOptions {
  int indent = -1;          // < 0: one line
  bool sort_keys = false;
  bool python_separators = false;  // ", " and ": " on one line, as Python's json.dumps default
  bool ensure_ascii = true;        // escape non-ASCII as \uXXXX, as Python's json.dumps default
  bool python_numbers = false;     // numbers as Python writes what it read (see dump_canonical)
  bool allow_nan = true;           // python_numbers: a non-finite number as Infinity (else json::Error)
};

std::string dump(const Value& v, const DumpOptions& opts = DumpOptions());

// Python's json.dumps(v, sort_keys=True) byte for byte (for hashing what Python hashes).
std::string dump_python_sorted(const Value& v);

// The canonical form of a document (runtime/formats.py canonical_json): Python's json.dumps(v,
// sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False) of the document Python's
// json reads from the same text: integers as written (-0 as 0), other numbers as repr(float) of their
// value. json::Error for a non-finite number.
std::string dump_canonical(const Value& v);

// Python's == between the values Python's json reads for `a` and `b` (numbers by value, 1 == 1.0).
bool equal(const Value& a, const Value& b);

// repr(float) of Python for a finite double (shortest round-trip digits).
std::string format_double(double d);

}  // namespace json
}  // namespace blockskip
