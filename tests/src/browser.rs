//! Headless Chromium for the browser suite, driven over the DevTools protocol (CDP), plus the
//! small pieces around it: a static page server (the page origin) and a certificate authority
//! that Chromium trusts through an NSS database.
//!
//! Why a hand-written CDP client: the suite needs a dozen commands (open an isolated browser
//! context, navigate, evaluate a promise, set a cookie, collect console messages and CORS
//! errors). Speaking them over the WebSocket client the suites already use (tokio-tungstenite)
//! needs no Node, no `npm install` at test time and no crate of generated protocol bindings
//! that must keep up with whatever Chromium Debian ships; the commands used here have been
//! stable in the protocol for years.
//!
//! Everything stays on loopback: `--host-resolver-rules` maps the test host names to
//! loopback addresses and every other name to "not found", and the background-networking
//! flags stop Chromium's own calls home.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use cors_agent::steer::NetNs;
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Debian's Chromium (`apt-get install chromium`); never a downloaded browser build.
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// How long Chromium may take to start and open its DevTools port (cold caches, 2 cores).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Every DevTools command gets an answer within this, or the call fails.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// A navigation must have loaded the page within this.
const LOAD_TIMEOUT: Duration = Duration::from_secs(15);

/// What to start Chromium with.
pub struct Launch<'a> {
    /// `--host-resolver-rules`, e.g. `MAP *.example.test 127.0.0.1, MAP * ~NOTFOUND`.
    pub host_rules: &'a str,
    /// A CA (PEM) to trust for TLS server certificates, added to the profile's NSS database.
    pub trust_ca_pem: Option<&'a str>,
    /// A network namespace (e.g. `/var/run/netns/NAME`) to run Chromium in, for pages that
    /// must reach addresses that exist only there. `None`: the test's own namespace.
    pub netns: Option<&'a Path>,
}

/// A running headless Chromium. Its whole process group is killed on drop.
pub struct Chromium {
    child: Child,
    cdp: Cdp,
    log: PathBuf,
    _profile: tempfile::TempDir,
}

impl Chromium {
    pub async fn launch(opts: Launch<'_>) -> anyhow::Result<Chromium> {
        if !Path::new(CHROMIUM).exists() {
            bail!(
                "{CHROMIUM} is missing: install Debian's chromium and libnss3-tools \
                 (`apt-get install -y chromium libnss3-tools`, as `cargo xtask ci` does)"
            );
        }
        let profile = tempfile::tempdir()?;
        let home = profile.path().join("home");
        let data = profile.path().join("data");
        std::fs::create_dir_all(&home)?;
        std::fs::create_dir_all(&data)?;
        if let Some(pem) = opts.trust_ca_pem {
            trust_ca(&home, pem)?;
        }
        let log = profile.path().join("chromium.log");
        let mut cmd = match opts.netns {
            None => Command::new(CHROMIUM),
            Some(ns) => {
                // nsenter (util-linux) enters the namespace and execs Chromium, so the pid
                // (and process group) is still Chromium's.
                let mut cmd = Command::new("nsenter");
                cmd.arg(format!("--net={}", ns.display()))
                    .arg("--")
                    .arg(CHROMIUM);
                cmd
            }
        };
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--disable-default-apps",
            // Navigations to http:// would otherwise be tried over https:// first; the page
            // origin must be exactly the one the test serves.
            "--disable-features=HttpsUpgrades,HttpsFirstBalancedModeAutoEnable",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--host-resolver-rules={}", opts.host_rules))
        .arg(format!("--user-data-dir={}", data.display()))
        .arg("about:blank")
        // Chromium (NSS) reads trusted CAs from $HOME/.pki/nssdb.
        .env("HOME", &home)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(profile.path().join("chromium.out"))?)
        .stderr(std::fs::File::create(&log)?)
        // Its own process group, so that drop can end the renderers and helpers too.
        .process_group(0);
        let mut child = cmd.spawn().context("start chromium")?;

        // Chromium writes the port it chose (and the browser's WebSocket path) here.
        let port_file = data.join("DevToolsActivePort");
        let deadline = Instant::now() + START_TIMEOUT;
        let endpoint = loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "chromium exited early ({status}); its log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if let Ok(text) = std::fs::read_to_string(&port_file) {
                let mut lines = text.lines();
                if let (Some(port), Some(path)) = (lines.next(), lines.next())
                    && let Ok(port) = port.parse::<u16>()
                {
                    break (port, format!("ws://127.0.0.1:{port}{path}"));
                }
            }
            if Instant::now() >= deadline {
                kill_group(&mut child);
                bail!(
                    "chromium opened no DevTools port within {START_TIMEOUT:?}; its log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let cdp = match Cdp::connect(endpoint, opts.netns).await {
            Ok(cdp) => cdp,
            Err(e) => {
                kill_group(&mut child);
                return Err(e);
            }
        };
        Ok(Chromium {
            child,
            cdp,
            log,
            _profile: profile,
        })
    }

    /// Chromium's own stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn version(&self) -> anyhow::Result<String> {
        let v = self.cdp.call(None, "Browser.getVersion", json!({})).await?;
        Ok(v["product"].as_str().unwrap_or("?").to_string())
    }

    /// A tab in a fresh browser context: its own cookies, HTTP cache and CORS preflight cache,
    /// so that no case sees what an earlier one left behind.
    pub async fn new_tab(&self) -> anyhow::Result<Tab<'_>> {
        let ctx = self
            .cdp
            .call(None, "Target.createBrowserContext", json!({}))
            .await?;
        let context = str_field(&ctx, "browserContextId")?;
        let target = self
            .cdp
            .call(
                None,
                "Target.createTarget",
                json!({"url": "about:blank", "browserContextId": context}),
            )
            .await?;
        let target = str_field(&target, "targetId")?;
        let attached = self
            .cdp
            .call(
                None,
                "Target.attachToTarget",
                json!({"targetId": target, "flatten": true}),
            )
            .await?;
        let session = str_field(&attached, "sessionId")?;
        let tab = Tab {
            cdp: &self.cdp,
            context,
            session,
        };
        // Console API calls, the browser's own messages (where "blocked by CORS policy"
        // appears), uncaught exceptions, and network events (failed requests carry the
        // structured CORS error).
        for domain in [
            "Runtime.enable",
            "Log.enable",
            "Network.enable",
            "Page.enable",
        ] {
            tab.call(domain, json!({})).await?;
        }
        Ok(tab)
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        kill_group(&mut self.child);
    }
}

/// Kills the process group Chromium leads (it was started with `process_group(0)`, so its
/// group id is its pid) and reaps the leader.
fn kill_group(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .stderr(Stdio::null())
        .status();
    let _ = child.kill();
    let _ = child.wait();
}

/// Creates `$HOME/.pki/nssdb` trusting `ca_pem` for TLS servers, as a user who imported the
/// CA would. Chromium then validates the servers' chains and names against it for real.
fn trust_ca(home: &Path, ca_pem: &str) -> anyhow::Result<()> {
    let db = home.join(".pki/nssdb");
    std::fs::create_dir_all(&db)?;
    let ca = home.join("test-ca.pem");
    std::fs::write(&ca, ca_pem)?;
    let db_arg = format!("sql:{}", db.display());
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new("certutil")
            .args(args)
            .output()
            .context("run certutil (Debian package libnss3-tools)")?;
        if !out.status.success() {
            bail!(
                "certutil {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    };
    run(&["-N", "-d", &db_arg, "--empty-password"])?;
    run(&[
        "-A",
        "-d",
        &db_arg,
        "-n",
        "cors-agent browser test CA",
        "-t",
        "C,,",
        "-a",
        "-i",
        &ca.display().to_string(),
    ])
}

fn str_field(v: &Value, key: &str) -> anyhow::Result<String> {
    v[key]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("DevTools answer without {key}: {v}"))
}

/// One page in its own browser context. Close it with [`Tab::close`].
pub struct Tab<'b> {
    cdp: &'b Cdp,
    context: String,
    session: String,
}

impl Tab<'_> {
    pub async fn call(&self, method: &str, params: Value) -> anyhow::Result<Value> {
        self.cdp.call(Some(&self.session), method, params).await
    }

    /// Navigates to `url` and waits until the page has loaded there and defined `ready_fn`
    /// (a global function its script declares), so the test knows it runs the page's script
    /// at the page's origin.
    pub async fn goto(&self, url: &str, ready_fn: &str) -> anyhow::Result<()> {
        let nav = self.call("Page.navigate", json!({"url": url})).await?;
        if let Some(err) = nav["errorText"].as_str().filter(|e| !e.is_empty()) {
            bail!("navigation to {url} failed: {err}");
        }
        let check = format!(
            "document.readyState === 'complete' && typeof {ready_fn} === 'function' \
             ? location.href : ''"
        );
        let deadline = Instant::now() + LOAD_TIMEOUT;
        loop {
            // Evaluating while the navigation commits may fail (context destroyed): retry.
            if let Ok(v) = self.eval(&check).await
                && v.as_str().is_some_and(|s| !s.is_empty())
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("{url} did not load within {LOAD_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Evaluates `expression` in the page (awaiting it if it is a promise) and returns its
    /// value as JSON. A thrown exception is an error.
    pub async fn eval(&self, expression: &str) -> anyhow::Result<Value> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({
                    "expression": expression,
                    "awaitPromise": true,
                    "returnByValue": true,
                }),
            )
            .await?;
        if let Some(ex) = r.get("exceptionDetails") {
            bail!(
                "the page threw: {}",
                ex["exception"]["description"]
                    .as_str()
                    .or(ex["text"].as_str())
                    .unwrap_or("?")
            );
        }
        Ok(r["result"]["value"].clone())
    }

    /// Sets a cookie in this tab's browser context, as if `url` had set it earlier.
    pub async fn set_cookie(&self, url: &str, name: &str, value: &str) -> anyhow::Result<()> {
        self.call(
            "Network.setCookie",
            json!({"url": url, "name": name, "value": value, "secure": url.starts_with("https:")}),
        )
        .await?;
        Ok(())
    }

    /// What the browser told the page's console, one line per message: console calls, the
    /// browser's own messages (CORS blocks among them), uncaught exceptions and CORS errors.
    pub fn console(&self) -> Vec<String> {
        self.cdp
            .events(&self.session)
            .iter()
            .filter_map(describe_event)
            .collect()
    }

    /// The CORS errors Chromium reported for failed requests (DevTools `Network.loadingFailed`
    /// with a `corsErrorStatus`), e.g. `MissingAllowOriginHeader http://api.example.test:1234/x`.
    pub fn cors_errors(&self) -> Vec<String> {
        let events = self.cdp.events(&self.session);
        let url_of = |id: &Value| {
            events
                .iter()
                .find(|e| {
                    e["method"] == "Network.requestWillBeSent" && &e["params"]["requestId"] == id
                })
                .and_then(|e| e["params"]["request"]["url"].as_str())
                .unwrap_or("?")
        };
        events
            .iter()
            .filter(|e| e["method"] == "Network.loadingFailed")
            .filter_map(|e| {
                let p = &e["params"];
                let error = p["corsErrorStatus"]["corsError"].as_str()?;
                Some(format!("{error} {}", url_of(&p["requestId"])))
            })
            .collect()
    }

    /// Waits (at most `within`) until Chromium has reported at least `n` CORS errors; the
    /// event may arrive a little after the rejected promise.
    pub async fn wait_cors_errors(&self, n: usize, within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        loop {
            let errors = self.cors_errors();
            if errors.len() >= n || Instant::now() >= deadline {
                return errors;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Closes the page and discards its browser context.
    pub async fn close(self) {
        let _ = self
            .cdp
            .call(
                None,
                "Target.disposeBrowserContext",
                json!({"browserContextId": self.context}),
            )
            .await;
        self.cdp.forget(&self.session);
    }
}

/// One line for a console-like event, or `None` for events that say nothing to a reader.
fn describe_event(e: &Value) -> Option<String> {
    let p = &e["params"];
    match e["method"].as_str()? {
        "Runtime.consoleAPICalled" => {
            let args: Vec<String> = p["args"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|v| match &v["value"] {
                            Value::String(s) => s.clone(),
                            Value::Null => v["description"].as_str().unwrap_or("").to_string(),
                            other => other.to_string(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            Some(format!(
                "console.{}: {}",
                p["type"].as_str().unwrap_or("log"),
                args.join(" ")
            ))
        }
        "Log.entryAdded" => {
            let entry = &p["entry"];
            Some(format!(
                "[{} {}] {}",
                entry["source"].as_str().unwrap_or("?"),
                entry["level"].as_str().unwrap_or("?"),
                entry["text"].as_str().unwrap_or("")
            ))
        }
        "Runtime.exceptionThrown" => {
            let d = &p["exceptionDetails"];
            Some(format!(
                "uncaught: {}",
                d["exception"]["description"]
                    .as_str()
                    .or(d["text"].as_str())
                    .unwrap_or("?")
            ))
        }
        "Network.loadingFailed" => {
            let status = &p["corsErrorStatus"];
            let error = status["corsError"].as_str()?;
            Some(format!(
                "[cors error] {error} (failed parameter {:?})",
                status["failedParameter"].as_str().unwrap_or("")
            ))
        }
        _ => None,
    }
}

type WsSink = SplitSink<WebSocketStream<MaybeTlsStream<TcpStream>>, Message>;

/// A DevTools connection: numbered calls, answers matched by id, events kept per session.
struct Cdp {
    sink: tokio::sync::Mutex<WsSink>,
    next_id: AtomicU64,
    shared: Arc<Shared>,
    reader: JoinHandle<()>,
}

#[derive(Default)]
struct Shared {
    pending: Mutex<HashMap<u64, oneshot::Sender<Value>>>,
    /// Events by session id ("" for browser-level events).
    events: Mutex<HashMap<String, Vec<Value>>>,
}

impl Drop for Cdp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Cdp {
    /// Connects to the browser endpoint `(port, ws://127.0.0.1:port/devtools/browser/…)` on
    /// the loopback of `netns` (the test's own namespace when `None`).
    async fn connect((port, url): (u16, String), netns: Option<&Path>) -> anyhow::Result<Cdp> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let tcp = match netns {
            None => std::net::TcpStream::connect_timeout(&addr, CALL_TIMEOUT),
            // A socket stays in the namespace it was made in, whichever thread uses it later.
            Some(ns) => {
                NetNs::open(ns)?.run(|| std::net::TcpStream::connect_timeout(&addr, CALL_TIMEOUT))
            }
        }
        .with_context(|| format!("connect to DevTools at {addr}"))?;
        tcp.set_nonblocking(true)?;
        let tcp = TcpStream::from_std(tcp)?;
        let (ws, _) = tokio::time::timeout(
            CALL_TIMEOUT,
            tokio_tungstenite::client_async(url.as_str(), MaybeTlsStream::Plain(tcp)),
        )
        .await
        .context("DevTools WebSocket handshake timed out")?
        .with_context(|| format!("DevTools WebSocket handshake with {url}"))?;
        let (sink, mut stream) = ws.split();
        let shared = Arc::new(Shared::default());
        let reader = {
            let shared = shared.clone();
            tokio::spawn(async move {
                while let Some(Ok(msg)) = stream.next().await {
                    let Message::Text(text) = msg else { continue };
                    let Ok(v) = serde_json::from_str::<Value>(&text) else {
                        continue;
                    };
                    if let Some(id) = v["id"].as_u64() {
                        if let Some(tx) = shared.pending.lock().unwrap().remove(&id) {
                            let _ = tx.send(v);
                        }
                    } else if v["method"].is_string() {
                        let session = v["sessionId"].as_str().unwrap_or("").to_string();
                        shared
                            .events
                            .lock()
                            .unwrap()
                            .entry(session)
                            .or_default()
                            .push(v);
                    }
                }
                // The browser went away: fail every waiting call now rather than at its
                // timeout.
                shared.pending.lock().unwrap().clear();
            })
        };
        Ok(Cdp {
            sink: tokio::sync::Mutex::new(sink),
            next_id: AtomicU64::new(1),
            shared,
            reader,
        })
    }

    async fn call(
        &self,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> anyhow::Result<Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let (tx, rx) = oneshot::channel();
        self.shared.pending.lock().unwrap().insert(id, tx);
        let sent = tokio::time::timeout(
            CALL_TIMEOUT,
            self.sink
                .lock()
                .await
                .send(Message::Text(msg.to_string().into())),
        )
        .await;
        if !matches!(sent, Ok(Ok(()))) {
            self.shared.pending.lock().unwrap().remove(&id);
            bail!("DevTools {method}: could not send the command");
        }
        let answer = match tokio::time::timeout(CALL_TIMEOUT, rx).await {
            Ok(Ok(v)) => v,
            Ok(Err(_)) => bail!("DevTools {method}: the browser closed the connection"),
            Err(_) => {
                self.shared.pending.lock().unwrap().remove(&id);
                bail!("DevTools {method}: no answer within {CALL_TIMEOUT:?}")
            }
        };
        if let Some(err) = answer.get("error") {
            bail!("DevTools {method} failed: {err}");
        }
        Ok(answer["result"].clone())
    }

    fn events(&self, session: &str) -> Vec<Value> {
        self.shared
            .events
            .lock()
            .unwrap()
            .get(session)
            .cloned()
            .unwrap_or_default()
    }

    fn forget(&self, session: &str) {
        self.shared.events.lock().unwrap().remove(session);
    }
}

/// A static server for the page origin: every path answers `html`, over plain HTTP or TLS.
pub struct PageServer {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for PageServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PageServer {
    /// Binds `bind` and serves there. Call it within the tokio runtime that is to serve it.
    pub fn start(
        bind: SocketAddr,
        html: &'static str,
        tls: Option<Arc<ServerConfig>>,
    ) -> anyhow::Result<PageServer> {
        let listener = std::net::TcpListener::bind(bind)
            .with_context(|| format!("bind the page server to {bind}"))?;
        Self::serve(listener, html, tls)
    }

    /// Serves on a listener bound elsewhere (e.g. inside a network namespace). Call it within
    /// the tokio runtime that is to serve it.
    pub fn serve(
        listener: std::net::TcpListener,
        html: &'static str,
        tls: Option<Arc<ServerConfig>>,
    ) -> anyhow::Result<PageServer> {
        listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(listener)?;
        let addr = listener.local_addr()?;
        let acceptor = tls.map(TlsAcceptor::from);
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| page(req, html));
                    let http = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        Some(acceptor) => {
                            if let Ok(Ok(tls)) =
                                tokio::time::timeout(CALL_TIMEOUT, acceptor.accept(tcp)).await
                            {
                                let _ = http.serve_connection(TokioIo::new(tls), service).await;
                            }
                        }
                        None => {
                            let _ = http.serve_connection(TokioIo::new(tcp), service).await;
                        }
                    }
                });
            }
        });
        Ok(PageServer { addr, task })
    }
}

async fn page(
    req: Request<Incoming>,
    html: &'static str,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut r = Response::new(Full::new(Bytes::from_static(html.as_bytes())));
    if req.uri().path() == "/favicon.ico" {
        // No content rather than 404, which Chromium would log to every page's console.
        *r.status_mut() = StatusCode::NO_CONTENT;
        *r.body_mut() = Full::new(Bytes::new());
        return Ok(r);
    }
    r.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    // Never cached: every case loads the page it asks for.
    r.headers_mut()
        .insert("cache-control", http::HeaderValue::from_static("no-store"));
    Ok(r)
}

/// A rustls server configuration (HTTP/1.1) for a PEM certificate and key.
pub fn server_tls(cert_pem: &str, key_pem: &str) -> anyhow::Result<Arc<ServerConfig>> {
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("certificate PEM")?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("key PEM")?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
