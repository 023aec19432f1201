//! A recording app: a real hyper HTTP/1.1 server on 127.0.0.1 that remembers every request it
//! receives and answers with a configurable status and headers.
//!
//! Special paths, for the streaming suites:
//! - `/sse`: `text/event-stream`; each `String` sent through [`Backend::sse_sender`] becomes one
//!   event, and dropping the sender ends the response.
//! - `/ws`: a WebSocket echo server.
//! - `/echo`: streams the request body back frame by frame, as it arrives.
//! - `/slow?ms=N`: answers after N milliseconds.
//! - `/collect`: reads the whole request body before answering (500 if it cannot).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

/// One request as the app received it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    /// Path and query.
    pub path: String,
    pub version: Version,
    pub headers: HeaderMap,
}

/// How the app answers ordinary requests.
#[derive(Clone, Debug, Default)]
pub struct Reply {
    /// 200 when `None`.
    pub status: Option<u16>,
    pub headers: Vec<(String, String)>,
}

struct State {
    seen: Mutex<Vec<Seen>>,
    arrived: Notify,
    reply: Mutex<Reply>,
    sse: Mutex<Option<mpsc::Receiver<String>>>,
}

pub struct Backend {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    /// Starts on an ephemeral loopback port, in the current tokio runtime.
    pub async fn start(reply: Reply) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        Self::serve(listener, reply)
    }

    /// Serves on a listener bound elsewhere, e.g. inside a pod's network namespace (a socket
    /// keeps its namespace), in the current tokio runtime.
    pub fn start_on(listener: std::net::TcpListener, reply: Reply) -> std::io::Result<Backend> {
        listener.set_nonblocking(true)?;
        Ok(Self::serve(TcpListener::from_std(listener)?, reply))
    }

    fn serve(listener: TcpListener, reply: Reply) -> Backend {
        let addr = listener.local_addr().expect("backend address");
        let state = Arc::new(State {
            seen: Mutex::new(Vec::new()),
            arrived: Notify::new(),
            reply: Mutex::new(reply),
            sse: Mutex::new(None),
        });
        let task = tokio::spawn(accept_loop(listener, state.clone()));
        Backend { addr, state, task }
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// The requests received so far, forgetting them.
    pub fn take_requests(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.state.seen.lock().unwrap())
    }

    /// Waits (at most `within`) until at least `n` requests have arrived.
    pub async fn wait_for_requests(&self, n: usize, within: Duration) -> Vec<Seen> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.state.arrived.notified();
            let seen = self.requests();
            if seen.len() >= n || tokio::time::Instant::now() >= deadline {
                return seen;
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
    }

    pub fn set_reply(&self, reply: Reply) {
        *self.state.reply.lock().unwrap() = reply;
    }

    /// Events for the next `/sse` response.
    pub fn sse_sender(&self) -> mpsc::Sender<String> {
        let (tx, rx) = mpsc::channel(16);
        *self.state.sse.lock().unwrap() = Some(rx);
        tx
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    // Owned here so that stopping the backend closes its open connections too, as a crashed
    // app would.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        while connections.try_join_next().is_some() {}
        let state = state.clone();
        connections.spawn(async move {
            let service = service_fn(move |req| handle(req, state.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

type BoxBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn handle(
    mut req: Request<Incoming>,
    state: Arc<State>,
) -> Result<Response<BoxBody>, Infallible> {
    let path = req
        .uri()
        .path_and_query()
        .map_or("/".to_string(), |p| p.to_string());
    state.seen.lock().unwrap().push(Seen {
        method: req.method().clone(),
        path: path.clone(),
        version: req.version(),
        headers: req.headers().clone(),
    });
    state.arrived.notify_waiters();

    let response = match req.uri().path() {
        "/sse" => {
            let rx = state.sse.lock().unwrap().take();
            let mut r = Response::new(
                ChannelBody {
                    rx: rx.unwrap_or_else(|| mpsc::channel(1).1),
                    sse: true,
                }
                .boxed(),
            );
            r.headers_mut().insert(
                "content-type",
                HeaderValue::from_static("text/event-stream"),
            );
            r
        }
        "/ws" => websocket(&mut req),
        "/echo" => {
            let (tx, rx) = mpsc::channel::<String>(16);
            let mut body = req.into_body();
            tokio::spawn(async move {
                while let Some(Ok(frame)) = body.frame().await {
                    if let Ok(data) = frame.into_data()
                        && tx
                            .send(String::from_utf8_lossy(&data).into_owned())
                            .await
                            .is_err()
                    {
                        return;
                    }
                }
            });
            Response::new(ChannelBody { rx, sse: false }.boxed())
        }
        "/collect" => match req.into_body().collect().await {
            Ok(body) => Response::new(
                Full::new(Bytes::from(format!("{} bytes\n", body.to_bytes().len()))).boxed(),
            ),
            Err(_) => {
                let mut r = Response::new(Full::new(Bytes::from_static(b"body\n")).boxed());
                *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                r
            }
        },
        "/slow" => {
            let ms = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("ms="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Response::new(Full::new(Bytes::from_static(b"slow\n")).boxed())
        }
        _ => {
            let reply = state.reply.lock().unwrap().clone();
            let status = reply.status.unwrap_or(200);
            let body = if status == 204 || status == 304 {
                Bytes::new()
            } else {
                Bytes::from(format!("backend saw {} {path}\n", req.method()))
            };
            let mut r = Response::new(Full::new(body).boxed());
            *r.status_mut() = StatusCode::from_u16(status).expect("valid status");
            for (k, v) in &reply.headers {
                r.headers_mut().append(
                    HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                    HeaderValue::from_str(v).expect("header value"),
                );
            }
            r
        }
    };
    Ok(response)
}

fn websocket(req: &mut Request<Incoming>) -> Response<BoxBody> {
    let Some(key) = req.headers().get("sec-websocket-key") else {
        let mut r = Response::new(Full::new(Bytes::from_static(b"not a websocket\n")).boxed());
        *r.status_mut() = StatusCode::BAD_REQUEST;
        return r;
    };
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_close() {
                break;
            }
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                break;
            }
        }
    });
    let mut r = Response::new(Full::new(Bytes::new()).boxed());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert("connection", HeaderValue::from_static("upgrade"));
    h.insert("upgrade", HeaderValue::from_static("websocket"));
    h.insert(
        "sec-websocket-accept",
        HeaderValue::from_str(&accept).expect("accept key"),
    );
    r
}

/// A response body fed by a channel: one frame per message, the end when the sender drops.
struct ChannelBody {
    rx: mpsc::Receiver<String>,
    /// Frame each message as one server-sent event.
    sse: bool,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let sse = self.sse;
        self.rx.poll_recv(cx).map(|m| {
            m.map(|s| {
                let text = if sse { format!("data: {s}\n\n") } else { s };
                Ok(Frame::data(Bytes::from(text)))
            })
        })
    }
}
