//! The per-request decision on a realistic table: 100 routes, a 64-origin policy, the matched
//! origin last in the list. Target: under 1 µs per decision, headers rendered included.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method, Uri};

use cors_agent::cors::{Decision, UnmatchedPreflights};
use cors_agent::engine::{decide, load_table};
use cors_agent::routes::{BuildOptions, RouteTable};

fn table() -> RouteTable {
    let origins: Vec<String> = (0..64)
        .map(|i| format!("\"https://app{i}.example.com\""))
        .collect();
    let mut yaml = String::new();
    for i in 0..100 {
        yaml.push_str(&format!(
            "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: svc-{i}, namespace: bench}}
spec:
  hostnames: [api.example.com]
  rules:
  - matches:
    - path: {{type: PathPrefix, value: /svc-{i}}}
    filters:
    - type: CORS
      cors:
        allowOrigins: [{}]
        allowMethods: [GET, POST, PUT]
        allowHeaders: [Content-Type, Authorization]
        exposeHeaders: [X-Request-Id]
        allowCredentials: true
        maxAge: 600
    backendRefs: [{{name: svc, port: 80}}]
---
",
            origins.join(", ")
        ));
    }
    let dir = std::env::temp_dir().join(format!("cors-agent-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("routes.yaml");
    std::fs::write(&path, yaml).unwrap();
    let (table, _) = load_table(&[path], &BuildOptions::default()).expect("bench resources load");
    let _ = std::fs::remove_dir_all(&dir);
    table
}

fn request(method: Method, origin: &'static str, preflight: bool) -> (Method, Uri, HeaderMap) {
    let mut h = HeaderMap::new();
    h.insert("host", HeaderValue::from_static("api.example.com"));
    h.insert("origin", HeaderValue::from_static(origin));
    if preflight {
        h.insert(
            "access-control-request-method",
            HeaderValue::from_static("PUT"),
        );
        h.insert(
            "access-control-request-headers",
            HeaderValue::from_static("content-type"),
        );
    }
    (method, Uri::from_static("/svc-73/items/42"), h)
}

fn bench(c: &mut Criterion) {
    let table = table();
    let mut backend = HeaderMap::new();
    backend.insert("content-type", HeaderValue::from_static("application/json"));
    backend.insert("access-control-allow-origin", HeaderValue::from_static("*"));

    let cases = [
        (
            "preflight_allowed",
            request(Method::OPTIONS, "https://app63.example.com", true),
        ),
        (
            "preflight_denied",
            request(Method::OPTIONS, "https://evil.example.net", true),
        ),
        (
            "actual_allowed",
            request(Method::GET, "https://app63.example.com", false),
        ),
        (
            "actual_denied",
            request(Method::GET, "https://evil.example.net", false),
        ),
    ];
    let mut group = c.benchmark_group("decision");
    for (name, (method, uri, headers)) in &cases {
        // The upstream response is made outside the measurement: only the decision and the
        // header edits count.
        group.bench_function(*name, |b| {
            b.iter_batched_ref(
                || backend.clone(),
                |response| {
                    let v = decide(&table, method, uri, headers, UnmatchedPreflights::Local);
                    match &v.decision {
                        Decision::Answer(a) => {
                            let mut h = HeaderMap::with_capacity(12);
                            a.write_headers(&mut h);
                            black_box(h);
                        }
                        Decision::Forward(edits) => edits.apply_to(response),
                        Decision::PassThrough(_) => unreachable!("every bench route has a policy"),
                    }
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
