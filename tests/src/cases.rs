//! The behaviour cases (`tests/data/cases/*.yaml`, copied from the project's shared cases):
//! their model, the one comparison every replay uses, and the bookkeeping of a wire replay
//! (proxy mode and node mode replay them the same way).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use http::HeaderMap;
use serde::Deserialize;

use crate::backend::Seen;
use crate::client::{self, Proto, Req};

/// The host of cases that name none.
pub const DEFAULT_HOST: &str = "www.example.com";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseFile {
    pub name: String,
    /// Multi-document YAML handed to the agent with `-f`.
    pub resources: String,
    #[serde(default)]
    pub agent: AgentOptions,
    #[serde(default)]
    pub backend: BackendSpec,
    pub cases: Vec<Case>,
    /// The file it came from, for messages.
    #[serde(skip)]
    pub path: PathBuf,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AgentOptions {
    pub unmatched_preflights: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    #[serde(default, deserialize_with = "pairs_from_map")]
    pub headers: Vec<(String, String)>,
    pub status: Option<u16>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    pub request: CaseRequest,
    pub expect: Expect,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseRequest {
    pub method: String,
    pub path: String,
    pub host: Option<String>,
    #[serde(default)]
    pub headers: Vec<(String, String)>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Expect {
    #[serde(default)]
    pub status: Vec<u16>,
    pub forwarded: Option<bool>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub one_of: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub absent: Vec<String>,
    #[serde(default)]
    pub vary: Vec<String>,
    #[serde(default)]
    pub backend_saw: BTreeMap<String, String>,
}

fn pairs_from_map<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<(String, String)>, D::Error> {
    let map: BTreeMap<String, String> = BTreeMap::deserialize(d)?;
    Ok(map.into_iter().collect())
}

/// The folder of case files inside this crate.
pub fn cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/cases")
}

/// Every case file, in name order. Panics with the file name on a malformed file: a case
/// that cannot be read must fail the suite, not vanish from it.
pub fn load_all() -> Vec<CaseFile> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(cases_dir())
        .expect("tests/data/cases exists")
        .map(|e| e.expect("readable dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    paths.sort();
    assert!(
        !paths.is_empty(),
        "no case files in {}",
        cases_dir().display()
    );
    paths.iter().map(|p| load(p)).collect()
}

pub fn load(path: &Path) -> CaseFile {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let docs = cors_agent::config::yaml::parse_documents(&text)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let [doc] = &docs[..] else {
        panic!("{}: expected one YAML document", path.display());
    };
    let mut file: CaseFile = serde_path_to_error::deserialize(doc.value.clone())
        .unwrap_or_else(|e| panic!("{}: {} at {}", path.display(), e.inner(), e.path()));
    file.path = path.to_path_buf();
    file
}

/// Headers whose value is a comma-separated list compared as a set.
const LIST_HEADERS: [&str; 3] = [
    "access-control-allow-methods",
    "access-control-allow-headers",
    "access-control-expose-headers",
];
/// Headers that must never appear more than once.
const SINGLE_HEADERS: [&str; 3] = [
    "access-control-allow-origin",
    "access-control-allow-credentials",
    "access-control-max-age",
];

fn same_value(name: &str, got: &str, want: &str) -> bool {
    let name = name.to_ascii_lowercase();
    if !LIST_HEADERS.contains(&name.as_str()) {
        return got.trim() == want.trim();
    }
    let fold = name != "access-control-allow-methods";
    let set = |s: &str| {
        let mut v: Vec<String> = s
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| {
                if fold {
                    t.to_ascii_lowercase()
                } else {
                    t.to_string()
                }
            })
            .collect();
        v.sort();
        v.dedup();
        v
    };
    set(got) == set(want)
}

fn joined(headers: &HeaderMap, name: &str) -> Option<String> {
    let values: Vec<&str> = headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap_or("<not text>"))
        .collect();
    (!values.is_empty()).then(|| values.join(", "))
}

/// Compares what came back with what the case expects; the error lists every mismatch.
pub fn check(
    case: &Case,
    status: u16,
    headers: &HeaderMap,
    forwarded: bool,
    backend_saw: Option<&HeaderMap>,
) -> Result<(), String> {
    let e = &case.expect;
    let mut problems = Vec::new();
    if !e.status.is_empty() && !e.status.contains(&status) {
        problems.push(format!("status {status}, expected one of {:?}", e.status));
    }
    if let Some(want) = e.forwarded
        && want != forwarded
    {
        problems.push(format!(
            "forwarded to the backend: {forwarded}, expected {want}"
        ));
    }
    for name in SINGLE_HEADERS {
        let n = headers.get_all(name).iter().count();
        if n > 1 {
            problems.push(format!("{name} appears {n} times"));
        }
    }
    for (name, want) in &e.headers {
        match joined(headers, name) {
            Some(got) if same_value(name, &got, want) => {}
            Some(got) => problems.push(format!("{name}: {got:?}, expected {want:?}")),
            None => problems.push(format!("{name}: missing, expected {want:?}")),
        }
    }
    for (name, options) in &e.one_of {
        match joined(headers, name) {
            Some(got) if options.iter().any(|w| same_value(name, &got, w)) => {}
            got => problems.push(format!("{name}: {got:?}, expected one of {options:?}")),
        }
    }
    for name in &e.absent {
        if let Some(got) = joined(headers, name) {
            problems.push(format!("{name}: {got:?}, expected absent"));
        }
    }
    let vary: Vec<String> = headers
        .get_all("vary")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    for token in &e.vary {
        let n = vary
            .iter()
            .filter(|t| **t == token.to_ascii_lowercase())
            .count();
        if n != 1 {
            problems.push(format!(
                "Vary has {token:?} {n} times (Vary: {vary:?}), expected once"
            ));
        }
    }
    if !e.backend_saw.is_empty() {
        match backend_saw {
            None => problems.push("the backend saw no request, expected one".into()),
            Some(saw) => {
                for (name, want) in &e.backend_saw {
                    match joined(saw, name) {
                        Some(got) if got == *want => {}
                        got => {
                            problems.push(format!("backend saw {name}: {got:?}, expected {want:?}"))
                        }
                    }
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// Every host the cases address, for one test certificate that covers them all (the client
/// checks it against the SNI).
pub fn hosts(files: &[CaseFile]) -> Vec<&str> {
    let mut hosts: Vec<&str> = files
        .iter()
        .flat_map(|f| &f.cases)
        .filter_map(|c| c.request.host.as_deref())
        .chain([DEFAULT_HOST])
        .collect();
    hosts.sort_unstable();
    hosts.dedup();
    hosts
}

/// The request a case sends.
pub fn request(case: &Case) -> Req {
    let r = &case.request;
    Req {
        method: r.method.clone(),
        path: r.path.clone(),
        host: r.host.clone().unwrap_or_else(|| DEFAULT_HOST.into()),
        headers: r.headers.clone(),
    }
}

/// The parts of a reply that must not depend on the protocol.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Answer {
    status: u16,
    /// `access-control-*` and `vary`, lower-case names, values in order.
    cors: BTreeMap<String, Vec<String>>,
}

fn answer(reply: &client::Reply) -> Answer {
    let mut cors: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in &reply.headers {
        let name = name.as_str();
        if name.starts_with("access-control-") || name == "vary" {
            cors.entry(name.to_string())
                .or_default()
                .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
        }
    }
    Answer {
        status: reply.status,
        cors,
    }
}

/// Checks one replayed case: the reply, and `seen`, what the backend received meanwhile (the
/// backend records a request before it answers, and the agent answers after the backend did,
/// so whatever it saw is recorded by the time the reply is in).
pub fn verify(case: &Case, reply: &client::Reply, seen: &[Seen]) -> Result<Answer, String> {
    if seen.len() > 1 {
        return Err(format!(
            "the backend saw {} requests, expected at most one",
            seen.len()
        ));
    }
    let saw = seen.first().map(|s| &s.headers);
    check(case, reply.status, &reply.headers, !seen.is_empty(), saw)?;
    if reply.status == 204 && reply.headers.contains_key("content-length") {
        return Err("content-length on a 204".into());
    }
    Ok(answer(reply))
}

/// The results of replaying case files over several protocols, HTTP/1.1 first: each replay
/// must pass its case, and every other protocol must give the same status and CORS headers as
/// HTTP/1.1 did.
#[derive(Debug, Default)]
pub struct Tally {
    pub replayed: usize,
    pub failures: Vec<String>,
    /// What HTTP/1.1 answered for each case of the current file.
    over_http1: Vec<Answer>,
}

impl Tally {
    /// Call before the replays of each file.
    pub fn start_file(&mut self) {
        self.over_http1.clear();
    }

    /// Records the replay of `file.cases[index]` over `proto`.
    pub fn record(
        &mut self,
        file: &CaseFile,
        index: usize,
        proto: Proto,
        result: Result<Answer, String>,
    ) {
        self.replayed += 1;
        let name = file.cases.get(index).map_or("?", |c| c.name.as_str());
        match result {
            Ok(answer) if proto == Proto::Http1 => self.over_http1.push(answer),
            Ok(answer) => {
                if self.over_http1.get(index) != Some(&answer) {
                    self.failures.push(format!(
                        "{} / {name} / {proto}: answered {answer:?}, HTTP/1.1 answered {:?}",
                        file.name,
                        self.over_http1.get(index)
                    ));
                }
            }
            Err(e) => {
                if proto == Proto::Http1 {
                    self.over_http1.push(Answer::default());
                }
                self.failures
                    .push(format!("{} / {name} / {proto}: {e}", file.name));
            }
        }
    }

    /// Panics with every failure, or when fewer than `at_least` replays ran.
    pub fn assert_all_passed(&self, at_least: usize) {
        assert!(
            self.replayed >= at_least,
            "only {} case replays ran",
            self.replayed
        );
        assert!(
            self.failures.is_empty(),
            "{} of {} replays failed:\n{}",
            self.failures.len(),
            self.replayed,
            self.failures.join("\n")
        );
    }
}
