//! `node.yaml`: what users write ([`NodeConfigSpec`]), its validation, and the validated
//! [`NodeConfig`] the agent runs.
//!
//! Everything that can be wrong with the file is found here, before anything is attached:
//! unknown fields, ports out of range or enrolled twice, `service:` syntax, network namespace
//! paths that do not exist (or are not namespaces, or are enrolled twice), TLS files that
//! cannot be loaded. Each error names the file, the line and the field path
//! (`pods[1].ports[0].port`). Paths in the file are relative to the file's folder.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use regex::Regex;
use serde::Deserialize;

use crate::config::yaml::{self, LineIndex};
use crate::config::{Diagnostic, Diagnostics, Severity, serde_message};
use crate::cors::UnmatchedPreflights;
use crate::routes::ServiceRef;
use crate::steer::{DEFAULT_PIN_ROOT, FailMode, NetNs, pin_dir_name};
use crate::tls::{CertPair, SniResolver};

/// The steering program keeps at most this many ports per pod (`cors_common::MAX_PORTS`).
const MAX_PORTS_PER_POD: usize = cors_common::MAX_PORTS as usize;

/// The file as users write it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeConfigSpec {
    /// Files or folders of HTTPRoute / AgentgatewayPolicy / Gateway resources, as with `-f`.
    pub resources: Vec<PathBuf>,
    #[serde(default)]
    pub unmatched_preflights: UnmatchedPreflights,
    #[serde(default)]
    pub fail_mode: FailMode,
    /// Where fail-closed pods pin their program and maps (a folder on bpffs).
    pub pin_dir: Option<PathBuf>,
    #[serde(default)]
    pub pods: Vec<PodSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodSpec {
    pub name: String,
    pub netns: PathBuf,
    pub ports: Vec<PortSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    /// Wider than `u16` so that `70000` gets a message about ports, not about integer types.
    pub port: i64,
    pub service: Option<String>,
    pub tls: Option<TlsSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSpec {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A Service and port, written `name:port`: the port applies the rules whose backendRefs name
/// it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Service {
    pub name: String,
    pub port: u16,
}

impl Service {
    pub fn to_ref(&self) -> ServiceRef {
        ServiceRef {
            name: self.name.clone(),
            port: self.port,
        }
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, self.port)
    }
}

/// A Kubernetes Service name (an RFC 1035 label).
static SERVICE_NAME_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[a-z]([-a-z0-9]*[a-z0-9])?$").expect("static regex"));

/// Parses `name:port`.
pub fn parse_service(text: &str) -> Result<Service, String> {
    let hint = "expected a Service name and port, e.g. httpbin:8000";
    let Some((name, port)) = text.rsplit_once(':') else {
        return Err(format!("{text:?}: no port; {hint}"));
    };
    if name.len() > 63 || !SERVICE_NAME_RE.is_match(name) {
        return Err(format!(
            "{text:?}: {name:?} is not a Service name (lower-case letters, digits and '-', \
             starting with a letter, at most 63); {hint}"
        ));
    }
    match port.parse::<u16>() {
        Ok(port) if port > 0 => Ok(Service {
            name: name.to_string(),
            port,
        }),
        _ => Err(format!(
            "{text:?}: {port:?} is not a port (1-65535); {hint}"
        )),
    }
}

/// Where in the file something was written, for messages that come later (a `service:` no
/// route sends traffic to).
#[derive(Clone, Debug)]
pub struct Location {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub field: String,
}

impl Location {
    pub fn diagnostic(&self, severity: Severity, reason: impl Into<String>) -> Diagnostic {
        Diagnostic {
            severity,
            file: Some(self.file.clone()),
            line: self.line,
            resource: None,
            field: Some(self.field.clone()),
            reason: reason.into(),
        }
    }
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The config file itself.
    pub path: PathBuf,
    /// Resolved against the config file's folder.
    pub resources: Vec<PathBuf>,
    pub unmatched: UnmatchedPreflights,
    pub fail_mode: FailMode,
    pub pin_dir: PathBuf,
    pub pods: Vec<PodConfig>,
}

#[derive(Clone, Debug)]
pub struct PodConfig {
    pub name: String,
    pub netns: PathBuf,
    /// Device and inode of the namespace when the file was loaded: a pod whose namespace was
    /// re-created at the same path is a new pod, never the old pod's entry.
    pub netns_id: (u64, u64),
    pub ports: Vec<PortConfig>,
}

#[derive(Clone, Debug)]
pub struct PortConfig {
    pub port: u16,
    pub service: Option<Service>,
    pub tls: Option<CertPair>,
    pub at: Location,
}

impl NodeConfig {
    /// Every distinct `service:` the ports name (`None`: ports without one), sorted.
    pub fn services(&self) -> Vec<Option<Service>> {
        let mut all: Vec<Option<Service>> = self
            .pods
            .iter()
            .flat_map(|p| &p.ports)
            .map(|p| p.service.clone())
            .collect();
        all.sort();
        all.dedup();
        all
    }
}

impl PodConfig {
    /// Whether `other` is the same pod in the same namespace, attached the same way: then it
    /// can be updated in place; otherwise it is detached and attached again.
    pub fn same_attachment(&self, other: &PodConfig) -> bool {
        self.name == other.name && self.netns == other.netns && self.netns_id == other.netns_id
    }
}

/// Reads and validates `path`. Errors come back all at once, each naming file, line and field.
pub fn load(path: &Path) -> Result<NodeConfig, Diagnostics> {
    let file_error = |line: Option<usize>, field: Option<String>, reason: String| Diagnostic {
        severity: Severity::Error,
        file: Some(path.to_path_buf()),
        line,
        resource: None,
        field,
        reason,
    };
    let mut diags = Diagnostics::default();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            diags.push(file_error(None, None, format!("cannot read: {e}")));
            return Err(diags);
        }
    };
    let docs = match yaml::parse_documents(&text) {
        Ok(d) => d,
        Err(e) => {
            diags.push(file_error(Some(e.line), None, e.reason));
            return Err(diags);
        }
    };
    let [doc] = &docs[..] else {
        let reason = format!("expected one YAML document, found {}", docs.len());
        diags.push(file_error(None, None, reason));
        return Err(diags);
    };
    let spec = match serde_path_to_error::deserialize::<_, NodeConfigSpec>(doc.value.clone()) {
        Ok(s) => s,
        Err(e) => {
            let (field, reason) = serde_message(&e, "");
            let line = doc.lines.line_of(&field).or(Some(doc.line));
            diags.push(file_error(
                line,
                (!field.is_empty()).then_some(field),
                reason,
            ));
            return Err(diags);
        }
    };
    let checker = Checker {
        file: path,
        dir: path.parent().unwrap_or(Path::new(".")),
        lines: &doc.lines,
        diags: &mut diags,
    };
    match checker.check(spec) {
        Some(config) if !diags.has_errors() => Ok(config),
        _ => Err(diags),
    }
}

struct Checker<'a> {
    file: &'a Path,
    dir: &'a Path,
    lines: &'a LineIndex,
    diags: &'a mut Diagnostics,
}

impl Checker<'_> {
    fn at(&self, field: &str) -> Location {
        Location {
            file: self.file.to_path_buf(),
            line: self.lines.line_of(field),
            field: field.to_string(),
        }
    }

    fn error(&mut self, field: &str, reason: impl Into<String>) {
        let d = self.at(field).diagnostic(Severity::Error, reason);
        self.diags.push(d);
    }

    fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.dir.join(path)
        }
    }

    fn check(mut self, spec: NodeConfigSpec) -> Option<NodeConfig> {
        if spec.resources.is_empty() {
            self.error(
                "resources",
                "list at least one file or folder of HTTPRoute / AgentgatewayPolicy resources",
            );
        }
        let mut resources = Vec::new();
        for (i, r) in spec.resources.iter().enumerate() {
            let path = self.resolve(r);
            if !path.exists() {
                self.error(
                    &format!("resources[{i}]"),
                    format!("{} does not exist", path.display()),
                );
            }
            resources.push(path);
        }
        let pin_dir = spec
            .pin_dir
            .as_deref()
            .map_or_else(|| PathBuf::from(DEFAULT_PIN_ROOT), |p| self.resolve(p));

        let mut pods = Vec::new();
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut pin_names: HashMap<String, usize> = HashMap::new();
        let mut namespaces: HashMap<(u64, u64), usize> = HashMap::new();
        for (i, pod) in spec.pods.into_iter().enumerate() {
            let field = format!("pods[{i}]");
            let Some(pin_name) = pin_dir_name(&pod.name) else {
                self.error(
                    &format!("{field}.name"),
                    "a pod name must be non-empty and at most 200 bytes",
                );
                continue;
            };
            if let Some(j) = names.insert(pod.name.clone(), i) {
                self.error(
                    &format!("{field}.name"),
                    format!("pod name {:?} is used twice (also pods[{j}])", pod.name),
                );
            } else if spec.fail_mode == FailMode::Closed
                && let Some(j) = pin_names.insert(pin_name.clone(), i)
            {
                // Pin folders keep only letters, digits and '-': two names that differ
                // elsewhere would share one and take over each other's program.
                self.error(
                    &format!("{field}.name"),
                    format!(
                        "pods[{j}] and this pod would share the pin folder {}; \
                         rename one (names differing only in characters other than letters, \
                         digits and '-' collide)",
                        pin_dir.join(&pin_name).display()
                    ),
                );
            }
            let netns_id = self.netns(&field, &pod.netns);
            if let Some(id) = netns_id
                && let Some(j) = namespaces.insert(id, i)
            {
                self.error(
                    &format!("{field}.netns"),
                    format!(
                        "{} is the network namespace of pods[{j}] already; \
                         enroll each namespace once, with all its ports",
                        pod.netns.display()
                    ),
                );
            }
            // Checked also when the namespace is wrong: every error in one go.
            let ports = self.ports(&field, pod.ports);
            let Some(netns_id) = netns_id else {
                continue;
            };
            pods.push(PodConfig {
                name: pod.name,
                netns: self.resolve(&pod.netns),
                netns_id,
                ports,
            });
        }
        Some(NodeConfig {
            path: self.file.to_path_buf(),
            resources,
            unmatched: spec.unmatched_preflights,
            fail_mode: spec.fail_mode,
            pin_dir,
            pods,
        })
    }

    /// Checks the namespace path and returns its identity.
    fn netns(&mut self, pod_field: &str, netns: &Path) -> Option<(u64, u64)> {
        let field = format!("{pod_field}.netns");
        let path = self.resolve(netns);
        let opened = NetNs::open(&path).and_then(|_| std::fs::metadata(&path));
        match opened {
            Ok(meta) => Some((meta.dev(), meta.ino())),
            Err(e) => {
                let reason = match e.kind() {
                    io::ErrorKind::NotFound => format!(
                        "{} does not exist (is the pod running? `ip netns list` shows named \
                         namespaces; /proc/<pid>/ns/net works too)",
                        path.display()
                    ),
                    io::ErrorKind::InvalidInput => format!(
                        "{} is not a network namespace (expected /var/run/netns/NAME or \
                         /proc/<pid>/ns/net)",
                        path.display()
                    ),
                    _ => format!("cannot open {}: {e}", path.display()),
                };
                self.error(&field, reason);
                None
            }
        }
    }

    fn ports(&mut self, pod_field: &str, specs: Vec<PortSpec>) -> Vec<PortConfig> {
        if specs.is_empty() {
            self.error(
                &format!("{pod_field}.ports"),
                "list at least one port to steer",
            );
        }
        if specs.len() > MAX_PORTS_PER_POD {
            self.error(
                &format!("{pod_field}.ports"),
                format!(
                    "{} ports; at most {MAX_PORTS_PER_POD} can be steered per pod",
                    specs.len()
                ),
            );
        }
        let mut seen: HashMap<u16, usize> = HashMap::new();
        let mut out = Vec::new();
        for (i, spec) in specs.into_iter().enumerate() {
            let field = format!("{pod_field}.ports[{i}]");
            let port = match u16::try_from(spec.port) {
                Ok(p) if p > 0 => p,
                _ => {
                    self.error(
                        &format!("{field}.port"),
                        format!("{} is not a port (1-65535)", spec.port),
                    );
                    continue;
                }
            };
            if let Some(j) = seen.insert(port, i) {
                self.error(
                    &format!("{field}.port"),
                    format!(
                        "port {port} is enrolled twice in this pod (also {pod_field}.ports[{j}])"
                    ),
                );
            }
            let service = match spec.service.as_deref().map(parse_service) {
                None => None,
                Some(Ok(s)) => Some(s),
                Some(Err(reason)) => {
                    self.error(&format!("{field}.service"), reason);
                    None
                }
            };
            let tls = spec.tls.and_then(|t| self.tls(&field, t));
            out.push(PortConfig {
                port,
                service,
                tls,
                at: self.at(&field),
            });
        }
        out
    }

    fn tls(&mut self, port_field: &str, spec: TlsSpec) -> Option<CertPair> {
        let pair = CertPair {
            cert: self.resolve(&spec.cert),
            key: self.resolve(&spec.key),
        };
        let mut ok = true;
        for (name, path) in [("cert", &pair.cert), ("key", &pair.key)] {
            if !path.is_file() {
                self.error(
                    &format!("{port_field}.tls.{name}"),
                    format!("{} does not exist or is not a file", path.display()),
                );
                ok = false;
            }
        }
        if !ok {
            return None;
        }
        match SniResolver::load(vec![pair.clone()]) {
            Ok(_) => Some(pair),
            Err(e) => {
                self.error(&format!("{port_field}.tls"), e.to_string());
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("node.yaml");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn errors(text: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("routes")).unwrap();
        let path = write(dir.path(), text);
        match load(&path) {
            Ok(c) => panic!("expected errors, got {c:?}"),
            Err(d) => d.to_string(),
        }
    }

    #[test]
    fn services_parse_as_name_and_port() {
        assert_eq!(
            parse_service("httpbin:8000"),
            Ok(Service {
                name: "httpbin".into(),
                port: 8000
            })
        );
        for bad in [
            "httpbin",
            "httpbin:",
            ":80",
            "Httpbin:80",
            "a_b:80",
            "x:0",
            "x:70000",
        ] {
            assert!(parse_service(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_service("a-1:1").unwrap().to_string(), "a-1:1");
    }

    #[test]
    fn a_valid_file_resolves_paths_against_its_folder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("routes")).unwrap();
        let path = write(
            dir.path(),
            "resources: [routes/]\nfailMode: closed\npods:\n- name: self\n  netns: /proc/self/ns/net\n  ports:\n  - port: 8080\n    service: httpbin:8000\n  - port: 9090\n",
        );
        let c = load(&path).unwrap();
        assert_eq!(c.resources, vec![dir.path().join("routes/")]);
        assert_eq!(c.fail_mode, FailMode::Closed);
        assert_eq!(c.pin_dir, PathBuf::from(DEFAULT_PIN_ROOT));
        assert_eq!(c.pods[0].ports[0].port, 8080);
        assert_eq!(c.pods[0].ports[0].at.field, "pods[0].ports[0]");
        assert_eq!(c.pods[0].ports[0].at.line, Some(7));
        assert_eq!(
            c.services(),
            vec![None, Some(parse_service("httpbin:8000").unwrap())]
        );
    }

    #[test]
    fn errors_name_file_line_field_and_reason() {
        let e = errors(
            "resources: [routes/]\npods:\n- name: a\n  netns: /proc/self/ns/net\n  ports:\n  - port: 8080\n  - port: 8080\n",
        );
        assert!(
            e.contains("node.yaml:7: pods[0].ports[1].port: port 8080 is enrolled twice"),
            "{e}"
        );

        let e = errors(
            "resources: [routes/]\npods:\n- name: a\n  netns: /proc/self/ns/net\n  portz: []\n",
        );
        assert!(
            e.contains("node.yaml:5: pods[0].portz: unknown field"),
            "{e}"
        );

        let e = errors(
            "resources: [routes/]\npods:\n- name: a\n  netns: /var/run/netns/cors-no-such-ns\n  ports: [{port: 1}]\n",
        );
        assert!(
            e.contains("node.yaml:4: pods[0].netns: /var/run/netns/cors-no-such-ns does not exist"),
            "{e}"
        );

        let e = errors(
            "resources: [routes/]\npods:\n- name: a\n  netns: /proc/self/status\n  ports: [{port: 70000, service: web}]\n",
        );
        assert!(
            e.contains("pods[0].netns: /proc/self/status is not a network namespace"),
            "{e}"
        );

        let e = errors(
            "resources: [routes/]\npods:\n- name: a\n  netns: /proc/self/ns/net\n  ports: [{port: 70000}, {port: 1, service: web}]\n",
        );
        assert!(
            e.contains("pods[0].ports[0].port: 70000 is not a port"),
            "{e}"
        );
        assert!(
            e.contains("pods[0].ports[1].service: \"web\": no port"),
            "{e}"
        );

        let e = errors(
            "resources: [routes/]\npods:\n- name: a\n  netns: /proc/self/ns/net\n  ports:\n  - port: 1\n    tls: {cert: missing.pem, key: missing-key.pem}\n",
        );
        assert!(e.contains("node.yaml:7: pods[0].ports[0].tls.cert:"), "{e}");
        assert!(e.contains("missing.pem does not exist"), "{e}");
        assert!(e.contains("pods[0].ports[0].tls.key:"), "{e}");

        let e = errors(
            "resources: [routes/]\npods:\n- {name: a, netns: /proc/self/ns/net, ports: [{port: 1}]}\n- {name: b, netns: /proc/self/ns/net, ports: [{port: 1}]}\n",
        );
        assert!(
            e.contains("pods[1].netns: /proc/self/ns/net is the network namespace of pods[0]"),
            "{e}"
        );

        let e = errors("resources: [nope/]\nfailMode: sometimes\n");
        assert!(e.contains("failMode: unknown variant `sometimes`"), "{e}");

        let e = errors("resources: [nope/]\n");
        assert!(
            e.contains("resources[0]:") && e.contains("nope/ does not exist"),
            "{e}"
        );
    }

    #[test]
    fn the_example_file_is_only_missing_its_pod() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/node/node.yaml");
        let Err(d) = load(&example) else {
            panic!("the example names a netns that exists here");
        };
        // Everything but the machine-specific parts (the pod's namespace, its certificates).
        for e in &d.errors {
            let field = e.field.as_deref().unwrap_or("");
            assert!(
                field == "pods[0].netns" || field.starts_with("pods[0].ports[1].tls."),
                "{e}"
            );
        }
    }

    #[test]
    fn fail_closed_pods_need_distinct_pin_folders() {
        let e = errors(
            "resources: [routes/]\nfailMode: closed\npods:\n- {name: a.b, netns: /proc/self/ns/net, ports: [{port: 1}]}\n- {name: a_b, netns: /proc/1/ns/net, ports: [{port: 1}]}\n",
        );
        assert!(
            e.contains("pods[1].name: pods[0] and this pod would share the pin folder"),
            "{e}"
        );
    }
}
