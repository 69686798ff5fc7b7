//! Checks a JSON value against the part of JSON Schema the documented
//! shapes use (`docs/cli-json-schema.json`): `type` (one or several),
//! `enum`, `required`, `properties`, `additionalProperties: false`,
//! `items`, `oneOf`, `minimum` and local `$ref`s. Panics naming the first
//! place that does not fit.

use serde_json::Value;

/// The documented schema of `sessionfs <command> --json`.
pub fn cli_schema(command: &str) -> (Value, Value) {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/cli-json-schema.json");
    let doc: Value = serde_json::from_slice(&std::fs::read(&path).expect("the schema file"))
        .expect("the schema file is JSON");
    let schema = doc["$defs"][command].clone();
    assert!(
        schema.is_object(),
        "no schema for {command} in {}",
        path.display()
    );
    (doc, schema)
}

/// Panics unless `value` fits `schema` (whose `$ref`s point into `doc`).
pub fn check(doc: &Value, schema: &Value, value: &Value, at: &str) {
    if let Err(e) = fits(doc, schema, value, at) {
        panic!("{e}\nin {value:#}");
    }
}

fn fits(doc: &Value, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let target = doc
            .pointer(r.trim_start_matches('#'))
            .ok_or_else(|| format!("{at}: unresolved $ref {r}"))?;
        return fits(doc, target, v, at);
    }
    if let Some(options) = schema.get("oneOf").and_then(Value::as_array) {
        let matching = options
            .iter()
            .filter(|s| fits(doc, s, v, at).is_ok())
            .count();
        if matching != 1 {
            return Err(format!(
                "{at}: fits {matching} of the oneOf choices, not one"
            ));
        }
        return Ok(());
    }
    if let Some(t) = schema.get("type") {
        let types: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        let ok = types.iter().any(|t| match *t {
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            "array" => v.is_array(),
            "object" => v.is_object(),
            "null" => v.is_null(),
            _ => false,
        });
        if !ok {
            return Err(format!("{at}: {v} is not of type {t}"));
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
        if !allowed.contains(v) {
            return Err(format!("{at}: {v} is not one of {allowed:?}"));
        }
    }
    if let (Some(min), Some(n)) = (schema.get("minimum").and_then(Value::as_f64), v.as_f64()) {
        if n < min {
            return Err(format!("{at}: {n} is below {min}"));
        }
    }
    if let Some(o) = v.as_object() {
        for r in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let r = r.as_str().unwrap_or_default();
            if !o.contains_key(r) {
                return Err(format!("{at}: no {r:?}"));
            }
        }
        let props = schema.get("properties").and_then(Value::as_object);
        for (k, field) in o {
            match props.and_then(|p| p.get(k)) {
                Some(s) => fits(doc, s, field, &format!("{at}.{k}"))?,
                None if schema.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    return Err(format!("{at}: {k:?} is not documented"))
                }
                None => {}
            }
        }
    }
    if let (Some(items), Some(a)) = (schema.get("items"), v.as_array()) {
        for (i, item) in a.iter().enumerate() {
            fits(doc, items, item, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn what_does_not_fit_is_named() {
        let (doc, ls) = cli_schema("ls");
        let good = json!([{"path": "a", "type": "file", "mode": "0644", "size": 1, "uid": 0,
            "gid": 0, "mtime": "2026-01-01T00:00:00Z", "target": null}]);
        assert!(fits(&doc, &ls, &good, "ls").is_ok());
        let mut bad = good.clone();
        bad[0]["type"] = json!("socket");
        assert!(fits(&doc, &ls, &bad, "ls").unwrap_err().contains("socket"));
        let mut extra = good.clone();
        extra[0]["colour"] = json!("red");
        assert!(fits(&doc, &ls, &extra, "ls")
            .unwrap_err()
            .contains("not documented"));
        let mut missing = good;
        missing[0].as_object_mut().unwrap().remove("size");
        assert!(fits(&doc, &ls, &missing, "ls")
            .unwrap_err()
            .contains("no \"size\""));
    }
}
