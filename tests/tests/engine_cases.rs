//! Every behaviour case evaluated against the engine alone: no sockets, the same decision the
//! proxy acts on. The wire replay of the same files lives in the proxy suites.

use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};

use cors_agent::cors::{Decision, UnmatchedPreflights};
use cors_agent::engine::{decide, load_table};
use cors_agent::routes::BuildOptions;
use cors_agent_tests::cases::{self, CaseFile};

/// What the proxy would send back, computed from the decision and the case's backend.
fn respond(
    file: &CaseFile,
    table: &cors_agent::routes::RouteTable,
    case: &cases::Case,
) -> (u16, HeaderMap, bool, HeaderMap) {
    let req = &case.request;
    let method = Method::from_bytes(req.method.as_bytes()).expect("case method");
    let host = req.host.as_deref().unwrap_or("www.example.com");
    let uri: Uri = format!("http://{host}{}", req.path)
        .parse()
        .expect("case path");
    let mut headers = HeaderMap::new();
    for (k, v) in &req.headers {
        headers.append(
            HeaderName::from_bytes(k.as_bytes()).expect("header name"),
            HeaderValue::from_str(v).expect("header value"),
        );
    }
    let unmatched = match file.agent.unmatched_preflights.as_deref() {
        Some(s) => s.parse().expect("unmatchedPreflights"),
        None => UnmatchedPreflights::Local,
    };
    let verdict = decide(table, &method, &uri, &headers, unmatched);

    let backend = || {
        let mut h = HeaderMap::new();
        for (k, v) in &file.backend.headers {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        (file.backend.status.unwrap_or(200), h)
    };
    match (&verdict.decision, verdict.hit.is_some()) {
        (Decision::Answer(a), _) => {
            let mut h = HeaderMap::new();
            a.write_headers(&mut h);
            (200, h, false, HeaderMap::new())
        }
        (Decision::Forward(edits), false) => {
            let mut h = HeaderMap::new();
            edits.apply_to(&mut h);
            (StatusCode::NOT_FOUND.as_u16(), h, false, HeaderMap::new())
        }
        (Decision::PassThrough(_), false) => (404, HeaderMap::new(), false, HeaderMap::new()),
        (Decision::Forward(edits), true) => {
            let (status, mut h) = backend();
            edits.apply_to(&mut h);
            (status, h, true, headers.clone())
        }
        (Decision::PassThrough(_), true) => {
            let (status, h) = backend();
            (status, h, true, headers.clone())
        }
    }
}

#[test]
fn every_behaviour_case_holds_for_the_engine() {
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let mut count = 0;
    for file in cases::load_all() {
        let path = dir.path().join(format!("{}.yaml", file.name));
        std::fs::write(&path, &file.resources).unwrap();
        let (table, _) = load_table(&[path], &BuildOptions::default())
            .unwrap_or_else(|d| panic!("{}: resources do not load:\n{d}", file.path.display()));
        for case in &file.cases {
            count += 1;
            let (status, headers, forwarded, saw) = respond(&file, &table, case);
            if let Err(e) = cases::check(case, status, &headers, forwarded, Some(&saw)) {
                failures.push(format!("{} / {}: {e}", file.name, case.name));
            }
        }
    }
    assert!(count >= 40, "only {count} cases were replayed");
    assert!(
        failures.is_empty(),
        "{} of {count} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn unmatched_preflights_forward_returns_the_backends_answer() {
    let file = cases::load(&cases::cases_dir().join("seed-guide.yaml"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.yaml");
    std::fs::write(&path, &file.resources).unwrap();
    let (table, _) = load_table(&[path], &BuildOptions::default()).unwrap();
    let case = file
        .cases
        .iter()
        .find(|c| {
            c.name
                .starts_with("preflight from an origin that is not allowed")
        })
        .unwrap();
    let mut forward = file.clone();
    forward.agent.unmatched_preflights = Some("forward".into());
    let (status, headers, forwarded, _) = respond(&forward, &table, case);
    assert_eq!(status, 200);
    assert!(forwarded, "a denied preflight goes to the app");
    assert_eq!(
        headers.get("access-control-allow-origin").unwrap(),
        "*",
        "the app's answer is returned as is"
    );
}

#[test]
fn the_comparison_catches_a_wrong_answer() {
    let file = cases::load(&cases::cases_dir().join("seed-guide.yaml"));
    let case = &file.cases[0];
    let mut h = HeaderMap::new();
    h.insert("access-control-allow-origin", HeaderValue::from_static("*"));
    h.append(
        "access-control-allow-origin",
        HeaderValue::from_static("https://example.com"),
    );
    let err = cases::check(case, 204, &h, true, None).unwrap_err();
    for part in [
        "status 204",
        "forwarded",
        "appears 2 times",
        "access-control-allow-methods: missing",
        "Vary",
    ] {
        assert!(err.contains(part), "{part:?} not reported in: {err}");
    }
}
