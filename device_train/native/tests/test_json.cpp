// json.h: the reader (values, numbers, strings and escapes, literals, refusals with the position) and
// the writer's canonical form.
#include <string>

#include "../formats.h"
#include "../json.h"
#include "check.h"

using blockskip::json::Error;
using blockskip::json::Value;
using blockskip::json::parse;

TEST_CASE(json, nested_objects_and_arrays) {
  const Value v = parse(R"( {"b": {"x": [1, [2, {"c": []}], {}]}, "a": "s", "e": {}} )");
  CHECK(v.is_object());
  CHECK_EQ(v.size(), size_t(3));
  // members keep the order they were written in
  const auto& members = v.as_object();
  CHECK_EQ(members[0].first, std::string("b"));
  CHECK_EQ(members[1].first, std::string("a"));
  CHECK_EQ(members[2].first, std::string("e"));
  const Value& x = v.at("b").at("x");
  CHECK(x.is_array());
  CHECK_EQ(x.size(), size_t(3));
  CHECK_EQ(x[0].as_int(), int64_t(1));
  CHECK(x[1].is_array());
  CHECK_EQ(x[1][0].as_int(), int64_t(2));
  CHECK(x[1][1].at("c").is_array());
  CHECK_EQ(x[1][1].at("c").size(), size_t(0));
  CHECK(x[2].is_object());
  CHECK_EQ(x[2].size(), size_t(0));
  CHECK_EQ(v.at("a").as_string(), std::string("s"));
  CHECK(v.find("missing") == nullptr);
  CHECK_THROWS(v.at("missing"), Error, "missing key \"missing\"");
  CHECK_THROWS(x[3], Error, "out of range");
  CHECK_THROWS(v.at("a").as_int("a"), Error, "a should be an integer, got a string");
}

TEST_CASE(json, numbers) {
  const Value v = parse("[0, -0, 42, -17, 1e3, 1.5E-2, -2.5e+2, 123456789012, 0.1, 1E400, -1e400, 5e-324]");
  CHECK_EQ(v.size(), size_t(12));
  CHECK_EQ(v[0].as_int(), int64_t(0));
  CHECK_EQ(v[1].as_double(), 0.0);
  CHECK_EQ(v[2].as_int(), int64_t(42));
  CHECK_EQ(v[3].as_int(), int64_t(-17));
  CHECK_EQ(v[4].as_double(), 1000.0);
  CHECK_EQ(v[4].as_int(), int64_t(1000));  // integral value, though not an integer token
  CHECK_EQ(v[5].as_double(), 0.015);
  CHECK_EQ(v[6].as_double(), -250.0);
  CHECK_EQ(v[7].as_int(), int64_t(123456789012));
  CHECK_EQ(v[8].as_double(), 0.1);
  CHECK_EQ(v[9].as_double(), HUGE_VAL);  // as Python's float() reads a huge literal
  CHECK_EQ(v[10].as_double(), -HUGE_VAL);
  CHECK_EQ(v[11].as_double(), 5e-324);
  // the token is kept as written (written back unchanged)
  CHECK_EQ(v[5].number_token(), std::string("1.5E-2"));
  CHECK_EQ(v[6].number_token(), std::string("-2.5e+2"));
  CHECK(v[2].is_integer_token());
  CHECK(v[3].is_integer_token());
  CHECK(!v[4].is_integer_token());
  CHECK(!v[8].is_integer_token());
  CHECK_EQ(blockskip::json::dump(v), std::string("[0,-0,42,-17,1e3,1.5E-2,-2.5e+2,123456789012,0.1,1E400,-1e400,5e-324]"));
  CHECK_THROWS(parse("1.5").as_int("lr"), Error, "lr should be an integer, got 1.5");
  CHECK_THROWS(parse("1e300").as_int("n"), Error, "n should be an integer");
}

TEST_CASE(json, strings_and_escapes) {
  CHECK_EQ(parse(R"("a\"b\\c\nd\te\/f\bg\fh\ri")").as_string(), std::string("a\"b\\c\nd\te/f\bg\fh\ri"));
  CHECK_EQ(parse(R"("\u0041\u00e9\u20AC")").as_string(), std::string("A\xc3\xa9\xe2\x82\xac"));
  // a surrogate pair is one code point (U+1F600)
  CHECK_EQ(parse(R"("\ud83d\ude00")").as_string(), std::string("\xf0\x9f\x98\x80"));
  CHECK_EQ(parse(R"("\uD834\uDD1E!")").as_string(), std::string("\xf0\x9d\x84\x9e!"));
  // a lone surrogate is kept as is (Python's json reads it; encoded as surrogatepass encodes it)
  CHECK_EQ(parse(R"("\ud83d")").as_string(), std::string("\xed\xa0\xbd"));
  CHECK_EQ(parse(R"("\ud83dA")").as_string(), std::string("\xed\xa0\xbd" "A"));
  CHECK_EQ(parse(R"("\ud83d\u0041")").as_string(), std::string("\xed\xa0\xbd" "A"));
  CHECK_EQ(parse(R"("\ude00")").as_string(), std::string("\xed\xb8\x80"));
  // UTF-8 in a string passes through
  CHECK_EQ(parse("\"caf\xc3\xa9 \xf0\x9f\x98\x80\"").as_string(), std::string("caf\xc3\xa9 \xf0\x9f\x98\x80"));
  CHECK_EQ(parse(R"("")").as_string(), std::string());
  // an embedded NUL through \u0000
  CHECK_EQ(parse(R"("a\u0000b")").as_string(), std::string("a\0b", 3));
  // the writer escapes what the reader unescapes (ensure_ascii, as Python's json.dumps)
  CHECK_EQ(blockskip::json::dump(parse(R"(["q\"\\\n\u00e9\ud83d\ude00"])")),
           std::string(R"(["q\"\\\n\u00e9\ud83d\ude00"])"));
}

TEST_CASE(json, literals_and_whitespace) {
  const Value v = parse(" \t\r\n[true ,false,\nnull ] \n");
  CHECK_EQ(v.size(), size_t(3));
  CHECK(v[0].is_bool());
  CHECK_EQ(v[0].as_bool(), true);
  CHECK_EQ(v[1].as_bool(), false);
  CHECK(v[2].is_null());
  CHECK(parse("null").is_null());
  CHECK_EQ(parse("true").as_bool(), true);
  CHECK_EQ(parse(" 7 ").as_int(), int64_t(7));
  CHECK_THROWS(parse("null").as_bool("flag"), Error, "flag should be a boolean, got null");
}

TEST_CASE(json, refuses_malformed_input) {
  // trailing garbage
  CHECK_THROWS(parse("{} x"), Error, "trailing characters");
  CHECK_THROWS(parse("1 2"), Error, "trailing characters");
  CHECK_THROWS(parse("[1]]"), Error, "trailing characters");
  CHECK_THROWS(parse("01"), Error, "trailing characters");
  CHECK_THROWS(parse("truex"), Error, "trailing characters");
  // unterminated
  CHECK_THROWS(parse("\"abc"), Error, "unterminated string");
  CHECK_THROWS(parse("\"abc\\"), Error, "unterminated escape");
  CHECK_THROWS(parse("[1, 2"), Error, "unterminated array");
  CHECK_THROWS(parse("{\"a\": 1"), Error, "unterminated object");
  CHECK_THROWS(parse(""), Error, "unexpected end of JSON");
  CHECK_THROWS(parse("   "), Error, "unexpected end of JSON");
  CHECK_THROWS(parse("[1,"), Error, "unexpected end of JSON");
  // objects
  CHECK_THROWS(parse("{\"a\" 1}"), Error, "expected ':' after a key");
  CHECK_THROWS(parse("{\"a\"}"), Error, "expected ':' after a key");
  CHECK_THROWS(parse("{a: 1}"), Error, "expected a string key");
  CHECK_THROWS(parse("{\"a\": 1,}"), Error, "expected a string key");
  CHECK_THROWS(parse("{\"a\": 1 \"b\": 2}"), Error, "expected ',' or '}'");
  CHECK_THROWS(parse("{\"a\": 1, \"a\": 2}"), Error, "the key \"a\" appears twice");
  // arrays
  CHECK_THROWS(parse("[1 2]"), Error, "expected ',' or ']'");
  CHECK_THROWS(parse("[1,]"), Error, "unexpected character ']'");
  // numbers
  CHECK_THROWS(parse("-"), Error, "bad number");
  CHECK_THROWS(parse("-a"), Error, "bad number");
  CHECK_THROWS(parse("1."), Error, "bad number");
  CHECK_THROWS(parse("1.e5"), Error, "bad number");
  CHECK_THROWS(parse("1e"), Error, "bad number");
  CHECK_THROWS(parse("1e+"), Error, "bad number");
  CHECK_THROWS(parse(".5"), Error, "unexpected character '.'");
  CHECK_THROWS(parse("+1"), Error, "unexpected character '+'");
  CHECK_THROWS(parse("0x10"), Error, "trailing characters");
  CHECK_THROWS(parse("NaN"), Error, "NaN and Infinity are not JSON numbers");
  CHECK_THROWS(parse("[-Infinity]"), Error, "NaN and Infinity are not JSON numbers");
  // strings
  CHECK_THROWS(parse("\"a\\x\""), Error, "bad escape '\\x'");
  CHECK_THROWS(parse("\"\\u12g4\""), Error, "bad hex digit");
  CHECK_THROWS(parse("\"\\u12"), Error, "truncated \\u escape");
  CHECK_THROWS(parse("\"a\nb\""), Error, "control character in a string");
  CHECK_THROWS(parse("\"\xff\""), Error, "not valid UTF-8");
  CHECK_THROWS(parse("\"\xc3\""), Error, "not valid UTF-8");
  CHECK_THROWS(parse("\"\xe0\x80\x80\""), Error, "not valid UTF-8");  // overlong
  CHECK_THROWS(parse("'a'"), Error, "unexpected character '''");
  CHECK_THROWS(parse("\xef\xbb\xbf{}"), Error, "byte-order mark");
  CHECK_THROWS(parse("tru"), Error, "unexpected character 't'");
  // the message says where
  CHECK_THROWS(parse("{\n  \"a\" 1}"), Error, "(line 2, column 7)");
}

TEST_CASE(json, nesting_limit) {
  const int n = blockskip::formats::kMaxJsonDepth;
  const std::string ok = std::string(size_t(n), '[') + std::string(size_t(n), ']');
  CHECK_EQ(parse(ok).size(), size_t(n > 1 ? 1 : 0));
  const std::string deep = std::string(size_t(n) + 1, '[') + std::string(size_t(n) + 1, ']');
  CHECK_THROWS(parse(deep), Error, "nested deeper than");
}

TEST_CASE(json, canonical_form) {
  // Python's json.dumps(json.loads(text), sort_keys=True, separators=(",", ":")): integers as written
  // (-0 as 0), other numbers as repr(float), keys sorted at every level
  const Value v = parse(R"({"b": 1, "a": [1.0, -0, 1e2, 0.10, 1e-5, 12345678901234567890], "c": {"z": null, "y": "\u00e9"}})");
  CHECK_EQ(blockskip::json::dump_canonical(v),
           std::string(R"({"a":[1.0,0,100.0,0.1,1e-05,12345678901234567890],"b":1,"c":{"y":"\u00e9","z":null}})"));
  CHECK(blockskip::json::equal(parse("[1, 2.0]"), parse("[1.0, 2]")));
  CHECK(!blockskip::json::equal(parse("[1, 2]"), parse("[1, 3]")));
  CHECK(!blockskip::json::equal(parse("{\"a\": 1}"), parse("{\"b\": 1}")));
  CHECK_EQ(blockskip::json::format_double(0.1), std::string("0.1"));
  CHECK_EQ(blockskip::json::format_double(1e16), std::string("1e+16"));
  CHECK_EQ(blockskip::json::format_double(-2.5e-5), std::string("-2.5e-05"));
  CHECK_EQ(blockskip::json::format_double(123.0), std::string("123.0"));
}
