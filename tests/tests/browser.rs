//! The browser suite: CORS is enforced by browsers, so Debian's Chromium (headless) loads a
//! page from one origin and calls an app behind cors-agent on another, and each case asserts
//! what the page's own script could and could not do (`browser/page.html`'s `probe`).
//!
//! Two ways into the agent, one test each:
//! - `cors-agent proxy` on loopback. `api.example.test` -> 127.0.0.1: two agents in front of
//!   one recording app, over plain HTTP and over TLS. Every other `*.test` name -> a random
//!   127.x.y.z: the page origins, `http://…:PORT` and `https://…` on port 443, so that the
//!   policy can name `https://*.example.test` exactly as a user would (the browser sends no
//!   port in `Origin` for 443).
//! - `cors-agent node`, steering a pod's ports with eBPF, in a cluster of network namespaces
//!   (`cors_agent_tests::cluster`). Chromium and the page servers run in the client namespace
//!   and call the pod's own address, so every request really goes through the steering.
//!
//! Chromium resolves the names with `--host-resolver-rules` and trusts the test CA through an
//! NSS database in its temporary home, so TLS is validated for real: no certificate error is
//! ignored, and one case checks that a name the certificate does not carry is refused.
//! Binding port 443 and building namespaces need root, as the other end-to-end suites do.
//!
//! The app answers every request with `Access-Control-Allow-Origin: *` of its own: had the
//! agent let it through, the "denied" cases would succeed, so they also prove that the policy
//! is authoritative.
//!
//! One Chromium per test serves every case; each case gets a fresh browser context (own
//! cookies and preflight cache). A failed case prints what the browser itself logged (the
//! "blocked by CORS policy" console messages and the DevTools CORS errors), and the suite goes
//! on to the next case.
#![cfg(target_os = "linux")]

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use cors_agent::steer::NetNs;
use serde_json::{Value, json};

use cors_agent_tests::agent::{AgentBuilder, write_resources};
use cors_agent_tests::backend::{Backend, Reply, Seen};
use cors_agent_tests::browser::{Chromium, Launch, PageServer, Tab, server_tls};
use cors_agent_tests::certs::TestCa;
use cors_agent_tests::client::{self, Req};
use cors_agent_tests::cluster::{Cluster, NodeAgent, NodeConfig, PodEntry, PortEntry};
use cors_agent_tests::netns::require_root;

const PAGE_HTML: &str = include_str!("browser/page.html");

/// A whole case (tab, navigation, fetches, checks) gives up after this long.
const CASE_TIMEOUT: Duration = Duration::from_secs(40);

/// How long to wait for Chromium's CORS error event after the promise rejected.
const ISSUE_WAIT: Duration = Duration::from_secs(2);

/// The resources: one HTTPRoute whose rules (selected by path) carry the policies the cases
/// need. `{PAGES}` becomes the two page origins the core cases run from.
const POLICY: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: api
  namespace: browser
spec:
  hostnames: ["api.example.test"]
  rules:
  - name: allowed
    matches: [{path: {type: PathPrefix, value: /allowed}}]
    filters:
    - type: CORS
      cors:
        allowOrigins: [{PAGES}]
        exposeHeaders: [X-Exposed]
    backendRefs: [{name: app, port: 8000}]
  - name: denied
    matches: [{path: {type: PathPrefix, value: /denied}}]
    filters:
    - type: CORS
      cors:
        allowOrigins: ["https://elsewhere.example.test"]
        exposeHeaders: [X-Exposed]
    backendRefs: [{name: app, port: 8000}]
  - name: put-allowed
    matches: [{path: {type: PathPrefix, value: /put-allowed}}]
    filters:
    - type: CORS
      cors:
        allowOrigins: [{PAGES}]
        allowMethods: [GET, PUT]
        allowHeaders: [Content-Type, X-Custom]
    backendRefs: [{name: app, port: 8000}]
  - name: put-method-refused
    matches: [{path: {type: PathPrefix, value: /put-method-refused}}]
    filters:
    - type: CORS
      cors:
        allowOrigins: [{PAGES}]
        allowMethods: [GET, POST]
        allowHeaders: [Content-Type, X-Custom]
    backendRefs: [{name: app, port: 8000}]
  - name: put-header-refused
    matches: [{path: {type: PathPrefix, value: /put-header-refused}}]
    filters:
    - type: CORS
      cors:
        allowOrigins: [{PAGES}]
        allowMethods: [GET, PUT]
        allowHeaders: [Content-Type]
    backendRefs: [{name: app, port: 8000}]
  - name: credentials
    matches: [{path: {type: PathPrefix, value: /credentials}}]
    filters:
    - type: CORS
      cors:
        allowOrigins: [{PAGES}]
        allowCredentials: true
    backendRefs: [{name: app, port: 8000}]
  - name: no-credentials
    matches: [{path: {type: PathPrefix, value: /no-credentials}}]
    filters:
    - type: CORS
      cors:
        allowOrigins: [{PAGES}]
    backendRefs: [{name: app, port: 8000}]
  - name: wildcard
    matches: [{path: {type: PathPrefix, value: /wildcard}}]
    filters:
    - type: CORS
      cors:
        allowOrigins: ["https://*.example.test"]
    backendRefs: [{name: app, port: 8000}]
  - name: cached
    matches: [{path: {type: PathPrefix, value: /cached}}]
    filters:
    - type: CORS
      cors:
        allowOrigins: [{PAGES}]
        allowMethods: [PUT]
        allowHeaders: [Content-Type, X-Custom]
        maxAge: 600
    backendRefs: [{name: app, port: 8000}]
  - name: short-lived
    matches: [{path: {type: PathPrefix, value: /short-lived}}]
    filters:
    - type: CORS
      cors:
        allowOrigins: [{PAGES}]
        allowMethods: [PUT]
        allowHeaders: [Content-Type, X-Custom]
        maxAge: 1
    backendRefs: [{name: app, port: 8000}]
"#;

/// The app behind the agent: it answers every request with two headers for the page to try to
/// read, and with a permissive CORS header of its own, which the agent must replace: had the
/// agent let it through, the "denied" cases would succeed.
fn app_reply() -> Reply {
    Reply {
        status: None,
        headers: vec![
            ("X-Exposed".into(), "exposed-value".into()),
            ("X-Hidden".into(), "hidden-value".into()),
            ("Access-Control-Allow-Origin".into(), "*".into()),
            ("Content-Type".into(), "text/plain".into()),
        ],
    }
}

/// The page host names the HTTPS page server has a certificate for.
const PAGE_NAMES: [&str; 5] = [
    "page.example.test",
    "a.b.example.test",
    "example.test",
    "notexample.test",
    "example.test.evil.test",
];

/// The policy file for pages at `http_page` and `https_page`.
fn write_policy(dir: &Path, http_page: &str, https_page: &str) -> PathBuf {
    let policy = POLICY.replace("{PAGES}", &format!("\"{http_page}\", \"{https_page}\""));
    write_resources(dir, "policy.yaml", &policy)
}

/// One API origin the page calls, and what stands behind it.
struct Target<'a> {
    /// Prefix of the case names, e.g. `proxy, https`.
    label: &'static str,
    /// The page origin the core cases run from (named in the policy).
    page: String,
    /// The API origin, e.g. `http://api.example.test:41234`.
    api: String,
    /// The agent's admin listener, for its preflight counters.
    admin: SocketAddr,
    /// The app the agent forwards this origin's requests to.
    app: &'a Backend,
}

/// The HTTPS page server on port 443 of a random 127.x.y.z (so parallel runs and anything
/// else on 127.0.0.1:443 do not collide).
fn bind_https_pages(tls: Arc<rustls::ServerConfig>) -> (Ipv4Addr, PageServer) {
    let mut last = None;
    for attempt in 0..8u32 {
        let n = std::process::id()
            .wrapping_mul(2654435761)
            .wrapping_add(attempt * 7919);
        let ip = Ipv4Addr::new(
            127,
            100 + (n % 100) as u8,
            (n >> 8) as u8,
            1 + (n >> 16) as u8 % 250,
        );
        match PageServer::start(SocketAddr::from((ip, 443)), PAGE_HTML, Some(tls.clone())) {
            Ok(server) => return (ip, server),
            Err(e) => last = Some(e),
        }
    }
    panic!(
        "cannot bind an HTTPS page server to port 443 on loopback (this suite needs root, as \
         the other end-to-end suites do): {:#}",
        last.unwrap()
    );
}

/// Runs cases one after another, keeping failures (with the browser's own messages) for the
/// end so one broken case does not hide the others.
struct Suite<'b> {
    chromium: &'b Chromium,
    passed: usize,
    failures: Vec<String>,
}

impl<'b> Suite<'b> {
    fn new(chromium: &'b Chromium) -> Self {
        Self {
            chromium,
            passed: 0,
            failures: Vec::new(),
        }
    }

    /// Opens `page` in a fresh tab, runs `body` against it, and records the outcome. `app`'s
    /// record is cleared first, so the case sees only its own requests.
    async fn case(
        &mut self,
        name: &str,
        page: &str,
        app: &Backend,
        body: impl AsyncFnOnce(&Tab<'_>) -> anyhow::Result<()>,
    ) {
        let started = Instant::now();
        app.take_requests();
        let run = async {
            let tab = self.chromium.new_tab().await?;
            let outcome = async {
                tab.goto(page, "probe").await?;
                body(&tab).await
            }
            .await;
            let console = tab.console();
            tab.close().await;
            anyhow::Ok((outcome, console))
        };
        let (outcome, console) = match tokio::time::timeout(CASE_TIMEOUT, run).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => (Err(e), Vec::new()),
            Err(_) => (
                Err(anyhow::anyhow!(
                    "the case took longer than {CASE_TIMEOUT:?}"
                )),
                Vec::new(),
            ),
        };
        match outcome {
            Ok(()) => {
                self.passed += 1;
                println!("browser case ok: {name} ({:.0?})", started.elapsed());
            }
            Err(e) => {
                println!("browser case FAILED: {name} ({:.0?})", started.elapsed());
                let mut text = format!("{name} (page {page}): {e:#}\n  browser console:");
                if console.is_empty() {
                    text.push_str(" (nothing)");
                }
                for line in console {
                    text.push_str(&format!("\n    {line}"));
                }
                self.failures.push(text);
            }
        }
    }

    /// Panics if a case failed, with each failure and the tails of `logs` (name, text).
    fn finish(self, logs: &[(&str, String)]) {
        let failed = self.failures.len();
        println!("browser cases: {} passed, {failed} failed", self.passed);
        if failed > 0 {
            let mut text = format!(
                "{failed} browser case(s) failed:\n\n{}",
                self.failures.join("\n\n")
            );
            for (name, log) in logs {
                text.push_str(&format!("\n\n{name} log tail:\n{}", tail(log, 30)));
            }
            panic!("{text}");
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// What the page's script observed of one `fetch(url, init)`: see `probe` in page.html.
async fn probe(tab: &Tab<'_>, url: &str, init: Value, read: &[&str]) -> anyhow::Result<Value> {
    tab.eval(&format!("probe({}, {}, {})", json!(url), init, json!(read)))
        .await
        .with_context(|| format!("probe {url}"))
}

/// The fetch resolved; returns its body.
fn resolved(p: &Value) -> anyhow::Result<&str> {
    ensure!(
        p["resolved"] == true,
        "fetch rejected, expected it to resolve: {p}"
    );
    ensure!(
        p["status"] == 200,
        "status {}, expected 200: {p}",
        p["status"]
    );
    p["body"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no body: {p}"))
}

/// The fetch rejected with a TypeError (what CORS and network failures give, unlike the
/// TimeoutError of a hung request), and nothing of the response reached the script. Callers
/// check the cause separately.
fn rejected(p: &Value) -> anyhow::Result<()> {
    ensure!(
        p["resolved"] == false,
        "fetch resolved, expected the browser to block it: {p}"
    );
    ensure!(
        p["error"]["name"] == "TypeError",
        "fetch failed with {}, expected a TypeError: {p}",
        p["error"]
    );
    ensure!(
        p.get("body").is_none() && p.get("status").is_none(),
        "the page saw part of the response: {p}"
    );
    Ok(())
}

/// Chromium reported `error` (a DevTools `CorsError` name) for a request to `url`: the
/// rejection has the CORS cause the case means, not a network failure.
async fn expect_cors_error(tab: &Tab<'_>, error: &str, url: &str) -> anyhow::Result<()> {
    let errors = tab.wait_cors_errors(1, ISSUE_WAIT).await;
    let want = format!("{error} {url}");
    ensure!(
        errors.iter().any(|e| e == &want),
        "expected Chromium to report CORS error {want:?}, it reported {errors:?}"
    );
    Ok(())
}

/// The requests `app` received for paths starting with `prefix`.
fn app_saw(app: &Backend, prefix: &str) -> Vec<Seen> {
    app.requests()
        .into_iter()
        .filter(|s| s.path.starts_with(prefix))
        .collect()
}

fn header<'a>(seen: &'a Seen, name: &str) -> Option<&'a str> {
    seen.headers.get(name).and_then(|v| v.to_str().ok())
}

/// The preflights the agent answered as allowed on `rule`, from its Prometheus metrics (every
/// series of `cors_agent_requests_total` for that route with `cors="preflight_allowed"`).
async fn preflights_allowed(admin: SocketAddr, rule: &str) -> anyhow::Result<u64> {
    let reply = client::http1(admin, &Req::get("127.0.0.1", "/metrics")).await?;
    ensure!(reply.status == 200, "/metrics answered {}", reply.status);
    let text = String::from_utf8_lossy(&reply.body);
    let route = format!("route=\"browser/api/{rule}\"");
    let mut total = 0;
    for line in text.lines() {
        if line.starts_with("cors_agent_requests_total{")
            && line.contains(&route)
            && line.contains("cors=\"preflight_allowed\"")
        {
            let value = line.rsplit(' ').next().unwrap_or("");
            total += value
                .parse::<f64>()
                .with_context(|| format!("metric line {line:?}"))? as u64;
        }
    }
    Ok(total)
}

/// Waits (bounded) until the agent has counted `want` allowed preflights on `rule`, and fails
/// if it counts more. Metrics are recorded when a response ends, a moment after the browser
/// may have it.
async fn expect_preflights(admin: SocketAddr, rule: &str, want: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let n = preflights_allowed(admin, rule).await?;
        if n > want || (n < want && Instant::now() >= deadline) {
            bail!("the agent answered {n} preflights on {rule}, expected {want}");
        }
        if n == want {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The non-simple request of the preflight cases: PUT, a JSON body and a custom header.
fn json_put() -> Value {
    json!({
        "method": "PUT",
        "headers": {"Content-Type": "application/json", "X-Custom": "custom-value"},
        "body": "{\"hello\":\"world\"}",
    })
}

/// The cases every way into the agent must pass: allowed and denied origins, preflights
/// allowed and refused, credentials, and the preflight cache.
async fn core_cases(suite: &mut Suite<'_>, t: &Target<'_>) {
    let (label, page, api, admin, app) = (t.label, t.page.as_str(), t.api.as_str(), t.admin, t.app);

    suite
        .case(
            &format!("{label}: allowed origin reads the body and only exposed headers"),
            page,
            app,
            async |tab| {
                let read = ["x-exposed", "x-hidden"];
                let p = probe(tab, &format!("{api}/allowed/data"), json!({}), &read).await?;
                let body = resolved(&p)?;
                ensure!(body == "backend saw GET /allowed/data\n", "body {body:?}");
                ensure!(
                    p["headers"]["x-exposed"] == "exposed-value",
                    "the exposed header is not readable: {p}"
                );
                ensure!(
                    p["headers"]["x-hidden"].is_null(),
                    "an unexposed header is readable: {p}"
                );
                let seen = app_saw(app, "/allowed/data");
                ensure!(seen.len() == 1, "the app saw {} requests", seen.len());
                ensure!(
                    header(&seen[0], "origin") == Some(page),
                    "the app saw Origin {:?}, expected {page}",
                    header(&seen[0], "origin")
                );
                Ok(())
            },
        )
        .await;

    suite
        .case(
            &format!("{label}: denied origin gets a TypeError and none of the app's data"),
            page,
            app,
            async |tab| {
                let url = format!("{api}/denied/data");
                let p = probe(tab, &url, json!({}), &["x-exposed"]).await?;
                rejected(&p)?;
                // A simple GET is sent: the app answered, the browser withheld the answer.
                ensure!(
                    app_saw(app, "/denied/data").len() == 1,
                    "the request never reached the app, so the rejection proves nothing"
                );
                expect_cors_error(tab, "MissingAllowOriginHeader", &url).await
            },
        )
        .await;

    suite
        .case(
            &format!("{label}: preflighted PUT with JSON and a custom header, allowed"),
            page,
            app,
            async |tab| {
                let before = preflights_allowed(admin, "put-allowed").await?;
                let p = probe(tab, &format!("{api}/put-allowed/x"), json_put(), &[]).await?;
                let body = resolved(&p)?;
                ensure!(body == "backend saw PUT /put-allowed/x\n", "body {body:?}");
                let seen = app_saw(app, "/put-allowed");
                let methods: Vec<&str> = seen.iter().map(|s| s.method.as_str()).collect();
                // The agent answers the preflight itself; the app sees the PUT only.
                ensure!(
                    methods == ["PUT"],
                    "the app saw {methods:?}, expected [PUT]"
                );
                ensure!(
                    header(&seen[0], "x-custom") == Some("custom-value")
                        && header(&seen[0], "content-type") == Some("application/json"),
                    "the PUT lost its headers: {:?}",
                    seen[0].headers
                );
                expect_preflights(admin, "put-allowed", before + 1).await
            },
        )
        .await;

    for (rule, lacks, error) in [
        (
            "put-method-refused",
            "the method",
            "MethodDisallowedByPreflightResponse",
        ),
        (
            "put-header-refused",
            "the header",
            "HeaderDisallowedByPreflightResponse",
        ),
    ] {
        suite
            .case(
                &format!("{label}: preflighted PUT refused when the policy lacks {lacks}"),
                page,
                app,
                async |tab| {
                    let before = preflights_allowed(admin, rule).await?;
                    let url = format!("{api}/{rule}/x");
                    let p = probe(tab, &url, json_put(), &[]).await?;
                    rejected(&p)?;
                    ensure!(
                        app_saw(app, &format!("/{rule}")).is_empty(),
                        "the PUT reached the app"
                    );
                    // The agent did answer the preflight (the origin is allowed); the browser
                    // refused what the answer allowed.
                    expect_preflights(admin, rule, before + 1).await?;
                    expect_cors_error(tab, error, &url).await
                },
            )
            .await;
    }

    suite
        .case(
            &format!("{label}: credentials: 'include' works with allowCredentials: true"),
            page,
            app,
            async |tab| {
                tab.set_cookie(api, "session", "cookie-value").await?;
                let url = format!("{api}/credentials/me");
                let p = probe(tab, &url, json!({"credentials": "include"}), &[]).await?;
                let body = resolved(&p)?;
                ensure!(body == "backend saw GET /credentials/me\n", "body {body:?}");
                let seen = app_saw(app, "/credentials/me");
                ensure!(
                    seen.len() == 1 && header(&seen[0], "cookie") == Some("session=cookie-value"),
                    "the app did not get the cookie: {:?}",
                    seen.iter().map(|s| &s.headers).collect::<Vec<_>>()
                );
                Ok(())
            },
        )
        .await;

    suite
        .case(
            &format!("{label}: credentials: 'include' fails without allowCredentials"),
            page,
            app,
            async |tab| {
                tab.set_cookie(api, "session", "cookie-value").await?;
                // The same request without credentials works: what fails below is the
                // credentials mode alone.
                let url = format!("{api}/no-credentials/me");
                resolved(&probe(tab, &url, json!({"credentials": "omit"}), &[]).await?)?;
                let p = probe(tab, &url, json!({"credentials": "include"}), &[]).await?;
                rejected(&p)?;
                let seen = app_saw(app, "/no-credentials/me");
                ensure!(
                    seen.len() == 2 && header(&seen[1], "cookie") == Some("session=cookie-value"),
                    "expected the app to get both requests, the second with the cookie"
                );
                // Chromium's name for "no `Access-Control-Allow-Credentials: true`".
                expect_cors_error(tab, "InvalidAllowCredentials", &url).await
            },
        )
        .await;

    suite
        .case(
            &format!("{label}: maxAge caches the preflight; a second PUT sends none"),
            page,
            app,
            async |tab| {
                let url = format!("{api}/cached/x");
                let before = preflights_allowed(admin, "cached").await?;
                resolved(&probe(tab, &url, json_put(), &[]).await?)?;
                expect_preflights(admin, "cached", before + 1).await?;
                resolved(&probe(tab, &url, json_put(), &[]).await?)?;
                ensure!(
                    app_saw(app, "/cached").len() == 2,
                    "the app did not get both PUTs"
                );
                expect_preflights(admin, "cached", before + 1).await?;

                // The counter does see a second preflight once the cache entry is gone
                // (maxAge: 1), so the count above is the cache at work.
                let url = format!("{api}/short-lived/x");
                let before = preflights_allowed(admin, "short-lived").await?;
                resolved(&probe(tab, &url, json_put(), &[]).await?)?;
                tokio::time::sleep(Duration::from_millis(1500)).await;
                resolved(&probe(tab, &url, json_put(), &[]).await?)?;
                expect_preflights(admin, "short-lived", before + 2).await
            },
        )
        .await;
}

/// `cors-agent proxy`: the core cases over HTTP and HTTPS, wildcard subdomain origins, and a
/// check that Chromium really validates the agent's certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_obeys_the_policies_cors_agent_proxy_enforces() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let page_leaf = ca.issue(&PAGE_NAMES);
    let (page_cert, page_key) = (page_leaf.cert_pem, page_leaf.key_pem);
    let (page_ip, _https_pages) = bind_https_pages(server_tls(&page_cert, &page_key).unwrap());
    let http_page_server =
        PageServer::start(SocketAddr::from((page_ip, 0)), PAGE_HTML, None).unwrap();
    let http_page = format!("http://page.example.test:{}", http_page_server.addr.port());
    let https_page = "https://page.example.test".to_string();

    let app = Backend::start(app_reply()).await;
    let resources = write_policy(dir.path(), &http_page, &https_page);
    let api_leaf = ca.issue(&["api.example.test"]);
    let (api_cert, api_key) = (api_leaf.cert_pem, api_leaf.key_pem);
    std::fs::write(dir.path().join("api.pem"), &api_cert).unwrap();
    std::fs::write(dir.path().join("api-key.pem"), &api_key).unwrap();
    let http_api = AgentBuilder::new(app.addr, &resources)
        .admin()
        .spawn()
        .unwrap();
    let https_api = AgentBuilder::new(app.addr, &resources)
        .tls(dir.path().join("api.pem"), dir.path().join("api-key.pem"))
        .admin()
        .spawn()
        .unwrap();

    // 127.0.0.1 itself is left alone: one case calls the API by address.
    let rules = format!(
        "MAP api.example.test 127.0.0.1, MAP *.test {page_ip}, MAP * ~NOTFOUND, \
         EXCLUDE 127.0.0.1"
    );
    let chromium = Chromium::launch(Launch {
        host_rules: &rules,
        trust_ca_pem: Some(&ca.pem),
        netns: None,
    })
    .await
    .unwrap();
    println!(
        "browser: {} (ready in {:.1?})",
        chromium.version().await.unwrap_or_default(),
        started.elapsed()
    );

    let mut suite = Suite::new(&chromium);
    let targets = [
        Target {
            label: "proxy, http",
            page: http_page.clone(),
            api: format!("http://api.example.test:{}", http_api.addr().port()),
            admin: http_api.admin_addr(),
            app: &app,
        },
        Target {
            label: "proxy, https",
            page: https_page.clone(),
            api: format!("https://api.example.test:{}", https_api.addr().port()),
            admin: https_api.admin_addr(),
            app: &app,
        },
    ];
    for t in &targets {
        core_cases(&mut suite, t).await;
    }

    // Wildcard subdomains: the policy says `https://*.example.test` (port 443 implied), the
    // pages are served over HTTPS on 443, and the browser sends `Origin` without a port.
    let api = &targets[1].api;
    for (page, allowed) in [
        ("https://page.example.test", true),
        ("https://a.b.example.test", true),
        ("https://example.test", false),
        ("https://notexample.test", false),
        ("https://example.test.evil.test", false),
        (http_page.as_str(), false),
    ] {
        let verdict = if allowed { "allowed" } else { "refused" };
        suite
            .case(
                &format!("proxy, https: https://*.example.test, origin {page} {verdict}"),
                page,
                &app,
                async |tab| {
                    let url = format!("{api}/wildcard/x");
                    let p = probe(tab, &url, json!({}), &[]).await?;
                    if allowed {
                        resolved(&p)?;
                    } else {
                        rejected(&p)?;
                        expect_cors_error(tab, "MissingAllowOriginHeader", &url).await?;
                    }
                    // Either way the request reached the app with the page's origin.
                    let seen = app_saw(&app, "/wildcard/x");
                    ensure!(
                        seen.len() == 1 && header(&seen[0], "origin") == Some(page),
                        "expected the app to get one request from {page}, it got {:?}",
                        seen.iter().map(|s| header(s, "origin")).collect::<Vec<_>>()
                    );
                    Ok(())
                },
            )
            .await;
    }

    // The harness itself: TLS is validated, not waved through. The agent's certificate does
    // not name 127.0.0.1, so the same API by address must fail the handshake.
    let by_address = format!("https://127.0.0.1:{}/allowed/x", https_api.addr().port());
    suite
        .case(
            "proxy, https: a certificate that does not name the host is refused",
            &https_page,
            &app,
            async |tab| {
                let p = probe(tab, &by_address, json!({}), &[]).await?;
                rejected(&p)?;
                ensure!(
                    app_saw(&app, "/allowed").is_empty(),
                    "the request reached the app"
                );
                let console = tab.console().join("\n");
                ensure!(
                    console.contains("ERR_CERT_COMMON_NAME_INVALID"),
                    "expected a certificate name error in the console"
                );
                Ok(())
            },
        )
        .await;

    suite.finish(&[
        ("agent (http)", http_api.log()),
        ("agent (https)", https_api.log()),
        ("chromium", chromium.log()),
    ]);
    println!("browser suite (proxy) took {:.1?}", started.elapsed());
}

/// How long the steered-pod test may take as a whole (namespaces, agent, browser, cases).
const NODE_TEST_TIMEOUT: Duration = Duration::from_secs(240);

/// `cors-agent node`: the core cases over HTTP and HTTPS against a pod whose ports the agent
/// steers to itself with eBPF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_obeys_the_policies_through_a_steered_pod() {
    require_root();
    tokio::time::timeout(NODE_TEST_TIMEOUT, steered_pod())
        .await
        .expect("the steered-pod browser test timed out");
}

async fn steered_pod() {
    let started = Instant::now();
    let cluster = Cluster::new(&["api"]).expect("cluster");
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();

    // The pages live on the client namespace's loopback, where Chromium runs: HTTPS on 443
    // (the namespace is the test's own, so nothing else is there) and HTTP on any port.
    let client_ns = cluster.client().netns_path();
    let ns = NetNs::open(&client_ns).unwrap();
    let page_leaf = ca.issue(&PAGE_NAMES);
    let (page_cert, page_key) = (page_leaf.cert_pem, page_leaf.key_pem);
    let https_listener = ns.run(|| TcpListener::bind("127.0.0.1:443")).unwrap();
    let http_listener = ns.run(|| TcpListener::bind("127.0.0.1:0")).unwrap();
    let _https_pages = PageServer::serve(
        https_listener,
        PAGE_HTML,
        Some(server_tls(&page_cert, &page_key).unwrap()),
    )
    .unwrap();
    let http_pages = PageServer::serve(http_listener, PAGE_HTML, None).unwrap();
    let http_page = format!("http://page.example.test:{}", http_pages.addr.port());
    let https_page = "https://page.example.test".to_string();

    // The app listens in the pod on both ports; the agent terminates TLS on 8443 and passes
    // plain HTTP on to the app's same port, as for a real pod.
    let app = cluster.start_app("api", 8080, app_reply()).unwrap();
    let app_tls = cluster.start_app("api", 8443, app_reply()).unwrap();
    let resources = write_policy(dir.path(), &http_page, &https_page);
    let api_leaf = ca.issue(&["api.example.test"]);
    let (api_cert, api_key) = (api_leaf.cert_pem, api_leaf.key_pem);
    let (cert, key) = (dir.path().join("api.pem"), dir.path().join("api-key.pem"));
    std::fs::write(&cert, &api_cert).unwrap();
    std::fs::write(&key, &api_key).unwrap();
    let config = NodeConfig {
        resources: vec![resources],
        pods: vec![PodEntry::new(
            &cluster,
            "api",
            vec![
                PortEntry::new(8080).service("app:8000"),
                PortEntry::new(8443).service("app:8000").tls(cert, key),
            ],
        )],
        ..Default::default()
    };
    let config_path = dir.path().join("node.yaml");
    config.write(&config_path);
    let agent = NodeAgent::start(&config_path).unwrap();

    let pod = cluster.pod("api").v4;
    let rules = format!("MAP api.example.test {pod}, MAP *.test 127.0.0.1, MAP * ~NOTFOUND");
    let chromium = Chromium::launch(Launch {
        host_rules: &rules,
        trust_ca_pem: Some(&ca.pem),
        netns: Some(&client_ns),
    })
    .await
    .unwrap();
    println!(
        "browser: {} in {} (ready in {:.1?})",
        chromium.version().await.unwrap_or_default(),
        cluster.client().ns,
        started.elapsed()
    );

    let mut suite = Suite::new(&chromium);
    let targets = [
        Target {
            label: "steered pod, http",
            page: http_page.clone(),
            api: "http://api.example.test:8080".into(),
            admin: agent.admin_addr(),
            app: &app,
        },
        Target {
            label: "steered pod, https",
            page: https_page.clone(),
            api: "https://api.example.test:8443".into(),
            admin: agent.admin_addr(),
            app: &app_tls,
        },
    ];
    for t in &targets {
        core_cases(&mut suite, t).await;
    }
    suite.finish(&[("node agent", agent.log()), ("chromium", chromium.log())]);
    println!("browser suite (steered pod) took {:.1?}", started.elapsed());
}
