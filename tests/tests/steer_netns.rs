//! Transparent steering against real network namespaces (root only; these
//! tests fail, not skip, without root).
//!
//! Each test builds its own pod + client namespace pair (see
//! `cors_agent_tests::netns`), runs a plain TCP app in the pod, attaches
//! steering with a handler that answers `steered:` and then proxies to the
//! app through `Upstream::connect`, and checks from the client namespace.
#![cfg(target_os = "linux")]

use std::{
    io,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use cors_agent::steer::{FailMode, PodSteering, SteerError, SteerOptions, SteeredConn};
use cors_agent_tests::netns::{App, BpffsMount, Topology, exchange_async, require_root, sa};
use tokio::io::AsyncWriteExt;

const APP_PORT: u16 = 8080;
const OTHER_PORT: u16 = 9090;
const TEST_TIMEOUT: Duration = Duration::from_secs(60);

type Seen = Arc<Mutex<Vec<SteeredConn>>>;

/// Starts serving `listener` with a handler that writes `tag` and then
/// proxies to the app via the pod's upstream connector; records each conn.
fn serve_tagged(
    steering: &mut PodSteering,
    listener: cors_agent::steer::SteerListener,
    tag: &'static str,
) -> Seen {
    let seen: Seen = Arc::default();
    let seen2 = seen.clone();
    let upstream = steering.upstream();
    steering.serve(listener, move |mut stream, conn| {
        let upstream = upstream.clone();
        let seen = seen2.clone();
        async move {
            if let Ok(mut v) = seen.lock() {
                v.push(conn.clone());
            }
            if stream.write_all(tag.as_bytes()).await.is_err() {
                return;
            }
            match upstream.connect(conn.original_dst).await {
                Ok(mut app) => {
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut app).await;
                }
                Err(e) => {
                    let _ = stream
                        .write_all(format!("upstream error: {e}\n").as_bytes())
                        .await;
                }
            }
        }
    });
    seen
}

async fn talk(topo: &Topology, addr: SocketAddr) -> io::Result<String> {
    exchange_async(topo.client_netns_path(), addr, "hello").await
}

async fn talk_from_pod(topo: &Topology, addr: SocketAddr) -> io::Result<String> {
    exchange_async(topo.pod_netns_path(), addr, "hello").await
}

fn last(seen: &Seen) -> SteeredConn {
    seen.lock()
        .expect("lock")
        .last()
        .cloned()
        .expect("handler saw a connection")
}

/// Waits (bounded) until `addr` from the client namespace answers `want`.
/// Detaching is synchronous in the kernel, but aborted accept tasks drop
/// their listener asynchronously; this absorbs that.
async fn eventually(topo: &Topology, addr: SocketAddr, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got;
    loop {
        got = talk(topo, addr).await.map_err(|e| e.to_string());
        if got.as_deref() == Ok(want) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(got.as_deref(), Ok(want), "connecting to {addr}");
}

async fn with_timeout(f: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steers_ipv4_and_ipv6_and_leaves_other_traffic_alone() {
    require_root();
    with_timeout(async {
        let topo = Topology::new(true).expect("topology");
        let _app = App::start(&topo.pod_netns_path(), &[APP_PORT, OTHER_PORT], true).expect("app");
        let (mut steering, listener) =
            PodSteering::attach("default/web-0", topo.pod_netns_path(), &[APP_PORT])
                .expect("attach");
        assert!(listener.has_ipv6(), "pod has IPv6: an IPv6 listener too");
        let seen = serve_tagged(&mut steering, listener, "steered:");

        // IPv4, steered port: the handler sees the client and original dst.
        let got = talk(&topo, sa(topo.pod_v4, APP_PORT))
            .await
            .expect("v4 steered");
        assert_eq!(got, "steered:app:8080:hello\n");
        let conn = last(&seen);
        assert_eq!(conn.peer.ip(), topo.client_v4);
        assert_eq!(conn.original_dst, sa(topo.pod_v4, APP_PORT));
        assert_eq!(conn.port, APP_PORT);
        assert_eq!(&*conn.pod, "default/web-0");

        // IPv6, steered port.
        let got = talk(&topo, sa(topo.pod_v6, APP_PORT))
            .await
            .expect("v6 steered");
        assert_eq!(got, "steered:app:8080:hello\n");
        let conn = last(&seen);
        assert_eq!(conn.peer.ip(), topo.client_v6);
        assert_eq!(conn.original_dst, sa(topo.pod_v6, APP_PORT));

        // A port that is not enrolled goes straight to the app.
        let n = seen.lock().expect("lock").len();
        assert_eq!(
            talk(&topo, sa(topo.pod_v4, OTHER_PORT))
                .await
                .expect("v4 other"),
            "app:9090:hello\n"
        );
        assert_eq!(
            talk(&topo, sa(topo.pod_v6, OTHER_PORT))
                .await
                .expect("v6 other"),
            "app:9090:hello\n"
        );

        // Inside the pod: loopback and pod-IP-to-itself are never steered.
        assert_eq!(
            talk_from_pod(&topo, sa([127, 0, 0, 1], APP_PORT))
                .await
                .expect("pod loopback"),
            "app:8080:hello\n"
        );
        assert_eq!(
            talk_from_pod(&topo, sa(topo.pod_v4, APP_PORT))
                .await
                .expect("pod self"),
            "app:8080:hello\n"
        );
        assert_eq!(
            seen.lock().expect("lock").len(),
            n,
            "none of those reached the handler"
        );

        // Ports can change at run time.
        steering
            .set_ports(&[APP_PORT, OTHER_PORT])
            .expect("set ports");
        assert_eq!(
            talk(&topo, sa(topo.pod_v4, OTHER_PORT))
                .await
                .expect("9090"),
            "steered:app:9090:hello\n"
        );
        steering.set_ports(&[OTHER_PORT]).expect("set ports");
        assert_eq!(steering.ports(), vec![OTHER_PORT]);
        assert_eq!(
            talk(&topo, sa(topo.pod_v4, APP_PORT)).await.expect("8080"),
            "app:8080:hello\n"
        );

        steering.detach().expect("detach");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detach_and_reattach_leave_nothing_behind() {
    require_root();
    with_timeout(async {
        let topo = Topology::new(true).expect("topology");
        let _app = App::start(&topo.pod_netns_path(), &[APP_PORT], true).expect("app");
        let target = sa(topo.pod_v4, APP_PORT);
        assert_eq!(
            talk(&topo, target).await.expect("before"),
            "app:8080:hello\n"
        );
        let netns_fds_before = netns_fds(&topo.pod_netns_path());

        for round in 0..3 {
            let (mut steering, listener) =
                PodSteering::attach("reattach", topo.pod_netns_path(), &[APP_PORT])
                    .expect("attach");
            let listener_addrs = listener.local_addrs().expect("addrs");
            let prog_id = steering.program_id().expect("program id");
            serve_tagged(&mut steering, listener, "steered:");
            assert_eq!(
                talk(&topo, target).await.expect("steered"),
                "steered:app:8080:hello\n",
                "round {round}"
            );
            assert!(held_prog_ids().contains(&prog_id));
            if round % 2 == 0 {
                steering.detach().expect("detach");
            } else {
                drop(steering);
            }
            // Straight to the app again, at once.
            assert_eq!(
                talk(&topo, target).await.expect("after"),
                "app:8080:hello\n",
                "round {round}"
            );
            // No fd of ours refers to the program any more (link and program
            // closed), the listener is closed, the pod's namespace is closed.
            wait_until("program fds closed", || !held_prog_ids().contains(&prog_id)).await;
            for addr in listener_addrs.iter().copied() {
                let pod_ns = topo.pod_netns_path();
                wait_until_async("listener closed", || {
                    let pod_ns = pod_ns.clone();
                    async move {
                        matches!(
                            exchange_async(pod_ns, addr, "x").await,
                            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused
                        )
                    }
                })
                .await;
            }
            wait_until("namespace closed", || {
                netns_fds(&topo.pod_netns_path()) == netns_fds_before
            })
            .await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_refuses_while_no_agent_and_a_new_agent_takes_over() {
    require_root();
    with_timeout(async {
        let topo = Topology::new(true).expect("topology");
        let bpffs = BpffsMount::new().expect("bpffs");
        let _app = App::start(&topo.pod_netns_path(), &[APP_PORT, OTHER_PORT], true).expect("app");
        let opts = SteerOptions {
            fail_mode: FailMode::Closed,
            pin_root: bpffs.path.join("cors-agent"),
        };
        let pod_dir = opts.pin_root.join("default_api-0");
        let (v4, v6) = (sa(topo.pod_v4, APP_PORT), sa(topo.pod_v6, APP_PORT));

        // First agent.
        let (mut a, listener) =
            PodSteering::attach_with("default/api-0", topo.pod_netns_path(), &[APP_PORT], &opts)
                .expect("attach a");
        serve_tagged(&mut a, listener, "steered-a:");
        assert_eq!(
            talk(&topo, v4).await.expect("a"),
            "steered-a:app:8080:hello\n"
        );
        for name in ["CORS_LISTENERS", "CORS_PORTS"] {
            assert!(pod_dir.join(name).exists(), "{name} pinned");
        }
        assert_eq!(pinned_links(&pod_dir).len(), 1, "one link pinned");

        // The agent goes away without unpinning (crash, restart, upgrade).
        drop(a);
        for addr in [v4, v6] {
            let deadline = Instant::now() + Duration::from_secs(5);
            let refused = loop {
                let r = talk(&topo, addr).await;
                if matches!(&r, Err(e) if e.kind() == io::ErrorKind::ConnectionRefused)
                    || Instant::now() > deadline
                {
                    break r;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            assert!(
                matches!(&refused, Err(e) if e.kind() == io::ErrorKind::ConnectionRefused),
                "{addr} must be refused while no agent holds the map, got {refused:?}"
            );
        }
        // Ports that are not steered are unaffected.
        assert_eq!(
            talk(&topo, sa(topo.pod_v4, OTHER_PORT))
                .await
                .expect("other"),
            "app:9090:hello\n"
        );

        // A new agent takes over the pinned objects.
        let (mut b, listener) =
            PodSteering::attach_with("default/api-0", topo.pod_netns_path(), &[APP_PORT], &opts)
                .expect("attach b");
        serve_tagged(&mut b, listener, "steered-b:");
        assert_eq!(
            pinned_links(&pod_dir).len(),
            1,
            "old link unpinned, new one pinned"
        );
        assert_eq!(
            talk(&topo, v4).await.expect("b v4"),
            "steered-b:app:8080:hello\n"
        );
        assert_eq!(
            talk(&topo, v6).await.expect("b v6"),
            "steered-b:app:8080:hello\n"
        );

        // Detaching for good unpins: traffic goes to the app directly.
        b.detach().expect("detach b");
        assert!(!pod_dir.exists(), "pins removed");
        eventually(&topo, v4, "app:8080:hello\n").await;

        // Closed -> crash -> restart configured open: the stale pins go and
        // steering fails open again.
        let (c, _l) =
            PodSteering::attach_with("default/api-0", topo.pod_netns_path(), &[APP_PORT], &opts)
                .expect("attach c");
        drop(c);
        drop(_l);
        let open = SteerOptions {
            fail_mode: FailMode::Open,
            ..opts.clone()
        };
        let (d, listener) =
            PodSteering::attach_with("default/api-0", topo.pod_netns_path(), &[APP_PORT], &open)
                .expect("attach d (open)");
        assert!(!pod_dir.exists(), "stale closed pins removed");
        drop(listener);
        drop(d);
        eventually(&topo, v4, "app:8080:hello\n").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv4_only_pod_gets_an_ipv4_listener() {
    require_root();
    with_timeout(async {
        let topo = Topology::new(false).expect("topology");
        let _app = App::start(&topo.pod_netns_path(), &[APP_PORT], false).expect("app");
        let (mut steering, listener) =
            PodSteering::attach("v4only", topo.pod_netns_path(), &[APP_PORT]).expect("attach");
        assert!(!listener.has_ipv6());
        let addrs = listener.local_addrs().expect("addrs");
        assert!(addrs.len() == 1 && addrs[0].is_ipv4(), "{addrs:?}");
        let seen = serve_tagged(&mut steering, listener, "steered:");
        assert_eq!(
            talk(&topo, sa(topo.pod_v4, APP_PORT)).await.expect("v4"),
            "steered:app:8080:hello\n"
        );
        assert_eq!(last(&seen).original_dst, sa(topo.pod_v4, APP_PORT));
        steering.detach().expect("detach");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_errors_name_the_problem() {
    require_root();
    let missing = PathBuf::from("/var/run/netns/cors-steer-does-not-exist");
    let err = PodSteering::attach("ghost", &missing, &[APP_PORT]).expect_err("missing netns");
    assert!(matches!(err, SteerError::NetnsNotFound { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("ghost") && msg.contains("cors-steer-does-not-exist"),
        "{msg}"
    );

    let err =
        PodSteering::attach("notns", "/proc/self/status", &[APP_PORT]).expect_err("not a netns");
    assert!(matches!(err, SteerError::Netns { .. }), "{err}");

    let err = PodSteering::attach("zero", "/proc/self/ns/net", &[0]).expect_err("port 0");
    assert!(matches!(err, SteerError::InvalidInput { .. }), "{err}");

    let topo = Topology::new(true).expect("topology");
    let opts = SteerOptions {
        fail_mode: FailMode::Closed,
        pin_root: std::env::temp_dir().join("cors-steer-not-bpffs"),
    };
    let err = PodSteering::attach_with("plain", topo.pod_netns_path(), &[APP_PORT], &opts)
        .expect_err("pin root not on bpffs");
    assert!(matches!(err, SteerError::NotBpffs { .. }), "{err}");
    assert!(err.to_string().contains("mount -t bpf"), "{err}");
}

#[test]
fn attach_outside_a_runtime_is_an_error_not_a_panic() {
    require_root();
    let err =
        PodSteering::attach("nort", "/proc/self/ns/net", &[APP_PORT]).expect_err("no runtime");
    assert!(matches!(err, SteerError::NoRuntime { .. }), "{err}");
}

/// Program ids referenced by this process's fds (bpf-prog and bpf_link fds
/// show `prog_id:` in fdinfo).
fn held_prog_ids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fdinfo") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .collect()
}

fn pinned_links(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with("link_"))
                .collect()
        })
        .unwrap_or_default()
}

/// How many of this process's file descriptors are the network namespace at `path` (compared
/// by inode: opened through a bind mount, they read as its path).
fn netns_fds(path: &std::path::Path) -> usize {
    use std::os::unix::fs::MetadataExt;
    let Ok(ns) = std::fs::metadata(path).map(|m| (m.dev(), m.ino())) else {
        return 0;
    };
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| std::fs::metadata(e.path()).ok())
        .filter(|m| (m.dev(), m.ino()) == ns)
        .count()
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_until_async<F: std::future::Future<Output = bool>>(
    what: &str,
    mut cond: impl FnMut() -> F,
) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
