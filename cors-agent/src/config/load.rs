//! Files and folders to typed resources.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::diagnostic::{Diagnostic, Diagnostics, Severity};
use super::spec::{
    AGENTGATEWAY_GROUP, AgentgatewayPolicySpec, GATEWAY_GROUP, GatewaySpec, HttpRouteSpec, Object,
    TypeMeta,
};
use super::yaml::{self, LineIndex};

/// `kind namespace/name`, as users name resources.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceId {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// One resource and where it came from.
#[derive(Debug)]
pub struct Loaded<S> {
    pub id: ResourceId,
    pub file: Arc<Path>,
    pub line: usize,
    pub object: Object<S>,
    lines: Arc<LineIndex>,
    /// `items[3].` for a resource inside a `kind: List`, else empty.
    prefix: String,
}

impl<S> Loaded<S> {
    pub fn created(&self) -> Option<&str> {
        self.object.metadata.creation_timestamp.as_deref()
    }

    /// A diagnostic about `field` (a path inside this resource, like `spec.rules[0]`).
    pub fn diagnostic(
        &self,
        severity: Severity,
        field: &str,
        reason: impl Into<String>,
    ) -> Diagnostic {
        Diagnostic {
            severity,
            file: Some(self.file.to_path_buf()),
            line: self
                .lines
                .line_of(&format!("{}{}", self.prefix, field))
                .or(Some(self.line)),
            resource: Some(self.id.to_string()),
            field: (!field.is_empty()).then(|| field.to_string()),
            reason: reason.into(),
        }
    }

    pub fn line_of(&self, field: &str) -> usize {
        self.lines
            .line_of(&format!("{}{}", self.prefix, field))
            .unwrap_or(self.line)
    }
}

#[derive(Debug, Default)]
pub struct Resources {
    pub routes: Vec<Loaded<HttpRouteSpec>>,
    pub gateways: Vec<Loaded<GatewaySpec>>,
    pub policies: Vec<Loaded<AgentgatewayPolicySpec>>,
}

/// Loads every `-f` path: a file, or a folder whose `*.yaml` / `*.yml` files are read in name
/// order (not recursively, as kubectl does without `-R`).
pub fn load(paths: &[PathBuf]) -> (Resources, Diagnostics) {
    let mut out = Resources::default();
    let mut diags = Diagnostics::default();
    for path in paths {
        for file in expand(path, &mut diags) {
            load_file(&file, &mut out, &mut diags);
        }
    }
    (out, diags)
}

fn file_error(file: &Path, line: Option<usize>, reason: impl Into<String>) -> Diagnostic {
    Diagnostic {
        severity: Severity::Error,
        file: Some(file.to_path_buf()),
        line,
        resource: None,
        field: None,
        reason: reason.into(),
    }
}

fn expand(path: &Path, diags: &mut Diagnostics) -> Vec<PathBuf> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => {
            diags.push(file_error(path, None, format!("cannot read: {e}")));
            return vec![];
        }
    };
    if !meta.is_dir() {
        return vec![path.to_path_buf()];
    }
    let entries = match std::fs::read_dir(path) {
        Ok(e) => e,
        Err(e) => {
            diags.push(file_error(path, None, format!("cannot list folder: {e}")));
            return vec![];
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        diags.push(Diagnostic {
            severity: Severity::Warning,
            ..file_error(path, None, "folder holds no *.yaml or *.yml file")
        });
    }
    files
}

/// Far above any set of resources; a bound keeps `-f /dev/zero` from eating the memory.
const MAX_FILE_BYTES: u64 = 16 << 20;

fn read_text(file: &Path) -> Result<String, (Option<usize>, String)> {
    use std::io::Read;
    let meta = std::fs::metadata(file).map_err(|e| (None, format!("cannot read: {e}")))?;
    // A FIFO or device would block or never end.
    if !meta.is_file() {
        return Err((None, "not a regular file".into()));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(file)
        .and_then(|f| f.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| (None, format!("cannot read: {e}")))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err((None, format!("larger than {} MiB", MAX_FILE_BYTES >> 20)));
    }
    String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = valid.iter().filter(|b| **b == b'\n').count() + 1;
        (
            Some(line),
            format!("not UTF-8 text (invalid byte at offset {})", valid.len()),
        )
    })
}

fn load_file(file: &Path, out: &mut Resources, diags: &mut Diagnostics) {
    let text = match read_text(file) {
        Ok(t) => t,
        Err((line, reason)) => return diags.push(file_error(file, line, reason)),
    };
    let docs = match yaml::parse_documents(&text) {
        Ok(d) => d,
        Err(e) => {
            return diags.push(file_error(
                file,
                Some(e.line),
                format!("not valid YAML: {}", e.reason),
            ));
        }
    };
    let file: Arc<Path> = Arc::from(file);
    for doc in docs {
        let lines = Arc::new(doc.lines);
        let meta: TypeMeta = serde_json::from_value(doc.value.clone()).unwrap_or(TypeMeta {
            api_version: String::new(),
            kind: String::new(),
        });
        if meta.kind == "List" && doc.value.is_object() {
            let items = match doc.value.get("items") {
                Some(Value::Array(items)) => items.clone(),
                None | Some(Value::Null) => vec![],
                Some(_) => {
                    diags.push(file_error(
                        &file,
                        Some(lines.line_of("items").unwrap_or(doc.line)),
                        "kind: List: items must be a list of resources",
                    ));
                    continue;
                }
            };
            for (i, item) in items.into_iter().enumerate() {
                let ctx = DocContext {
                    file: file.clone(),
                    line: lines.line_of(&format!("items[{i}]")).unwrap_or(doc.line),
                    lines: lines.clone(),
                    prefix: format!("items[{i}]."),
                };
                load_object(item, ctx, out, diags);
            }
        } else {
            let ctx = DocContext {
                file: file.clone(),
                line: doc.line,
                lines,
                prefix: String::new(),
            };
            load_object(doc.value, ctx, out, diags);
        }
    }
}

/// `namespace/name` as written (`default` when the namespace is left out), for messages about
/// resources that are not loaded.
fn resource_name(value: &Value) -> String {
    let field = |path| value.pointer(path).and_then(Value::as_str);
    format!(
        "{}/{}",
        shown(field("/metadata/namespace").unwrap_or("default")),
        shown(field("/metadata/name").unwrap_or("(unnamed)"))
    )
}

/// A name as messages show it: whole up to the 253 characters a Kubernetes name may have,
/// cut short beyond (one absurd name must not fill the terminal once per message).
fn shown(name: &str) -> String {
    if name.len() <= 253 {
        return name.to_string();
    }
    let mut end = 60;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &name[..end], name.len())
}

struct DocContext {
    file: Arc<Path>,
    line: usize,
    lines: Arc<LineIndex>,
    prefix: String,
}

fn load_object(value: Value, ctx: DocContext, out: &mut Resources, diags: &mut Diagnostics) {
    // serde would read a list's items as the fields, in order.
    let shape = match &value {
        Value::Object(_) => None,
        Value::Array(_) => Some("a list"),
        Value::String(_) => Some("a string"),
        Value::Number(_) => Some("a number"),
        Value::Bool(_) => Some("a boolean"),
        Value::Null => None,
    };
    if let Some(shape) = shape {
        return diags.push(file_error(
            &ctx.file,
            Some(ctx.line),
            format!("not a Kubernetes resource: {shape}, not a mapping with apiVersion and kind"),
        ));
    }
    let meta: TypeMeta = match serde_json::from_value(value.clone()) {
        Ok(m) => m,
        Err(e) => {
            return diags.push(file_error(
                &ctx.file,
                Some(ctx.line),
                format!("not a Kubernetes resource: {e}"),
            ));
        }
    };
    // The core group is written without a slash (`v1`).
    let (group, version) = meta
        .api_version
        .split_once('/')
        .unwrap_or(("", meta.api_version.as_str()));
    let ours = [
        (GATEWAY_GROUP, "HTTPRoute"),
        (GATEWAY_GROUP, "Gateway"),
        (AGENTGATEWAY_GROUP, "AgentgatewayPolicy"),
    ];
    if meta.api_version.is_empty() && !meta.kind.is_empty() {
        return diags.push(file_error(
            &ctx.file,
            Some(ctx.line),
            format!("{}: no apiVersion", meta.kind),
        ));
    }
    if group.is_empty() && [GATEWAY_GROUP, AGENTGATEWAY_GROUP].contains(&version) {
        return diags.push(file_error(
            &ctx.file,
            Some(ctx.line),
            format!(
                "apiVersion {:?} has no version: write group/version, e.g. {GATEWAY_GROUP}/v1",
                meta.api_version
            ),
        ));
    }
    if let Some((_, kind)) = ours
        .iter()
        .find(|(g, k)| *g == group && k.eq_ignore_ascii_case(&meta.kind) && *k != meta.kind)
    {
        return diags.push(file_error(
            &ctx.file,
            Some(ctx.line),
            format!(
                "kind {:?} is not a kind of {group}: did you mean {kind}?",
                meta.kind
            ),
        ));
    }
    match (group, meta.kind.as_str()) {
        (GATEWAY_GROUP, "HTTPRoute") if matches!(version, "v1" | "v1beta1") => {
            if let Some(r) = typed(value, "HTTPRoute", ctx, diags) {
                out.routes.push(r);
            }
        }
        (GATEWAY_GROUP, "Gateway") if matches!(version, "v1" | "v1beta1") => {
            if let Some(r) = typed(value, "Gateway", ctx, diags) {
                out.gateways.push(r);
            }
        }
        (AGENTGATEWAY_GROUP, "AgentgatewayPolicy") if version == "v1alpha1" => {
            if let Some(r) = typed(value, "AgentgatewayPolicy", ctx, diags) {
                out.policies.push(r);
            }
        }
        (_, "") => diags.push(file_error(
            &ctx.file,
            Some(ctx.line),
            "not a Kubernetes resource: no `kind`",
        )),
        (GATEWAY_GROUP | AGENTGATEWAY_GROUP, "HTTPRoute" | "Gateway" | "AgentgatewayPolicy") => {
            diags.push(file_error(
                &ctx.file,
                Some(ctx.line),
                format!(
                    "{} {}: unsupported apiVersion {}; use {GATEWAY_GROUP}/v1 (or v1beta1) for \
                     HTTPRoute and Gateway, {AGENTGATEWAY_GROUP}/v1alpha1 for AgentgatewayPolicy",
                    meta.kind,
                    resource_name(&value),
                    meta.api_version
                ),
            ))
        }
        _ => {
            let name = value
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("(unnamed)");
            diags.push(Diagnostic {
                severity: Severity::Warning,
                resource: Some(format!("{} {}", meta.kind, shown(name))),
                ..file_error(
                    &ctx.file,
                    Some(ctx.line),
                    format!(
                        "ignored: cors-agent reads HTTPRoute, Gateway and AgentgatewayPolicy, not {} ({})",
                        meta.kind, meta.api_version
                    ),
                )
            });
        }
    }
}

fn typed<S: DeserializeOwned>(
    value: Value,
    kind: &'static str,
    ctx: DocContext,
    diags: &mut Diagnostics,
) -> Option<Loaded<S>> {
    let name = value.pointer("/metadata/name").and_then(Value::as_str);
    let namespace = value
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let id = ResourceId {
        kind,
        namespace: shown(namespace),
        name: shown(name.unwrap_or("(unnamed)")),
    };
    let diag = |field: String, reason: String| Diagnostic {
        severity: Severity::Error,
        file: Some(ctx.file.to_path_buf()),
        line: ctx
            .lines
            .line_of(&format!("{}{}", ctx.prefix, field))
            .or(Some(ctx.line)),
        resource: Some(id.to_string()),
        field: (!field.is_empty()).then_some(field),
        reason,
    };
    if !is_dns_label(namespace) {
        diags.push(diag(
            "metadata.namespace".into(),
            format!(
                "{:?} is not a valid namespace: lower-case letters, digits and '-', at most 63",
                shown(namespace)
            ),
        ));
        return None;
    }
    match name {
        None | Some("") => {
            diags.push(diag("metadata.name".into(), "required".into()));
            return None;
        }
        Some(n) if !is_dns_subdomain(n) => diags.push(diag(
            "metadata.name".into(),
            format!(
                "{:?} is not a valid name: lower-case letters, digits, '-' and '.', at most 253",
                shown(n)
            ),
        )),
        _ => {}
    }
    let object = match serde_path_to_error::deserialize::<_, Object<S>>(value) {
        Ok(o) => o,
        Err(e) => {
            let (field, reason) = serde_message(&e, " (the API server would reject it)");
            diags.push(diag(field, reason));
            return None;
        }
    };
    if let Some(ts) = &object.metadata.creation_timestamp
        && !is_rfc3339_utc(ts)
    {
        diags.push(diag(
            "metadata.creationTimestamp".into(),
            format!("{ts:?} is not a timestamp like 2024-05-01T12:00:00Z"),
        ));
    }
    Some(Loaded {
        id,
        file: ctx.file,
        line: ctx.line,
        object,
        lines: ctx.lines,
        prefix: ctx.prefix,
    })
}

/// Field path and reason of a serde error, with an unknown field named in the path;
/// `note` follows "unknown field NAME".
pub fn serde_message(
    e: &serde_path_to_error::Error<serde_json::Error>,
    note: &str,
) -> (String, String) {
    let mut field = e.path().to_string();
    let mut reason = e.inner().to_string();
    if let Some(unknown) = reason
        .strip_prefix("unknown field `")
        .and_then(|r| r.split_once('`'))
        .map(|(f, _)| f.to_string())
    {
        // serde_path_to_error already ends the path with the unknown key.
        if field == "." {
            field = unknown.clone();
        } else if !field.ends_with(&unknown) {
            field = format!("{field}.{unknown}");
        }
        reason = format!(
            "unknown field {unknown:?}{note}; {}",
            reason.split_once(", ").map_or("", |(_, r)| r)
        );
    }
    if field == "." {
        field.clear();
    }
    (field, reason)
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty() && s.len() <= 63 && !s.contains('.') && is_dns_subdomain(s)
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// Kubernetes writes `creationTimestamp` as `YYYY-MM-DDTHH:MM:SSZ`, which sorts as text; it
/// decides precedence, so a value that is no time at all is refused.
fn is_rfc3339_utc(s: &str) -> bool {
    let b = s.as_bytes();
    let shape = b.len() == 20
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'Z',
            _ => c.is_ascii_digit(),
        });
    let field = |from: usize, to: usize| s[from..to].parse::<u32>().unwrap_or(u32::MAX);
    shape
        && (1..=12).contains(&field(5, 7))
        && (1..=31).contains(&field(8, 10))
        && field(11, 13) < 24
        && field(14, 16) < 60
        && field(17, 19) < 61
}
