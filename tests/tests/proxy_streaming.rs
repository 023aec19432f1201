//! Bodies stream both ways without buffering, and WebSocket upgrades pass through.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper::body::{Body, Frame};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use cors_agent_tests::agent::{APP_ROUTE, AgentBuilder, write_resources};
use cors_agent_tests::backend::{Backend, Reply};
use cors_agent_tests::client::{self, IO_TIMEOUT};

const ORIGIN: &str = "https://app.example.com";

/// Reads from `stream` into `seen` until it contains `needle`.
async fn read_until<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    seen: &mut Vec<u8>,
    needle: &str,
) -> Result<(), String> {
    let read = async {
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(seen).contains(needle) {
            let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("connection closed".to_string());
            }
            seen.extend_from_slice(&buf[..n]);
        }
        Ok(())
    };
    tokio::time::timeout(IO_TIMEOUT, read).await.map_err(|_| {
        format!(
            "{needle:?} did not arrive; got {:?}",
            String::from_utf8_lossy(seen)
        )
    })?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_reach_the_client_one_by_one_over_http1() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start(Reply::default()).await;
    let agent = AgentBuilder::new(
        backend.addr,
        write_resources(dir.path(), "r.yaml", APP_ROUTE),
    )
    .spawn()
    .unwrap();
    let events = backend.sse_sender();

    let mut tcp = client::connect(agent.addr()).await.unwrap();
    tcp.write_all(
        format!("GET /sse HTTP/1.1\r\nHost: www.example.com\r\nOrigin: {ORIGIN}\r\nAccept: text/event-stream\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut seen = Vec::new();
    read_until(&mut tcp, &mut seen, "\r\n\r\n").await.unwrap();
    let head = String::from_utf8_lossy(&seen).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        head.contains("access-control-allow-origin: https://app.example.com"),
        "{head}"
    );
    assert!(head.contains("content-type: text/event-stream"), "{head}");

    // Each event is sent only after the previous one reached the client: a proxy that
    // buffers the body would stall here.
    for i in 1..=3 {
        events.send(format!("event-{i}")).await.unwrap();
        read_until(&mut tcp, &mut seen, &format!("data: event-{i}\n\n"))
            .await
            .unwrap();
    }
    drop(events);
    read_until(&mut tcp, &mut seen, "0\r\n\r\n").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_reach_the_client_one_by_one_over_h2c() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start(Reply::default()).await;
    let agent = AgentBuilder::new(
        backend.addr,
        write_resources(dir.path(), "r.yaml", APP_ROUTE),
    )
    .spawn()
    .unwrap();
    let events = backend.sse_sender();

    let tcp = client::connect(agent.addr()).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get("http://www.example.com/sse")
        .header("origin", ORIGIN)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = tokio::time::timeout(IO_TIMEOUT, sender.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["access-control-allow-origin"], ORIGIN);
    let mut body = response.into_body();
    for i in 1..=3 {
        events.send(format!("event-{i}")).await.unwrap();
        let frame = tokio::time::timeout(IO_TIMEOUT, body.frame())
            .await
            .expect("event in time")
            .expect("a frame")
            .unwrap();
        assert_eq!(
            frame.into_data().unwrap(),
            Bytes::from(format!("data: event-{i}\n\n"))
        );
    }
    drop(events);
    // HTTP/2 may close the stream with an empty DATA frame.
    let rest = tokio::time::timeout(IO_TIMEOUT, body.collect())
        .await
        .expect("the stream ends when the app's does")
        .unwrap();
    assert!(rest.to_bytes().is_empty());
}

/// A request body fed by the test, one chunk at a time.
struct Chunks(mpsc::Receiver<Bytes>);

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_response_bodies_stream_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start(Reply::default()).await;
    let agent = AgentBuilder::new(
        backend.addr,
        write_resources(dir.path(), "r.yaml", APP_ROUTE),
    )
    .spawn()
    .unwrap();

    let tcp = client::connect(agent.addr()).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let (chunks, rx) = mpsc::channel(4);
    let req = Request::post("/echo")
        .header("host", "www.example.com")
        .header("origin", ORIGIN)
        .body(Chunks(rx))
        .unwrap();
    chunks.send(Bytes::from_static(b"ping-1")).await.unwrap();
    let response = tokio::time::timeout(IO_TIMEOUT, sender.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["access-control-allow-origin"], ORIGIN);
    let mut body = response.into_body();
    // The second chunk goes out only after the first came back through the agent and app.
    for i in 1..=3 {
        let frame = tokio::time::timeout(IO_TIMEOUT, body.frame())
            .await
            .expect("echo in time")
            .expect("a frame")
            .unwrap();
        assert_eq!(frame.into_data().unwrap(), format!("ping-{i}"));
        if i < 3 {
            chunks
                .send(Bytes::from(format!("ping-{}", i + 1)))
                .await
                .unwrap();
        }
    }
    drop(chunks);
    let end = tokio::time::timeout(IO_TIMEOUT, body.frame())
        .await
        .unwrap();
    assert!(end.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_passes_through_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start(Reply::default()).await;
    let agent = AgentBuilder::new(
        backend.addr,
        write_resources(dir.path(), "r.yaml", APP_ROUTE),
    )
    .spawn()
    .unwrap();

    let tcp = client::connect(agent.addr()).await.unwrap();
    let mut request = "ws://www.example.com/ws".into_client_request().unwrap();
    request
        .headers_mut()
        .insert("origin", ORIGIN.parse().unwrap());
    let (mut ws, response) =
        tokio::time::timeout(IO_TIMEOUT, tokio_tungstenite::client_async(request, tcp))
            .await
            .expect("handshake in time")
            .expect("handshake");
    assert_eq!(response.status(), 101);

    for text in ["hello", "through", "the agent"] {
        ws.send(Message::text(text)).await.unwrap();
        let echoed = tokio::time::timeout(IO_TIMEOUT, ws.next())
            .await
            .expect("echo in time")
            .expect("a message")
            .unwrap();
        assert_eq!(echoed, Message::text(text));
    }
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    let echoed = tokio::time::timeout(IO_TIMEOUT, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echoed, Message::binary(vec![0u8, 1, 2, 255]));
    ws.close(None).await.unwrap();

    let seen = backend.requests();
    let upgrade = seen
        .iter()
        .find(|s| s.path == "/ws")
        .expect("the app saw the upgrade");
    assert_eq!(upgrade.headers["upgrade"], "websocket");
    assert_eq!(upgrade.headers["origin"], ORIGIN);
    assert!(upgrade.headers.contains_key("sec-websocket-key"));

    // The agent keeps serving ordinary requests afterwards.
    let reply = client::http1(agent.addr(), &client::Req::get("www.example.com", "/after"))
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
}
