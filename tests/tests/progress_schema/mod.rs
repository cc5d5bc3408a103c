//! The JSON progress lines imgforge printed, each checked against the published schema
//! (`docs/progress-v1.schema.json`). Shared by the test files that read the stream.

use serde_json::Value;

const SCHEMA: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/progress-v1.schema.json"));

/// The events in `text` (one JSON object a line); panics on a line that is not JSON or does
/// not match the schema.
pub fn events(text: &str) -> Vec<Value> {
    let schema: Value = serde_json::from_str(SCHEMA).expect("the schema is JSON");
    let validator = jsonschema::draft202012::new(&schema).expect("the schema is a valid draft 2020-12 schema");
    text.lines()
        .map(|line| {
            let value: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            let errors: Vec<String> = validator.iter_errors(&value).map(|e| e.to_string()).collect();
            assert!(errors.is_empty(), "{line}\ndoes not match docs/progress-v1.schema.json: {errors:#?}");
            value
        })
        .collect()
}
