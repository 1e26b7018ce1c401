// Checks what the runner reads against its declared format before any work: the JSON Schemas that
// runtime/formats.py derives from the typed declarations (schemas.h, generated), then the rules between
// values the schemas carry as "x-rules" (runtime/formats.py RULES). runtime/schema_check.py checks the
// same schemas and rules in the Python runtime, with the same sentences.
//
// The JSON Schema subset those schemas use: $ref (#/$defs/X), type, properties, required,
// additionalProperties, patternProperties, propertyNames, items, prefixItems, minItems, maxItems, enum,
// const, minimum, maximum, exclusiveMinimum, exclusiveMaximum, pattern (ECMAScript, search), anyOf, allOf,
// not, contentSchema (a string holding a JSON document); description, title, $schema, $id ignored.
// "integer" is a number written without '.', 'e' or 'E'; true and false are not numbers.
#pragma once

#include <string>

#include "json.h"

namespace blockskip {
namespace schema {

// The first way `doc` breaks the schema `schema_text` (one of schemas.h's constants) or its x-rules, as
// one sentence naming the key path and what it may be, e.g. `plan.steps must be an integer >= 1 and
// <= 10000000 (got "10")`; "" when the document is fine. Each schema text is parsed once.
std::string problem(const char* schema_text, const json::Value& doc);

// Throws FormatError("<what>: <problem>; <advice>") when problem() finds one.
void check_document(const char* schema_text, const json::Value& doc, const std::string& what,
                    const std::string& advice);

}  // namespace schema
}  // namespace blockskip
