//! One invalid resource per validation rule: each must be refused with a message naming the
//! file, the line, the resource, the field path and the reason.

use std::path::PathBuf;

use cors_agent::engine::load_table;
use cors_agent::routes::BuildOptions;

fn route_with_cors(cors: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: api
  namespace: shop
spec:
  rules:
  - matches:
    - path: {{type: PathPrefix, value: /api}}
    filters:
    - type: CORS
      cors:
{}
",
        cors.lines()
            .map(|l| format!("        {l}\n"))
            .collect::<String>()
    )
}

/// Loads `yaml` and returns the error lines.
fn errors(yaml: &str) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("bad.yaml");
    std::fs::write(&path, yaml).unwrap();
    match load_table(&[path], &BuildOptions::default()) {
        Ok(_) => vec![],
        Err(d) => d.errors.iter().map(|e| e.to_string()).collect(),
    }
}

#[track_caller]
fn assert_rejected(yaml: &str, field: &str, reason: &str) {
    let errs = errors(yaml);
    assert!(
        errs.iter().any(|e| e.contains("bad.yaml:")
            && e.contains(&format!(": {field}: "))
            && e.contains(reason)),
        "expected an error at {field} saying {reason:?}, got: {errs:#?}"
    );
}

const CORS: &str = "spec.rules[0].filters[0].cors";

#[test]
fn origin_rules_of_the_contract() {
    let cases = [
        (
            "allowOrigins: [\"https://a.test\", \"\"]",
            "allowOrigins[1]",
            "empty entry",
        ),
        (
            "allowOrigins: [\"https://a.test/\"]",
            "allowOrigins[0]",
            "nothing after the port",
        ),
        (
            "allowOrigins: [\"ftp://a.test\"]",
            "allowOrigins[0]",
            "is not an origin",
        ),
        (
            "allowOrigins: [\"https://a.test:99999\"]",
            "allowOrigins[0]",
            "port must be between 1 and 65535",
        ),
        (
            "allowOrigins: [\"*\", \"https://a.test\"]",
            "allowOrigins",
            "\"*\" must be the only entry",
        ),
        (
            "allowOrigins: [\"https://a.test\", \"https://A.test\"]",
            "allowOrigins[1]",
            "repeats entry [0]",
        ),
    ];
    for (cors, field, reason) in cases {
        assert_rejected(&route_with_cors(cors), &format!("{CORS}.{field}"), reason);
    }
    let many: Vec<String> = (0..65).map(|i| format!("\"https://h{i}.test\"")).collect();
    assert_rejected(
        &route_with_cors(&format!("allowOrigins: [{}]", many.join(", "))),
        &format!("{CORS}.allowOrigins"),
        "at most 64",
    );
}

#[test]
fn method_header_and_max_age_rules_of_the_contract() {
    let cases = [
        (
            "allowMethods: [GET, FETCH]",
            "allowMethods[1]",
            "is not one of",
        ),
        (
            "allowMethods: [\"*\", GET]",
            "allowMethods",
            "must be the only entry",
        ),
        (
            "allowMethods: [GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE, PATCH, GET]",
            "allowMethods",
            "at most 9",
        ),
        (
            "allowHeaders: [\"x good\"]",
            "allowHeaders[0]",
            "not a valid HTTP header name",
        ),
        (
            "allowHeaders: [\"*\", x-a]",
            "allowHeaders",
            "must be the only entry",
        ),
        (
            "exposeHeaders: [\"x:bad\"]",
            "exposeHeaders[0]",
            "not a valid HTTP header name",
        ),
        ("maxAge: 0", "maxAge", "out of range"),
        ("maxAge: -5", "maxAge", "out of range"),
    ];
    for (cors, field, reason) in cases {
        let yaml = route_with_cors(&format!("allowOrigins: [\"https://a.test\"]\n{cors}"));
        assert_rejected(&yaml, &format!("{CORS}.{field}"), reason);
    }
    let many: Vec<String> = (0..65).map(|i| format!("x-h{i}")).collect();
    let yaml = route_with_cors(&format!(
        "allowOrigins: [\"https://a.test\"]\nallowHeaders: [{}]",
        many.join(", ")
    ));
    assert_rejected(&yaml, &format!("{CORS}.allowHeaders"), "at most 64");
}

#[test]
fn wrong_types_and_unknown_fields_are_refused_like_the_api_server() {
    let yaml = route_with_cors("allowOrigins: \"https://a.test,https://b.test\"");
    assert_rejected(&yaml, &format!("{CORS}.allowOrigins"), "invalid type");
    let yaml =
        route_with_cors("allowOrigins: [\"https://a.test\"]\nallowOrigin: [\"https://b.test\"]");
    assert_rejected(&yaml, &format!("{CORS}.allowOrigin"), "unknown field");
    let yaml = route_with_cors("allowOrigins: [\"https://a.test\"]\nmaxAge: \"600\"");
    assert_rejected(&yaml, &format!("{CORS}.maxAge"), "invalid type");
}

#[test]
fn the_error_names_the_line_of_the_field() {
    let yaml = route_with_cors("allowOrigins:\n- https://a.test\n- https://b.test/");
    let errs = errors(&yaml);
    // The bad entry is the 15th line of the file.
    assert!(
        errs.iter()
            .any(|e| e.contains("bad.yaml:15: HTTPRoute shop/api: ")),
        "{errs:#?}"
    );
}

#[test]
fn route_rules_are_checked() {
    let base = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: api\nspec:\n";
    let cases = [
        (
            "  hostnames: [\"Example.com\"]\n",
            "spec.hostnames[0]",
            "is not a hostname",
        ),
        (
            "  rules:\n  - matches:\n    - path: {type: PathPrefix, value: api}\n",
            "spec.rules[0].matches[0].path.value",
            "must start with",
        ),
        (
            "  rules:\n  - matches:\n    - path: {type: RegularExpression, value: \"/(\"}\n",
            "spec.rules[0].matches[0].path.value",
            "not a valid regular expression",
        ),
        (
            "  rules:\n  - matches:\n    - path: {type: Glob, value: /x}\n",
            "spec.rules[0].matches[0].path.type",
            "is not one of",
        ),
        (
            "  rules:\n  - matches:\n    - method: FETCH\n",
            "spec.rules[0].matches[0].method",
            "is not one of",
        ),
        (
            "  rules:\n  - matches:\n    - headers: [{name: \"bad name\", value: x}]\n",
            "spec.rules[0].matches[0].headers[0].name",
            "not a valid name",
        ),
        (
            "  rules:\n  - name: a\n  - name: a\n",
            "spec.rules[1].name",
            "used twice",
        ),
        (
            "  rules:\n  - filters:\n    - type: CORS\n",
            "spec.rules[0].filters[0].cors",
            "required when type is CORS",
        ),
        (
            "  rules:\n  - filters:\n    - type: CORS\n      cors: {allowOrigins: [\"https://a.test\"]}\n    - type: CORS\n      cors: {allowOrigins: [\"https://b.test\"]}\n",
            "spec.rules[0].filters[1]",
            "only one is allowed",
        ),
        (
            "  rules:\n  - filters:\n    - type: Cors\n",
            "spec.rules[0].filters[0].type",
            "is not one of",
        ),
        (
            "  rules:\n  - backendRefs:\n    - name: svc\n",
            "spec.rules[0].backendRefs[0].port",
            "required",
        ),
        ("  rulez: []\n", "spec.rulez", "unknown field"),
    ];
    for (spec, field, reason) in cases {
        assert_rejected(&format!("{base}{spec}"), field, reason);
    }
    assert_rejected(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  namespace: x\nspec: {}\n",
        "metadata.name",
        "required",
    );
}

#[test]
fn policy_rules_are_checked() {
    let policy = |body: &str| {
        format!(
            "apiVersion: agentgateway.dev/v1alpha1\nkind: AgentgatewayPolicy\nmetadata:\n  name: p\n  namespace: gw\nspec:\n{body}"
        )
    };
    assert_rejected(
        &policy("  traffic:\n    cors:\n      allowOrigins: [\"https://a.test\"]\n"),
        "spec.targetRefs",
        "required",
    );
    assert_rejected(
        &policy(
            "  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: g}]\n  traffic:\n    cors:\n      allowOrigins: [\"https://*.a.test/\"]\n",
        ),
        "spec.traffic.cors.allowOrigins[0]",
        "is not an origin",
    );
    assert_rejected(
        &policy(
            "  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: g}]\n  traffic:\n    corz: {}\n",
        ),
        "spec.traffic.corz",
        "unknown field",
    );
}

#[test]
fn invalid_yaml_and_missing_files_name_the_file() {
    let errs = errors("kind: HTTPRoute\nspec: [\n");
    assert!(
        errs.iter()
            .any(|e| e.contains("bad.yaml:") && e.contains("not valid YAML")),
        "{errs:#?}"
    );
    let d = load_table(
        &[PathBuf::from("/nonexistent/routes.yaml")],
        &BuildOptions::default(),
    )
    .unwrap_err();
    assert!(
        d.to_string()
            .contains("/nonexistent/routes.yaml: cannot read"),
        "{d}"
    );
}

#[test]
fn lints_warn_without_failing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lint.yaml");
    std::fs::write(
        &path,
        route_with_cors(
            "allowOrigins: [\"*\"]\nallowCredentials: true\nexposeHeaders: [\"*\"]\nmaxAge: 86400",
        ) + "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: web\n",
    )
    .unwrap();
    let (_, d) = load_table(&[path], &BuildOptions::default()).expect("lints are not errors");
    let text = d.to_string();
    for part in [
        "cors.allowOrigins: \"*\" with allowCredentials",
        "cors.exposeHeaders: \"*\" with allowCredentials",
        "cors.maxAge: 86400 seconds",
        "Service web: ignored",
    ] {
        assert!(text.contains(part), "{part:?} missing from:\n{text}");
    }
}

#[test]
fn a_header_match_on_a_cors_route_is_linted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lint.yaml");
    std::fs::write(
        &path,
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: a}\nspec:\n  rules:\n  - matches:\n    - headers: [{name: x-version, value: \"2\"}]\n    filters:\n    - type: CORS\n      cors: {allowOrigins: [\"https://a.test\"]}\n",
    )
    .unwrap();
    let (_, d) = load_table(&[path], &BuildOptions::default()).unwrap();
    assert!(
        d.to_string()
            .contains("spec.rules[0].matches[0].headers: a preflight cannot carry"),
        "{d}"
    );
}
