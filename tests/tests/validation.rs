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

#[test]
fn hostile_yaml_is_refused_with_a_message_not_a_crash() {
    let errs = errors(&("- ".repeat(20_000) + "x\n"));
    assert!(
        errs.iter()
            .any(|e| e.contains("bad.yaml:") && e.contains("nested more than 64 levels")),
        "{errs:#?}"
    );
    let errs = errors("apiVersion: v1\nkind: List\nitems: 5\n");
    assert!(
        errs.iter().any(|e| e.contains("items must be a list")),
        "{errs:#?}"
    );
}

#[test]
fn an_empty_set_of_resources_is_an_error() {
    let errs = errors("");
    assert!(
        errs.iter()
            .any(|e| e.contains("no HTTPRoute in the given resources")),
        "{errs:#?}"
    );
}

#[test]
fn kind_and_api_version_typos_are_errors_not_silent_skips() {
    let errs = errors(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HttpRoute\nmetadata: {name: a}\nspec: {}\n",
    );
    assert!(
        errs.iter().any(|e| e.contains("did you mean HTTPRoute?")),
        "{errs:#?}"
    );
    let errs = errors(
        "apiVersion: gateway.networking.k8s.io\nkind: HTTPRoute\nmetadata: {name: a}\nspec: {}\n",
    );
    assert!(
        errs.iter().any(|e| e.contains("has no version")),
        "{errs:#?}"
    );
    let errs = errors("kind: HTTPRoute\nmetadata: {name: a}\nspec: {}\n");
    assert!(
        errs.iter().any(|e| e.contains("HTTPRoute: no apiVersion")),
        "{errs:#?}"
    );
    let errs = errors(
        "apiVersion: gateway.networking.k8s.io/v7\nkind: HTTPRoute\nmetadata: {name: a, namespace: shop}\nspec: {}\n",
    );
    assert!(
        errs.iter()
            .any(|e| e
                .contains("HTTPRoute shop/a: unsupported apiVersion gateway.networking.k8s.io/v7")),
        "{errs:#?}"
    );
}

#[test]
fn an_absurdly_long_name_is_shown_cut_short() {
    let name = "x".repeat(100_000);
    let errs = errors(&format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}A}}\nspec: {{}}\n"
    ));
    assert!(!errs.is_empty());
    for e in &errs {
        assert!(e.len() < 1000, "{} bytes: {}...", e.len(), &e[..200]);
        assert!(e.contains("(100001 bytes)"), "{e}");
    }
}

#[test]
fn a_document_that_is_not_a_mapping_is_not_read_as_one() {
    // serde would take a list's items for apiVersion and kind, in order.
    for (doc, shape) in [
        ("- gateway.networking.k8s.io/v1\n- HTTPRoute\n", "a list"),
        ("- v1\n- List\n", "a list"),
        ("42\n", "a number"),
    ] {
        let errs = errors(doc);
        assert!(
            errs.iter().any(|e| e.contains("bad.yaml:1:")
                && e.contains(&format!("not a Kubernetes resource: {shape}"))),
            "{doc:?}: {errs:#?}"
        );
    }
}

#[test]
fn metadata_that_decides_precedence_is_checked() {
    let route = |meta: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: a\n{meta}spec: {{}}\n"
        )
    };
    assert_rejected(
        &route("  creationTimestamp: \"9999-99-99T99:99:99Z\"\n"),
        "metadata.creationTimestamp",
        "is not a timestamp",
    );
    assert_rejected(
        &route("  namespace: \"BAD NS\"\n"),
        "metadata.namespace",
        "not a valid namespace",
    );
}

#[test]
fn regular_expressions_are_checked_alone_and_reported_on_one_line() {
    let base = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: api\nspec:\n  rules:\n  - matches:\n    - path: {type: RegularExpression, value: ";
    // Would escape the anchoring group if it were only wrapped in ^(?:...)$.
    let errs = errors(&format!("{base}\"/api)|(/admin\"}}\n"));
    assert!(
        errs.iter()
            .any(|e| e
                .contains("spec.rules[0].matches[0].path.value: not a valid regular expression")),
        "{errs:#?}"
    );
    assert!(
        errs.iter()
            .all(|e| !e.contains('\n') && !e.contains("^(?:")),
        "{errs:#?}"
    );
}

#[test]
fn impossible_origin_hosts_are_refused() {
    let long = [
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(63),
    ]
    .join(".");
    assert_rejected(
        &route_with_cors(&format!("allowOrigins: [\"https://{long}\"]")),
        &format!("{CORS}.allowOrigins[0]"),
        "at most 253 characters",
    );
    assert_rejected(
        &route_with_cors(&format!(
            "allowOrigins: [\"https://{}.test\"]",
            "x".repeat(64)
        )),
        &format!("{CORS}.allowOrigins[0]"),
        "each label at most 63",
    );
}

#[test]
fn only_regular_files_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pipe.yaml");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(status.success());
    let d = load_table(&[fifo], &BuildOptions::default()).unwrap_err();
    assert!(
        d.to_string().contains("pipe.yaml: not a regular file"),
        "{d}"
    );
    let bad = dir.path().join("latin1.yaml");
    std::fs::write(&bad, b"kind: HTTPRoute\nname: caf\xe9\n").unwrap();
    let d = load_table(&[bad], &BuildOptions::default()).unwrap_err();
    assert!(
        d.to_string().contains("latin1.yaml:2: not UTF-8 text"),
        "{d}"
    );
}
