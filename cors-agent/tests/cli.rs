//! The offline commands as a user runs them: exit codes, and what they print.

use std::path::Path;
use std::process::{Command, Output};

fn cors_agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cors-agent"))
        .args(args)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .output()
        .expect("run cors-agent")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn validate_accepts_the_examples_without_a_warning() {
    let out = cors_agent(&["validate", "-f", "examples/"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("valid: 2 HTTPRoute(s)"), "{stdout}");
    assert!(stdout.contains("0 warning(s)"), "{stdout}");
    assert!(stderr.is_empty(), "{stderr}");
}

#[test]
fn validate_prints_lint_warnings_in_file_order_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lint.yaml");
    let text_in = std::fs::read_to_string("../examples/httpbin.yaml")
        .unwrap()
        .replace("maxAge: 7200", "maxAge: 86400");
    std::fs::write(&file, text_in).unwrap();
    let out = cors_agent(&["validate", "-f", file.to_str().unwrap()]);
    let (_, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<usize> = stderr
        .lines()
        .filter(|l| l.contains("Chromium caps"))
        .map(|l| l.split(':').nth(2).unwrap().trim().parse().unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(lines[0] < lines[1], "warnings in file order: {stderr}");
}

#[test]
fn validate_exits_2_with_file_line_resource_field_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: api\n  namespace: shop\nspec:\n  rules:\n  - filters:\n    - type: CORS\n      cors:\n        allowOrigins:\n        - https://ok.test\n        - \"https://trailing.test/\"\n",
    )
    .unwrap();
    let out = cors_agent(&["validate", "-f", bad.to_str().unwrap()]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "error: {}:13: HTTPRoute shop/api: spec.rules[0].filters[0].cors.allowOrigins[1]: \"https://trailing.test/\" is not an origin",
            bad.display()
        )),
        "{stderr}"
    );
}

#[test]
fn validate_reads_folders_and_names_ignored_kinds() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy("../examples/httpbin.yaml", dir.path().join("a.yaml")).unwrap();
    std::fs::write(
        dir.path().join("b.yml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg}\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not read").unwrap();
    let out = cors_agent(&["validate", "-f", dir.path().to_str().unwrap()]);
    let (_, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("ConfigMap cfg: ignored"), "{stderr}");
}

#[test]
fn explain_shows_route_policy_origin_and_the_exact_answer() {
    let out = cors_agent(&[
        "explain",
        "-f",
        "examples/httpbin.yaml",
        "-X",
        "OPTIONS",
        "https://www.example.com/get",
        "-H",
        "Origin: https://example.com",
        "-H",
        "Access-Control-Request-Method: GET",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    for part in [
        "route:    HTTPRoute httpbin/httpbin rule 0",
        "policy:   HTTPRoute httpbin/httpbin spec.rules[0].filters[0].cors",
        "beat:   AgentgatewayPolicy agentgateway-system/httpbin-cors",
        "more specific",
        "allowed by spec.rules[0].filters[0].cors.allowOrigins[0]",
        "decision: preflight_allowed",
        "HTTP/1.1 200 OK",
        "access-control-allow-origin: https://example.com",
        "access-control-allow-methods: GET,POST,OPTIONS",
        "access-control-max-age: 7200",
    ] {
        assert!(stdout.contains(part), "{part:?} missing from:\n{stdout}");
    }
}

#[test]
fn explain_says_why_an_origin_is_refused() {
    let out = cors_agent(&[
        "explain",
        "-f",
        "examples/httpbin.yaml",
        "https://www.example.com/get",
        "-H",
        "origin: https://example.com.evil.test",
    ]);
    let (stdout, _) = text(&out);
    assert!(out.status.success());
    assert!(
        stdout.contains("NOT allowed: no allowOrigins entry matches"),
        "{stdout}"
    );
    assert!(stdout.contains("decision: denied"), "{stdout}");
    assert!(!stdout.contains("access-control-allow-origin"), "{stdout}");
}

#[test]
fn explain_refuses_a_url_without_host_and_a_bad_header() {
    for url in ["/get", "get"] {
        let out = cors_agent(&["explain", "-f", "examples/httpbin.yaml", url]);
        assert_eq!(out.status.code(), Some(2));
        assert!(text(&out).1.contains("give a full URL"), "{url}");
    }
    let out = cors_agent(&["explain", "-f", "examples/httpbin.yaml", "/get"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).1.contains("give a full URL"));
    let out = cors_agent(&[
        "explain",
        "-f",
        "examples/httpbin.yaml",
        "https://a.test/",
        "-H",
        "Origin",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).1.contains("expected 'Name: value'"));
}

#[test]
fn help_shows_examples() {
    for cmd in ["validate", "explain"] {
        let out = cors_agent(&[cmd, "--help"]);
        assert!(
            text(&out).0.contains("Examples:"),
            "{cmd} --help has no examples"
        );
    }
}

#[test]
fn explain_warns_when_the_browser_will_still_block_an_allowed_preflight() {
    let out = cors_agent(&[
        "explain",
        "-f",
        "examples/httpbin.yaml",
        "-X",
        "OPTIONS",
        "https://www.example.com/get",
        "-H",
        "Origin: https://example.com",
        "-H",
        "Access-Control-Request-Method: DELETE",
        "-H",
        "Access-Control-Request-Headers: X-Foo, Origin",
    ]);
    let (stdout, _) = text(&out);
    assert!(stdout.contains("decision: preflight_allowed"), "{stdout}");
    assert!(stdout.contains("DELETE is not in allowMethods"), "{stdout}");
    assert!(
        stdout.contains("request header(s) x-foo not in allowHeaders"),
        "{stdout}"
    );
    let out = cors_agent(&[
        "explain",
        "-f",
        "examples/httpbin.yaml",
        "-X",
        "OPTIONS",
        "https://www.example.com/get",
        "-H",
        "Origin: https://example.com",
        "-H",
        "Access-Control-Request-Method: POST",
    ]);
    assert!(text(&out).0.contains("browser:  the preflight passes"));
}

#[test]
fn explain_shows_the_400_the_proxy_answers_before_routing() {
    for (url, reason) in [
        ("https://www.example.com/a%2Fb", "encoded slash"),
        ("https://user@www.example.com/get", "userinfo"),
    ] {
        let out = cors_agent(&["explain", "-f", "examples/httpbin.yaml", url]);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{stderr}");
        assert!(stdout.contains("400 Bad Request"), "{url}: {stdout}");
        assert!(stdout.contains(reason), "{url}: {stdout}");
        assert!(!stdout.contains("route:"), "{url}: routed anyway: {stdout}");
    }
    // Dot segments are resolved before routing, as the proxy does.
    let out = cors_agent(&[
        "explain",
        "-f",
        "examples/httpbin.yaml",
        "https://www.example.com/x/../get",
    ]);
    let (stdout, _) = text(&out);
    assert!(
        stdout.contains("request:  GET https://www.example.com/get"),
        "{stdout}"
    );
}

#[test]
fn proxy_refuses_an_upstream_nothing_can_listen_on() {
    for upstream in ["127.0.0.1:0", "0.0.0.0:8000", "app:8000"] {
        let out = cors_agent(&[
            "proxy",
            "--upstream",
            upstream,
            "-f",
            "examples/httpbin.yaml",
        ]);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{upstream}: {stderr}");
        assert!(stderr.contains("--upstream"), "{upstream}: {stderr}");
    }
}

#[test]
fn explain_says_no_policy_applies_where_no_route_matched() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("route.yaml");
    // A policy on one route and nothing on the Gateway: other hosts match no route at all.
    std::fs::write(
        &file,
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: app, namespace: shop}
spec:
  hostnames: [www.example.com]
  rules:
  - filters:
    - type: CORS
      cors:
        allowOrigins: ["https://app.example.com"]
    backendRefs: [{name: app, port: 8080}]
"#,
    )
    .unwrap();
    let out = cors_agent(&[
        "explain",
        "-f",
        file.to_str().unwrap(),
        "https://nowhere.example/get",
        "-H",
        "origin: https://app.example.com",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("route:    none matched: the agent answers 404"),
        "{stdout}"
    );
    assert!(
        stdout.contains("policy:   none applies where no route matched"),
        "{stdout}"
    );
    assert!(!stdout.contains("passes through"), "{stdout}");
}
