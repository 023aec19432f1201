//! YAML documents to JSON values, remembering the source line of every field path, so that
//! any error found later (by serde or by validation) can name the line.

use std::collections::HashMap;

use saphyr::{LoadableYamlNode, MarkedYaml, Scalar, YamlData};
use saphyr_parser::Event;
use serde_json::{Map, Number, Value};

/// One YAML document of a file.
#[derive(Debug)]
pub struct Document {
    pub value: Value,
    pub lines: LineIndex,
    /// 1-based line where the document's content starts.
    pub line: usize,
}

/// Field path (`spec.rules[0].filters[0].cors.allowOrigins[1]`) to 1-based line.
#[derive(Debug, Default)]
pub struct LineIndex(HashMap<String, usize>);

impl LineIndex {
    /// The line of `path`, or of its nearest ancestor that exists in the source (an omitted
    /// field is reported at the object that should have held it).
    pub fn line_of(&self, path: &str) -> Option<usize> {
        let mut p = path;
        loop {
            if let Some(line) = self.0.get(p) {
                return Some(*line);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct YamlError {
    pub line: usize,
    pub reason: String,
}

/// Deeper than any Kubernetes resource nests; the YAML tree loader recurses per level, so
/// without a bound a small file of `- - - ...` would overflow the stack.
const MAX_DEPTH: usize = 64;

/// Parses every document in `text`; empty documents (a leading `---`, a trailing one) are
/// skipped.
pub fn parse_documents(text: &str) -> Result<Vec<Document>, YamlError> {
    check_depth(text)?;
    let docs = MarkedYaml::load_from_str(text).map_err(|e| YamlError {
        line: e.marker().line(),
        reason: e.info().to_string(),
    })?;
    let mut out = Vec::with_capacity(docs.len());
    for doc in &docs {
        if matches!(doc.data, YamlData::Value(Scalar::Null)) {
            continue;
        }
        let mut lines = LineIndex::default();
        let mut path = String::new();
        let value = convert(doc, &mut path, &mut lines)?;
        out.push(Document {
            value,
            lines,
            line: doc.span.start.line(),
        });
    }
    Ok(out)
}

/// Walks the event stream (the parser itself keeps an explicit stack) and refuses nesting
/// deeper than [`MAX_DEPTH`] before anything recursive runs.
fn check_depth(text: &str) -> Result<(), YamlError> {
    let mut depth = 0usize;
    for event in saphyr_parser::Parser::new_from_str(text) {
        let (event, span) = event.map_err(|e| YamlError {
            line: e.marker().line(),
            reason: e.info().to_string(),
        })?;
        match event {
            Event::SequenceStart(..) | Event::MappingStart(..) => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(YamlError {
                        line: span.start.line(),
                        reason: format!("nested more than {MAX_DEPTH} levels deep"),
                    });
                }
            }
            Event::SequenceEnd | Event::MappingEnd => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

fn convert(
    node: &MarkedYaml<'_>,
    path: &mut String,
    lines: &mut LineIndex,
) -> Result<Value, YamlError> {
    let line = node.span.start.line();
    lines.0.entry(path.clone()).or_insert(line);
    let err = |reason: String| YamlError { line, reason };
    Ok(match &node.data {
        YamlData::Value(s) => scalar(s).ok_or_else(|| err("a number that is not finite".into()))?,
        YamlData::Representation(s, _, _) => Value::String(s.to_string()),
        YamlData::Sequence(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                out.push(convert(item, path, lines)?);
                path.truncate(len);
            }
            Value::Array(out)
        }
        YamlData::Mapping(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                let key = match &k.data {
                    YamlData::Value(Scalar::String(s)) => s.to_string(),
                    YamlData::Value(s) => match scalar(s) {
                        Some(Value::String(s)) => s,
                        Some(other) => other.to_string(),
                        None => return Err(err("a mapping key that is not a plain value".into())),
                    },
                    YamlData::Representation(s, _, _) => s.to_string(),
                    _ => {
                        return Err(YamlError {
                            line: k.span.start.line(),
                            reason: "a mapping key that is not a plain value".into(),
                        });
                    }
                };
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(&key);
                lines.0.insert(path.clone(), k.span.start.line());
                let value = convert(v, path, lines)?;
                path.truncate(len);
                if out.insert(key.clone(), value).is_some() {
                    return Err(YamlError {
                        line: k.span.start.line(),
                        reason: format!("duplicate key {key:?}"),
                    });
                }
            }
            Value::Object(out)
        }
        YamlData::Tagged(_, inner) => convert(inner, path, lines)?,
        YamlData::Alias(_) => return Err(err("YAML aliases (*name) are not supported".into())),
        YamlData::BadValue => return Err(err("a value that is not valid YAML".into())),
    })
}

fn scalar(s: &Scalar<'_>) -> Option<Value> {
    Some(match s {
        Scalar::Null => Value::Null,
        Scalar::Boolean(b) => Value::Bool(*b),
        Scalar::Integer(i) => Value::Number((*i).into()),
        Scalar::FloatingPoint(f) => Value::Number(Number::from_f64(f.into_inner())?),
        Scalar::String(s) => Value::String(s.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_lines_of_nested_fields() {
        let text = "a: 1\n---\nkind: X\nspec:\n  list:\n  - one\n  - two: 2\n";
        let docs = parse_documents(text).unwrap();
        assert_eq!(docs.len(), 2);
        let d = &docs[1];
        assert_eq!(d.lines.line_of("kind"), Some(3));
        assert_eq!(d.lines.line_of("spec.list[1].two"), Some(7));
        assert_eq!(d.lines.line_of("spec.list[0]"), Some(6));
        assert_eq!(d.lines.line_of("spec.list[1].missing.deeper"), Some(7));
        assert_eq!(d.value["spec"]["list"][1]["two"], 2);
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        for text in ["- ".repeat(20_000) + "x\n", "[".repeat(20_000)] {
            let e = parse_documents(&text).unwrap_err();
            assert!(
                e.reason.contains("nested") || e.reason.contains("recursion"),
                "{e}"
            );
        }
        let fine = "a:\n  b: [[[1]]]\n";
        assert!(parse_documents(fine).is_ok());
    }

    #[test]
    fn duplicate_keys_and_syntax_errors_name_a_line() {
        let e = parse_documents("a: 1\na: 2\n").unwrap_err();
        assert_eq!(e.line, 2);
        let e = parse_documents("a: [1,\n").unwrap_err();
        assert!(e.line >= 1);
    }
}
