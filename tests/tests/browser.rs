//! The browser suite: CORS is enforced by browsers, so Debian's Chromium (headless) loads a
//! page from one origin and calls an app behind `cors-agent proxy` on another, and each case
//! asserts what the page's own script could and could not do (`browser/page.html`'s `probe`).
//!
//! Layout (every address is loopback; Chromium resolves the names with
//! `--host-resolver-rules`):
//! - `api.example.test` -> 127.0.0.1: two agents in front of one recording app, one over plain
//!   HTTP and one over TLS with a certificate from a test CA;
//! - every other `*.test` name -> a random 127.x.y.z: the page origins, `http://…:PORT` and
//!   `https://…` on port 443, so that the policy can name `https://*.example.test` exactly as
//!   a user would (the browser sends no port in `Origin` for 443). Binding 443 needs root,
//!   which the end-to-end suites need anyway.
//!
//! Chromium trusts the test CA through an NSS database in its (temporary) home, so TLS is
//! validated for real: no certificate error is ignored, and one case checks that a name the
//! certificate does not carry is refused.
//!
//! The app answers every request with `Access-Control-Allow-Origin: *` of its own: had the
//! agent let it through, the "denied" cases would succeed, so they also prove that the policy
//! is authoritative.
//!
//! One Chromium serves every case; each case gets a fresh browser context (own cookies and
//! preflight cache). A failed case prints what the browser itself logged (the "blocked by CORS
//! policy" console messages and the DevTools CORS errors), and the suite goes on to the next case.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::{Value, json};

use cors_agent_tests::agent::{Agent, AgentBuilder, write_resources};
use cors_agent_tests::backend::{Backend, Reply, Seen};
use cors_agent_tests::browser::{BrowserCa, Chromium, Launch, PageServer, Tab, server_tls};
use cors_agent_tests::client::{self, Req};

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

/// Where the pages and the API live, and everything that runs them.
struct World {
    backend: Backend,
    http_api: Agent,
    https_api: Agent,
    http_page: String,
    https_page: String,
    chromium: Chromium,
    _pages: Vec<PageServer>,
    _dir: tempfile::TempDir,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Scheme {
    Http,
    Https,
}

impl World {
    async fn start() -> World {
        let dir = tempfile::tempdir().unwrap();
        let ca = BrowserCa::new();
        let page_names = [
            "page.example.test",
            "a.b.example.test",
            "example.test",
            "notexample.test",
            "example.test.evil.test",
        ];
        let (page_cert, page_key) = ca.issue(&page_names);
        let page_tls = server_tls(&page_cert, &page_key).unwrap();
        let (page_ip, https_page_server) = bind_https_pages(page_tls).await;
        let http_page_server = PageServer::start(SocketAddr::from((page_ip, 0)), PAGE_HTML, None)
            .await
            .unwrap();
        let http_page = format!("http://page.example.test:{}", http_page_server.addr.port());
        let https_page = "https://page.example.test".to_string();

        let backend = Backend::start(Reply {
            status: None,
            headers: vec![
                ("X-Exposed".into(), "exposed-value".into()),
                ("X-Hidden".into(), "hidden-value".into()),
                // The app's own, permissive CORS header: the agent must replace it.
                ("Access-Control-Allow-Origin".into(), "*".into()),
                ("Content-Type".into(), "text/plain".into()),
            ],
        })
        .await;
        let policy = POLICY.replace("{PAGES}", &format!("\"{http_page}\", \"{https_page}\""));
        let resources = write_resources(dir.path(), "policy.yaml", &policy);
        let (api_cert, api_key) = ca.issue(&["api.example.test"]);
        std::fs::write(dir.path().join("api.pem"), &api_cert).unwrap();
        std::fs::write(dir.path().join("api-key.pem"), &api_key).unwrap();
        let http_api = AgentBuilder::new(backend.addr, &resources)
            .admin()
            .spawn()
            .unwrap();
        let https_api = AgentBuilder::new(backend.addr, &resources)
            .tls(dir.path().join("api.pem"), dir.path().join("api-key.pem"))
            .admin()
            .spawn()
            .unwrap();

        let rules = format!(
            "MAP api.example.test 127.0.0.1, MAP *.test {page_ip}, MAP * ~NOTFOUND, \
             EXCLUDE 127.0.0.1"
        );
        let chromium = Chromium::launch(Launch {
            host_rules: &rules,
            trust_ca_pem: Some(&ca.pem),
        })
        .await
        .unwrap();
        World {
            backend,
            http_api,
            https_api,
            http_page,
            https_page,
            chromium,
            _pages: vec![http_page_server, https_page_server],
            _dir: dir,
        }
    }

    fn page(&self, scheme: Scheme) -> &str {
        match scheme {
            Scheme::Http => &self.http_page,
            Scheme::Https => &self.https_page,
        }
    }

    fn agent(&self, scheme: Scheme) -> &Agent {
        match scheme {
            Scheme::Http => &self.http_api,
            Scheme::Https => &self.https_api,
        }
    }

    /// The API origin for `scheme`, e.g. `http://api.example.test:41234`.
    fn api(&self, scheme: Scheme) -> String {
        match scheme {
            Scheme::Http => format!("http://api.example.test:{}", self.http_api.addr().port()),
            Scheme::Https => format!("https://api.example.test:{}", self.https_api.addr().port()),
        }
    }
}

/// The HTTPS page server on port 443 of a random 127.x.y.z (so parallel runs and anything
/// else on 127.0.0.1:443 do not collide).
async fn bind_https_pages(tls: std::sync::Arc<rustls::ServerConfig>) -> (Ipv4Addr, PageServer) {
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
        match PageServer::start(SocketAddr::from((ip, 443)), PAGE_HTML, Some(tls.clone())).await {
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
struct Suite<'w> {
    w: &'w World,
    passed: usize,
    failures: Vec<String>,
}

impl<'w> Suite<'w> {
    /// Opens `page` in a fresh tab, runs `body` against it, and records the outcome.
    async fn case(
        &mut self,
        name: &str,
        page: &str,
        body: impl AsyncFnOnce(&Tab<'_>) -> anyhow::Result<()>,
    ) {
        let started = Instant::now();
        self.w.backend.take_requests();
        let run = async {
            let tab = self.w.chromium.new_tab().await?;
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

    fn finish(self) {
        let failed = self.failures.len();
        println!("browser cases: {} passed, {failed} failed", self.passed);
        if failed > 0 {
            panic!(
                "{failed} browser case(s) failed:\n\n{}\n\nagent (http) log tail:\n{}\n\nagent \
                 (https) log tail:\n{}",
                self.failures.join("\n\n"),
                tail(&self.w.http_api.log(), 30),
                tail(&self.w.https_api.log(), 30)
            );
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

/// The fetch rejected with the TypeError a CORS failure gives (not a timeout), and nothing of
/// the response reached the script.
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

/// The requests the app received for paths starting with `prefix`.
fn app_saw(w: &World, prefix: &str) -> Vec<Seen> {
    w.backend
        .requests()
        .into_iter()
        .filter(|s| s.path.starts_with(prefix))
        .collect()
}

fn header<'a>(seen: &'a Seen, name: &str) -> Option<&'a str> {
    seen.headers.get(name).and_then(|v| v.to_str().ok())
}

/// The preflights the agent answered as allowed on `rule`, from its Prometheus metrics.
async fn preflights_allowed(agent: &Agent, rule: &str) -> anyhow::Result<u64> {
    let reply = client::http1(agent.admin_addr(), &Req::get("127.0.0.1", "/metrics")).await?;
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

/// Waits (bounded) until the agent has counted `want` allowed preflights on `rule`, then
/// checks the count is exactly that. Metrics are recorded when a response ends, a moment
/// after the browser may have it.
async fn expect_preflights(agent: &Agent, rule: &str, want: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let n = preflights_allowed(agent, rule).await?;
        if n > want {
            bail!("the agent answered {n} preflights on {rule}, expected {want}");
        }
        if n == want {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("the agent answered {n} preflights on {rule}, expected {want}");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_obeys_the_policies_cors_agent_proxy_enforces() {
    let started = Instant::now();
    let w = World::start().await;
    println!(
        "browser: {} (started in {:.1?})",
        w.chromium.version().await.unwrap_or_default(),
        started.elapsed()
    );
    let mut suite = Suite {
        w: &w,
        passed: 0,
        failures: Vec::new(),
    };

    for scheme in [Scheme::Http, Scheme::Https] {
        let page = w.page(scheme).to_string();
        let api = w.api(scheme);
        let agent = w.agent(scheme);
        let s = format!("{scheme:?}").to_lowercase();

        suite
            .case(
                &format!("{s}: allowed origin reads the body and only exposed headers"),
                &page,
                async |tab| {
                    let p = probe(
                        tab,
                        &format!("{api}/allowed/data"),
                        json!({}),
                        &["x-exposed", "x-hidden"],
                    )
                    .await?;
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
                    let seen = app_saw(&w, "/allowed/data");
                    ensure!(seen.len() == 1, "the app saw {} requests", seen.len());
                    ensure!(
                        header(&seen[0], "origin") == Some(page.as_str()),
                        "the app saw Origin {:?}, expected {page}",
                        header(&seen[0], "origin")
                    );
                    Ok(())
                },
            )
            .await;

        suite
            .case(
                &format!("{s}: denied origin gets a TypeError and none of the app's data"),
                &page,
                async |tab| {
                    let url = format!("{api}/denied/data");
                    let p = probe(tab, &url, json!({}), &["x-exposed"]).await?;
                    rejected(&p)?;
                    // A simple GET is sent: the app answered, the browser withheld it.
                    ensure!(
                        app_saw(&w, "/denied/data").len() == 1,
                        "the request never reached the app, so the rejection proves nothing"
                    );
                    expect_cors_error(tab, "MissingAllowOriginHeader", &url).await
                },
            )
            .await;

        suite
            .case(
                &format!("{s}: preflighted PUT with JSON and a custom header, allowed"),
                &page,
                async |tab| {
                    let before = preflights_allowed(agent, "put-allowed").await?;
                    let p = probe(tab, &format!("{api}/put-allowed/x"), json_put(), &[]).await?;
                    let body = resolved(&p)?;
                    ensure!(body == "backend saw PUT /put-allowed/x\n", "body {body:?}");
                    let seen = app_saw(&w, "/put-allowed");
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
                    expect_preflights(agent, "put-allowed", before + 1).await
                },
            )
            .await;

        suite
            .case(
                &format!("{s}: preflighted PUT refused when the policy lacks the method"),
                &page,
                async |tab| {
                    let before = preflights_allowed(agent, "put-method-refused").await?;
                    let url = format!("{api}/put-method-refused/x");
                    let p = probe(tab, &url, json_put(), &[]).await?;
                    rejected(&p)?;
                    ensure!(
                        app_saw(&w, "/put-method-refused").is_empty(),
                        "the PUT reached the app"
                    );
                    expect_preflights(agent, "put-method-refused", before + 1).await?;
                    expect_cors_error(tab, "MethodDisallowedByPreflightResponse", &url).await
                },
            )
            .await;

        suite
            .case(
                &format!("{s}: preflighted PUT refused when the policy lacks the header"),
                &page,
                async |tab| {
                    let before = preflights_allowed(agent, "put-header-refused").await?;
                    let url = format!("{api}/put-header-refused/x");
                    let p = probe(tab, &url, json_put(), &[]).await?;
                    rejected(&p)?;
                    ensure!(
                        app_saw(&w, "/put-header-refused").is_empty(),
                        "the PUT reached the app"
                    );
                    expect_preflights(agent, "put-header-refused", before + 1).await?;
                    expect_cors_error(tab, "HeaderDisallowedByPreflightResponse", &url).await
                },
            )
            .await;

        suite
            .case(
                &format!("{s}: credentials: 'include' works with allowCredentials: true"),
                &page,
                async |tab| {
                    tab.set_cookie(&api, "session", "cookie-value").await?;
                    let p = probe(
                        tab,
                        &format!("{api}/credentials/me"),
                        json!({"credentials": "include"}),
                        &[],
                    )
                    .await?;
                    let body = resolved(&p)?;
                    ensure!(body == "backend saw GET /credentials/me\n", "body {body:?}");
                    let seen = app_saw(&w, "/credentials/me");
                    ensure!(
                        seen.len() == 1
                            && header(&seen[0], "cookie") == Some("session=cookie-value"),
                        "the app did not get the cookie: {:?}",
                        seen.iter().map(|s| &s.headers).collect::<Vec<_>>()
                    );
                    Ok(())
                },
            )
            .await;

        suite
            .case(
                &format!("{s}: credentials: 'include' fails without allowCredentials"),
                &page,
                async |tab| {
                    tab.set_cookie(&api, "session", "cookie-value").await?;
                    // The same request without credentials works: what fails below is the
                    // credentials mode alone.
                    let url = format!("{api}/no-credentials/me");
                    resolved(&probe(tab, &url, json!({"credentials": "omit"}), &[]).await?)?;
                    let p = probe(tab, &url, json!({"credentials": "include"}), &[]).await?;
                    rejected(&p)?;
                    let seen = app_saw(&w, "/no-credentials/me");
                    ensure!(
                        seen.len() == 2
                            && header(&seen[1], "cookie") == Some("session=cookie-value"),
                        "expected the app to get both requests, the second with the cookie"
                    );
                    expect_cors_error(tab, "InvalidAllowCredentials", &url).await
                },
            )
            .await;

        suite
            .case(
                &format!("{s}: maxAge caches the preflight; a second PUT sends none"),
                &page,
                async |tab| {
                    let url = format!("{api}/cached/x");
                    let before = preflights_allowed(agent, "cached").await?;
                    resolved(&probe(tab, &url, json_put(), &[]).await?)?;
                    expect_preflights(agent, "cached", before + 1).await?;
                    resolved(&probe(tab, &url, json_put(), &[]).await?)?;
                    ensure!(
                        app_saw(&w, "/cached").len() == 2,
                        "the app did not get both PUTs"
                    );
                    expect_preflights(agent, "cached", before + 1).await?;

                    // The counter does see a second preflight once the cache entry is gone
                    // (maxAge: 1), so the count above is the cache at work.
                    let url = format!("{api}/short-lived/x");
                    let before = preflights_allowed(agent, "short-lived").await?;
                    resolved(&probe(tab, &url, json_put(), &[]).await?)?;
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    resolved(&probe(tab, &url, json_put(), &[]).await?)?;
                    expect_preflights(agent, "short-lived", before + 2).await
                },
            )
            .await;
    }

    // Wildcard subdomains: the policy says `https://*.example.test` (port 443 implied), the
    // pages are served over HTTPS on 443, and the browser sends `Origin` without a port.
    let api = w.api(Scheme::Https);
    for (page, allowed) in [
        ("https://page.example.test", true),
        ("https://a.b.example.test", true),
        ("https://example.test", false),
        ("https://notexample.test", false),
        ("https://example.test.evil.test", false),
        (w.http_page.as_str(), false),
    ] {
        let verdict = if allowed { "allowed" } else { "refused" };
        suite
            .case(
                &format!("https: https://*.example.test, origin {page} {verdict}"),
                page,
                async |tab| {
                    let url = format!("{api}/wildcard/x");
                    let p = probe(tab, &url, json!({}), &[]).await?;
                    if allowed {
                        resolved(&p)?;
                    } else {
                        rejected(&p)?;
                        ensure!(
                            app_saw(&w, "/wildcard/x").len() == 1,
                            "the request never reached the app"
                        );
                        expect_cors_error(tab, "MissingAllowOriginHeader", &url).await?;
                    }
                    let seen = app_saw(&w, "/wildcard/x");
                    ensure!(
                        seen.first().and_then(|s| header(s, "origin")) == Some(page),
                        "the app saw Origin {:?}",
                        seen.first().and_then(|s| header(s, "origin"))
                    );
                    Ok(())
                },
            )
            .await;
    }

    // The harness itself: TLS is validated, not waved through. The agent's certificate does
    // not name 127.0.0.1, so the same API by address must fail the handshake.
    let by_address = format!("https://127.0.0.1:{}/allowed/x", w.https_api.addr().port());
    suite
        .case(
            "https: a certificate that does not name the host is refused",
            &w.https_page,
            async |tab| {
                let p = probe(tab, &by_address, json!({}), &[]).await?;
                rejected(&p)?;
                ensure!(
                    app_saw(&w, "/allowed").is_empty(),
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

    suite.finish();
    println!("browser suite took {:.1?}", started.elapsed());
}
