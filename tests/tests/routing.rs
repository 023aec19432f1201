//! Route selection (Gateway API precedence, the preflight rule) and policy attachment
//! (contract §2), through the same `decide` the proxy calls.

use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};

use cors_agent::cors::UnmatchedPreflights;
use cors_agent::engine::{decide, load_table};
use cors_agent::routes::{BuildOptions, Level, RouteTable, ServiceRef};

fn table_with(yaml: &str, options: &BuildOptions) -> RouteTable {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.yaml");
    std::fs::write(&path, yaml).unwrap();
    match load_table(&[path], options) {
        Ok((t, _)) => t,
        Err(d) => panic!("resources do not load:\n{d}"),
    }
}

fn table(yaml: &str) -> RouteTable {
    table_with(yaml, &BuildOptions::default())
}

/// `route-name#rule-index` of the route that serves the request, or `404`.
fn route(t: &RouteTable, method: &str, url: &str, headers: &[(&str, &str)]) -> String {
    let method = Method::from_bytes(method.as_bytes()).unwrap();
    let uri: Uri = url.parse().unwrap();
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    let v = decide(t, &method, &uri, &h, UnmatchedPreflights::Local);
    match v.hit {
        Some(hit) => format!("{}#{}", hit.route.id.name, hit.rule.index),
        None => "404".into(),
    }
}

fn http_route(name: &str, extra_meta: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: {name}\n  namespace: default\n{extra_meta}spec:\n{spec}"
    )
}

#[test]
fn exact_beats_regex_beats_longest_prefix_beats_shorter_prefix() {
    let t = table(&http_route(
        "r",
        "",
        "  rules:
  - matches: [{path: {type: PathPrefix, value: /}}]
  - matches: [{path: {type: PathPrefix, value: /api}}]
  - matches: [{path: {type: PathPrefix, value: /api/v1/}}]
  - matches: [{path: {type: Exact, value: /api/v1/health}}]
  - matches: [{path: {type: RegularExpression, value: \"/api/v[0-9]+/items/.*\"}}]
",
    ));
    assert_eq!(route(&t, "GET", "http://h/api/v1/health", &[]), "r#3");
    assert_eq!(route(&t, "GET", "http://h/api/v1/health/x", &[]), "r#2");
    assert_eq!(route(&t, "GET", "http://h/api/v1", &[]), "r#2");
    assert_eq!(
        route(&t, "GET", "http://h/api/v1/items/9", &[]),
        "r#4",
        "a regex beats a prefix"
    );
    assert_eq!(
        route(&t, "GET", "http://h/api/v1/items", &[]),
        "r#2",
        "a regex matches the whole path"
    );
    assert_eq!(route(&t, "GET", "http://h/api/v2/items/9", &[]), "r#4");
    assert_eq!(route(&t, "GET", "http://h/api/v10", &[]), "r#1");
    assert_eq!(
        route(&t, "GET", "http://h/apix", &[]),
        "r#0",
        "prefixes match whole segments"
    );
    assert_eq!(route(&t, "GET", "http://h/", &[]), "r#0");
}

#[test]
fn exact_hostname_beats_wildcard_beats_none_and_hosts_fold_case() {
    let t = table(
        &[
            http_route("any", "", "  rules: [{}]\n"),
            http_route(
                "wild",
                "",
                "  hostnames: [\"*.example.com\"]\n  rules: [{}]\n",
            ),
            http_route(
                "deep",
                "",
                "  hostnames: [\"*.api.example.com\"]\n  rules: [{}]\n",
            ),
            http_route(
                "exact",
                "",
                "  hostnames: [www.example.com]\n  rules: [{}]\n",
            ),
        ]
        .concat(),
    );
    assert_eq!(route(&t, "GET", "http://www.example.com/", &[]), "exact#0");
    assert_eq!(
        route(&t, "GET", "http://WWW.Example.COM:8080/", &[]),
        "exact#0"
    );
    assert_eq!(route(&t, "GET", "http://a.example.com/", &[]), "wild#0");
    assert_eq!(route(&t, "GET", "http://x.api.example.com/", &[]), "deep#0");
    assert_eq!(
        route(&t, "GET", "http://example.com/", &[]),
        "any#0",
        "a wildcard never matches the bare suffix"
    );
    assert_eq!(route(&t, "GET", "http://other.test/", &[]), "any#0");
}

#[test]
fn method_then_headers_then_query_params_break_path_ties() {
    let t = table(&http_route(
        "r",
        "",
        "  rules:
  - matches: [{path: {type: PathPrefix, value: /p}}]
  - matches: [{path: {type: PathPrefix, value: /p}, method: POST}]
  - matches: [{path: {type: PathPrefix, value: /p}, headers: [{name: x-a, value: \"1\"}]}]
  - matches: [{path: {type: PathPrefix, value: /p}, headers: [{name: x-a, value: \"1\"}, {name: X-B, type: RegularExpression, value: \"v[0-9]\"}]}]
  - matches: [{path: {type: PathPrefix, value: /p}, queryParams: [{name: q, value: yes}]}]
",
    ));
    assert_eq!(route(&t, "GET", "http://h/p", &[]), "r#0");
    assert_eq!(
        route(&t, "POST", "http://h/p", &[("x-a", "1")]),
        "r#1",
        "a method match outranks header matches"
    );
    assert_eq!(route(&t, "GET", "http://h/p", &[("x-a", "1")]), "r#2");
    assert_eq!(
        route(&t, "GET", "http://h/p", &[("X-A", "1"), ("x-b", "v7")]),
        "r#3"
    );
    assert_eq!(
        route(&t, "GET", "http://h/p", &[("x-a", "1"), ("x-b", "v77")]),
        "r#2",
        "regular expressions match the whole value"
    );
    assert_eq!(route(&t, "GET", "http://h/p?q=yes", &[]), "r#4");
    assert_eq!(route(&t, "GET", "http://h/p?q=no", &[]), "r#0");
}

#[test]
fn ties_go_to_the_older_route_then_namespace_name_then_rule_order() {
    let t = table(
        &[
            http_route(
                "b-new",
                "  creationTimestamp: \"2024-02-01T00:00:00Z\"\n",
                "  rules: [{}, {}]\n",
            ),
            http_route(
                "c-old",
                "  creationTimestamp: \"2024-01-01T00:00:00Z\"\n",
                "  rules: [{}, {}]\n",
            ),
        ]
        .concat(),
    );
    assert_eq!(route(&t, "GET", "http://h/x", &[]), "c-old#0");
    let t = table(
        &[
            http_route("b", "", "  rules: [{}]\n"),
            http_route("a", "", "  rules: [{}]\n"),
        ]
        .concat(),
    );
    assert_eq!(route(&t, "GET", "http://h/x", &[]), "a#0");
}

#[test]
fn a_preflight_is_routed_as_the_request_it_announces() {
    let t = table(&http_route(
        "r",
        "",
        "  rules:
  - matches: [{path: {type: PathPrefix, value: /api}}]
  - matches: [{path: {type: PathPrefix, value: /api}, method: PUT, headers: [{name: x-version, value: \"2\"}]}]
  - matches: [{path: {type: PathPrefix, value: /get}, method: GET}]
",
    ));
    let preflight = |acrm: &'static str| {
        vec![
            ("origin", "https://a.test"),
            ("access-control-request-method", acrm),
        ]
    };
    assert_eq!(
        route(&t, "OPTIONS", "http://h/api/x", &preflight("PUT")),
        "r#1",
        "method checked against ACRM, headers count as satisfied"
    );
    assert_eq!(
        route(&t, "OPTIONS", "http://h/api/x", &preflight("GET")),
        "r#0"
    );
    assert_eq!(
        route(&t, "OPTIONS", "http://h/get", &preflight("GET")),
        "r#2"
    );
    assert_eq!(
        route(
            &t,
            "OPTIONS",
            "http://h/get",
            &[("origin", "https://a.test")]
        ),
        "404",
        "an OPTIONS that is not a preflight is routed normally"
    );
    assert_eq!(
        route(&t, "PUT", "http://h/api/x", &[]),
        "r#0",
        "the real request must carry the header"
    );
}

fn gateway_policy(name: &str, extra_meta: &str, target: &str) -> String {
    format!(
        "---\napiVersion: agentgateway.dev/v1alpha1\nkind: AgentgatewayPolicy\nmetadata:\n  name: {name}\n  namespace: default\n{extra_meta}spec:\n  targetRefs: [{target}]\n  traffic:\n    cors:\n      allowOrigins: [\"https://{name}.test\"]\n"
    )
}

fn winner(t: &RouteTable, url: &str) -> (String, Level, usize) {
    let uri: Uri = url.parse().unwrap();
    let h = HeaderMap::new();
    let v = decide(t, &Method::GET, &uri, &h, UnmatchedPreflights::Local);
    let p = v.policy.expect("a policy applies");
    (p.source.resource.name.clone(), p.level, v.candidates.len())
}

#[test]
fn the_most_specific_policy_wins_whole() {
    let cors = |o: &str| format!("{{type: CORS, cors: {{allowOrigins: [\"https://{o}.test\"]}}}}");
    let yaml = [
        http_route(
            "r",
            "",
            &format!(
                "  parentRefs: [{{name: gw}}]\n  rules:\n  - name: both\n    matches: [{{path: {{value: /both}}}}]\n    filters: [{}]\n    backendRefs: [{{name: svc, port: 80, filters: [{}]}}]\n  - name: rule\n    matches: [{{path: {{value: /rule}}}}]\n    filters: [{}]\n  - name: named\n    matches: [{{path: {{value: /named}}}}]\n  - name: plain\n    matches: [{{path: {{value: /plain}}}}]\n",
                cors("rule-filter"),
                cors("backend-filter"),
                cors("rule-filter"),
            ),
        ),
        gateway_policy("on-rule", "", "{group: gateway.networking.k8s.io, kind: HTTPRoute, name: r, sectionName: named}"),
        gateway_policy("on-route", "", "{group: gateway.networking.k8s.io, kind: HTTPRoute, name: r}"),
        gateway_policy("on-listener", "", "{group: gateway.networking.k8s.io, kind: Gateway, name: gw, sectionName: http}"),
        gateway_policy("on-gateway", "", "{group: gateway.networking.k8s.io, kind: Gateway, name: gw}"),
    ]
    .concat();
    let t = table(&yaml);
    assert_eq!(
        winner(&t, "http://h/both"),
        ("r".into(), Level::BackendRefFilter, 5)
    );
    assert_eq!(
        winner(&t, "http://h/rule"),
        ("r".into(), Level::RuleFilter, 4)
    );
    assert_eq!(
        winner(&t, "http://h/named"),
        ("on-rule".into(), Level::PolicyOnRule, 4)
    );
    assert_eq!(
        winner(&t, "http://h/plain"),
        ("on-route".into(), Level::PolicyOnRoute, 3)
    );
    assert_eq!(
        winner(&t, "http://other/nothing"),
        ("on-listener".into(), Level::PolicyOnListener, 2),
        "404s get the Gateway-level policy"
    );
}

#[test]
fn at_one_level_the_older_policy_wins_then_namespace_name() {
    let target = "{group: gateway.networking.k8s.io, kind: HTTPRoute, name: r}";
    let t = table(
        &[
            http_route("r", "", "  rules: [{}]\n"),
            gateway_policy(
                "a-new",
                "  creationTimestamp: \"2025-01-01T00:00:00Z\"\n",
                target,
            ),
            gateway_policy(
                "z-old",
                "  creationTimestamp: \"2024-01-01T00:00:00Z\"\n",
                target,
            ),
        ]
        .concat(),
    );
    assert_eq!(winner(&t, "http://h/").0, "z-old");
    let t = table(
        &[
            http_route("r", "", "  rules: [{}]\n"),
            gateway_policy("b", "", target),
            gateway_policy("a", "", target),
        ]
        .concat(),
    );
    assert_eq!(winner(&t, "http://h/").0, "a");
}

#[test]
fn with_gateways_loaded_policies_follow_attachment() {
    let gw = |name: &str| {
        format!(
            "---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  gatewayClassName: x\n  listeners:\n  - {{name: http, port: 80, protocol: HTTP}}\n"
        )
    };
    let t = table(
        &[
            gw("gw-a"),
            gw("gw-b"),
            http_route(
                "on-a",
                "",
                "  parentRefs: [{name: gw-a}]\n  rules: [{matches: [{path: {value: /a}}]}]\n",
            ),
            http_route(
                "on-b",
                "",
                "  parentRefs: [{name: gw-b}]\n  rules: [{matches: [{path: {value: /b}}]}]\n",
            ),
            gateway_policy(
                "for-a",
                "",
                "{group: gateway.networking.k8s.io, kind: Gateway, name: gw-a}",
            ),
        ]
        .concat(),
    );
    assert_eq!(winner(&t, "http://h/a").0, "for-a");
    let uri: Uri = "http://h/b".parse().unwrap();
    let h = HeaderMap::new();
    let v = decide(&t, &Method::GET, &uri, &h, UnmatchedPreflights::Local);
    assert!(
        v.hit.is_some() && v.policy.is_none(),
        "a route on another Gateway does not get gw-a's policy"
    );
}

#[test]
fn a_node_port_sees_only_rules_for_its_service() {
    let yaml = http_route(
        "r",
        "",
        "  rules:\n  - matches: [{path: {value: /web}}]\n    backendRefs: [{name: web, port: 8080}]\n  - matches: [{path: {value: /api}}]\n    backendRefs: [{name: api, port: 9090}]\n",
    );
    let options = BuildOptions {
        service: Some(ServiceRef {
            name: "api".into(),
            port: 9090,
        }),
    };
    let t = table_with(&yaml, &options);
    assert_eq!(route(&t, "GET", "http://h/api", &[]), "r#1");
    assert_eq!(route(&t, "GET", "http://h/web", &[]), "404");
}
