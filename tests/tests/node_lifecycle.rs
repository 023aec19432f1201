//! `cors-agent node` over time (root only; these tests fail, not skip, without root): pods
//! attached and detached by editing the file, invalid edits refused, a pod re-created with the
//! same address, the agent killed or stopped in both fail modes.
#![cfg(target_os = "linux")]

use std::path::Path;
use std::time::Duration;

use cors_agent_tests::agent::APP_ROUTE;
use cors_agent_tests::backend::{Backend, Reply};
use cors_agent_tests::client::{Proto, Req};
use cors_agent_tests::cluster::{Cluster, NodeAgent, NodeConfig, PodEntry, PortEntry};
use cors_agent_tests::netns::{BpffsMount, require_root};

const TEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Reloads are debounced (250 ms) and attaching takes a few ms; this is generous.
const SETTLE: Duration = Duration::from_secs(10);
const HOST: &str = "www.example.com";
/// The origin `APP_ROUTE` allows.
const ALLOWED: &str = "https://app.example.com";

/// Where a preflight to a pod's port ended up.
#[derive(Debug, PartialEq, Eq)]
enum Reached {
    /// Answered by the agent (allowed, never reached the app).
    Agent,
    /// Answered by the agent without CORS headers (a policy that does not allow the origin).
    Denied,
    /// Reached the app, which answered without CORS headers.
    App,
    /// The connection was refused.
    Refused,
    Other(String),
}

async fn path_of(cluster: &Cluster, addr: std::net::SocketAddr, app: &Backend) -> Reached {
    let preflight = Req::get(HOST, "/p")
        .method("OPTIONS")
        .header("Origin", ALLOWED)
        .header("Access-Control-Request-Method", "GET");
    app.take_requests();
    match cluster.send(Proto::Http1, addr, None, &preflight).await {
        Err(e) if format!("{e:#}").contains("Connection refused") => Reached::Refused,
        Err(e) => Reached::Other(format!("{e:#}")),
        Ok(reply) => {
            let reached_app = !app.take_requests().is_empty();
            match (reply.header("access-control-allow-origin"), reached_app) {
                (Some(ALLOWED), false) => Reached::Agent,
                (None, false) => Reached::Denied,
                (None, true) => Reached::App,
                other => Reached::Other(format!("{other:?}")),
            }
        }
    }
}

/// Waits (at most `SETTLE`) until preflights to `addr` take `want`.
async fn expect_path(
    cluster: &Cluster,
    addr: std::net::SocketAddr,
    app: &Backend,
    want: Reached,
    why: &str,
) {
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let got = path_of(cluster, addr, app).await;
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{why}: {addr}: expected {want:?}, got {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (at most `SETTLE`) until `check` holds for the agent.
async fn expect_agent(agent: &NodeAgent, what: &str, check: impl Fn(&NodeAgent) -> bool) {
    let deadline = tokio::time::Instant::now() + SETTLE;
    while !check(agent) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The network namespace of `pod` now, as (device, inode).
fn netns_id(cluster: &Cluster, pod: &str) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(cluster.pod(pod).netns_path()).expect("pod namespace");
    (m.dev(), m.ino())
}

/// How many of the agent's file descriptors are the network namespace `ns` (opened through a
/// bind mount, they read as its path: compared by inode).
fn fds_on(agent: &NodeAgent, ns: (u64, u64)) -> usize {
    use std::os::unix::fs::MetadataExt;
    let Ok(dir) = std::fs::read_dir(format!("/proc/{}/fd", agent.pid())) else {
        return 0;
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| std::fs::metadata(e.path()).ok())
        .filter(|m| (m.dev(), m.ino()) == ns)
        .count()
}

/// How many of the agent's threads are inside the network namespace `ns`: one would keep the
/// namespace alive after its pod is gone.
fn threads_in(agent: &NodeAgent, ns: (u64, u64)) -> usize {
    use std::os::unix::fs::MetadataExt;
    let Ok(dir) = std::fs::read_dir(format!("/proc/{}/task", agent.pid())) else {
        return 0;
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| std::fs::metadata(e.path().join("ns/net")).ok())
        .filter(|m| (m.dev(), m.ino()) == ns)
        .count()
}

/// How many of the agent's file descriptors are the network namespace of `pod`.
fn netns_fds(agent: &NodeAgent, cluster: &Cluster, pod: &str) -> usize {
    fds_on(agent, netns_id(cluster, pod))
}

/// The agent runs every namespace's jobs on one thread, whatever the number of pods.
fn netns_threads(agent: &NodeAgent) -> usize {
    agent
        .threads()
        .iter()
        .filter(|t| *t == "cors-netns-jobs" || t.starts_with("netns-"))
        .count()
}

fn write_routes(dir: &Path) {
    std::fs::write(dir.join("routes.yaml"), APP_ROUTE).unwrap();
}

fn config(cluster: &Cluster, pods: &[&str]) -> NodeConfig {
    NodeConfig {
        resources: vec!["routes.yaml".into()],
        pods: pods
            .iter()
            .map(|p| PodEntry::new(cluster, p, vec![PortEntry::new(8080)]))
            .collect(),
        ..Default::default()
    }
}

async fn within_test_timeout(f: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_are_detached_and_attached_again_by_editing_the_file() {
    require_root();
    within_test_timeout(async {
        let cluster = Cluster::new(&["a", "b"]).expect("cluster");
        let app_a = cluster.start_app("a", 8080, Reply::default()).unwrap();
        let app_b = cluster.start_app("b", 8080, Reply::default()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        write_routes(dir.path());
        let path = dir.path().join("node.yaml");
        config(&cluster, &["a", "b"]).write(&path);
        let agent = NodeAgent::start(&path).expect("agent");
        let (a, b) = (cluster.pod("a").v4(8080), cluster.pod("b").v6(8080));
        expect_path(&cluster, a, &app_a, Reached::Agent, "start").await;
        expect_path(&cluster, b, &app_b, Reached::Agent, "start").await;
        assert_eq!(netns_fds(&agent, &cluster, "a"), 1);
        assert_eq!(netns_fds(&agent, &cluster, "b"), 1);
        assert_eq!(netns_threads(&agent), 1, "{:?}", agent.threads());
        let bpf_fds_two_pods = agent.bpf_fds();
        // May count a client connection still closing: sockets are compared with `<=`.
        let sockets_two_pods = agent.sockets();
        let mut generation = 1;

        for round in 0..3 {
            // Remove pod a: its traffic reaches the app directly, b is untouched.
            config(&cluster, &["b"]).write(&path);
            generation += 1;
            let dump = agent.wait_generation(generation, SETTLE).await.unwrap();
            assert_eq!(dump["pods"].as_array().map(Vec::len), Some(1), "{dump}");
            expect_path(&cluster, a, &app_a, Reached::App, "a removed").await;
            expect_path(&cluster, b, &app_b, Reached::Agent, "b kept").await;
            // Nothing of a's is left: its namespace, its BPF objects.
            expect_agent(
                &agent,
                "a's namespace closed and no thread inside it",
                |ag| {
                    netns_fds(ag, &cluster, "a") == 0
                        && threads_in(ag, netns_id(&cluster, "a")) == 0
                },
            )
            .await;
            expect_agent(&agent, "a's BPF fds and sockets closed", |ag| {
                // a's two listeners (IPv4, IPv6) are closed.
                ag.bpf_fds() < bpf_fds_two_pods && ag.sockets() + 2 <= sockets_two_pods
            })
            .await;

            // Add it back, no restart: steered again, same resources as before.
            config(&cluster, &["a", "b"]).write(&path);
            generation += 1;
            agent.wait_generation(generation, SETTLE).await.unwrap();
            expect_path(&cluster, a, &app_a, Reached::Agent, "a added back").await;
            assert_eq!(netns_fds(&agent, &cluster, "a"), 1, "round {round}");
            assert_eq!(netns_threads(&agent), 1, "round {round}");
            expect_agent(&agent, "as many BPF fds as before, no more sockets", |ag| {
                ag.bpf_fds() == bpf_fds_two_pods && ag.sockets() <= sockets_two_pods
            })
            .await;
        }

        // An invalid edit is refused whole, with the full message; everything keeps working.
        let mut bad = config(&cluster, &["a", "b"]);
        bad.pods[1].ports.push(PortEntry::new(8080));
        bad.write(&path);
        assert!(
            agent.wait_for_log("configuration reload refused", SETTLE),
            "{}",
            agent.log()
        );
        assert!(
            agent
                .log()
                .contains("pods[1].ports[1].port: port 8080 is enrolled twice"),
            "{}",
            agent.log()
        );
        let dump = agent.config_dump().await.unwrap();
        assert_eq!(dump["generation"], generation);
        assert!(
            dump["lastReloadError"]
                .as_str()
                .is_some_and(|e| e.contains("enrolled twice")),
            "{dump}"
        );
        expect_path(&cluster, a, &app_a, Reached::Agent, "after a refused edit").await;
        expect_path(&cluster, b, &app_b, Reached::Agent, "after a refused edit").await;

        // Fixed: applied, and the error is gone.
        config(&cluster, &["a", "b"]).write(&path);
        generation += 1;
        let dump = agent.wait_generation(generation, SETTLE).await.unwrap();
        assert!(dump["lastReloadError"].is_null(), "{dump}");

        // A resource change reloads the routes, as in proxy mode.
        std::fs::write(
            dir.path().join("routes.yaml"),
            APP_ROUTE.replace(ALLOWED, "https://other.example.com"),
        )
        .unwrap();
        generation += 1;
        let dump = agent.wait_generation(generation, SETTLE).await.unwrap();
        assert!(dump["lastReloadError"].is_null(), "{dump}");
        let reply = cluster
            .send(
                Proto::Http1,
                a,
                None,
                &Req::get(HOST, "/")
                    .method("OPTIONS")
                    .header("Origin", "https://other.example.com")
                    .header("Access-Control-Request-Method", "GET"),
            )
            .await
            .unwrap();
        assert_eq!(
            reply.header("access-control-allow-origin"),
            Some("https://other.example.com")
        );
    })
    .await;
}

/// Two Services, two policies: `app-a` allows `ALLOWED`, `app-b` another origin.
fn two_services() -> String {
    // Renames the route and its backendRef.
    let a = APP_ROUTE.replace("name: app\n", "name: app-a\n");
    let b = APP_ROUTE
        .replace("name: app\n", "name: app-b\n")
        .replace(ALLOWED, "https://b.example");
    format!("{a}---\n{b}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_and_services_change_in_place() {
    require_root();
    within_test_timeout(async {
        let cluster = Cluster::new(&["a"]).expect("cluster");
        let app = cluster.start_app("a", 8080, Reply::default()).unwrap();
        let other = cluster.start_app("a", 9090, Reply::default()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("routes.yaml"), two_services()).unwrap();
        let path = dir.path().join("node.yaml");
        let with_ports = |ports: Vec<PortEntry>| NodeConfig {
            resources: vec!["routes.yaml".into()],
            pods: vec![PodEntry::new(&cluster, "a", ports)],
            ..Default::default()
        };
        with_ports(vec![PortEntry::new(8080).service("app-a:8000")]).write(&path);
        let agent = NodeAgent::start(&path).expect("agent");
        let (p8080, p9090) = (cluster.pod("a").v4(8080), cluster.pod("a").v6(9090));
        expect_path(&cluster, p8080, &app, Reached::Agent, "app-a's policy").await;
        expect_path(&cluster, p9090, &other, Reached::App, "not enrolled").await;
        let program = agent.config_dump().await.unwrap()["pods"][0]["programId"].clone();

        // Another service on 8080 (another policy), and 9090 enrolled with every route.
        with_ports(vec![
            PortEntry::new(8080).service("app-b:8000"),
            PortEntry::new(9090),
        ])
        .write(&path);
        let dump = agent.wait_generation(2, SETTLE).await.unwrap();
        assert_eq!(dump["pods"][0]["programId"], program, "updated in place");
        expect_path(&cluster, p8080, &app, Reached::Denied, "app-b's policy").await;
        expect_path(&cluster, p9090, &other, Reached::Agent, "9090 enrolled").await;

        // 8080 removed: straight to the app again; 9090 still steered.
        with_ports(vec![PortEntry::new(9090)]).write(&path);
        let dump = agent.wait_generation(3, SETTLE).await.unwrap();
        assert_eq!(dump["pods"][0]["programId"], program, "updated in place");
        expect_path(&cluster, p8080, &app, Reached::App, "8080 removed").await;
        expect_path(&cluster, p9090, &other, Reached::Agent, "9090 kept").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_recreated_with_the_same_address_never_reaches_the_old_pods_entry() {
    require_root();
    within_test_timeout(async {
        let mut cluster = Cluster::new(&["a"]).expect("cluster");
        let tagged = |tag: &str| Reply {
            status: None,
            headers: vec![("x-app".into(), tag.into())],
        };
        let old_app = cluster.start_app("a", 8080, tagged("old")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        write_routes(dir.path());
        let path = dir.path().join("node.yaml");
        config(&cluster, &["a"]).write(&path);
        let agent = NodeAgent::start(&path).expect("agent");
        let addr = cluster.pod("a").v4(8080);
        let get = Req::get(HOST, "/x").header("Origin", ALLOWED);
        let reply = cluster.send(Proto::Http1, addr, None, &get).await.unwrap();
        assert_eq!(reply.header("x-app"), Some("old"));
        assert_eq!(reply.header("access-control-allow-origin"), Some(ALLOWED));
        let old_program = agent.config_dump().await.unwrap()["pods"][0]["programId"].clone();

        // The pod is replaced: same namespace path, same address, a new app.
        let old_netns = netns_id(&cluster, "a");
        drop(old_app);
        cluster.recreate_pod("a").unwrap();
        let new_app = cluster.start_app("a", 8080, tagged("new")).unwrap();
        // Until the agent reloads, the new namespace has no program: straight to the new app.
        let reply = cluster.send(Proto::Http1, addr, None, &get).await.unwrap();
        assert_eq!(reply.header("x-app"), Some("new"));
        assert_eq!(reply.header("access-control-allow-origin"), None);

        agent.signal("HUP");
        let dump = agent.wait_generation(2, SETTLE).await.unwrap();
        assert_ne!(dump["pods"][0]["programId"], old_program, "attached anew");
        expect_path(
            &cluster,
            addr,
            &new_app,
            Reached::Agent,
            "the new pod is steered",
        )
        .await;
        // Pooled connections of the old pod are never used: the new app answers, through
        // the agent.
        for _ in 0..3 {
            let reply = cluster.send(Proto::Http1, addr, None, &get).await.unwrap();
            assert_eq!(reply.header("x-app"), Some("new"));
            assert_eq!(reply.header("access-control-allow-origin"), Some(ALLOWED));
        }
        let seen = new_app.take_requests();
        assert!(
            seen.iter()
                .all(|s| s.headers.contains_key("x-forwarded-for")),
            "{seen:?}"
        );
        expect_agent(
            &agent,
            "the old namespace closed, the new one open once",
            |ag| {
                fds_on(ag, old_netns) == 0
                    && netns_fds(ag, &cluster, "a") == 1
                    && netns_threads(ag) == 1
            },
        )
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_open_a_killed_agent_lets_traffic_through_and_sigterm_drains_first() {
    require_root();
    within_test_timeout(async {
        let cluster = Cluster::new(&["a"]).expect("cluster");
        let app = cluster.start_app("a", 8080, Reply::default()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        write_routes(dir.path());
        let path = dir.path().join("node.yaml");
        config(&cluster, &["a"]).write(&path);
        let (v4, v6) = (cluster.pod("a").v4(8080), cluster.pod("a").v6(8080));

        // SIGKILL: the programs go with the process.
        let mut agent = NodeAgent::start(&path).expect("agent");
        expect_path(&cluster, v4, &app, Reached::Agent, "started").await;
        agent.signal("KILL");
        assert!(agent.wait_exit(Duration::from_secs(5)).is_some());
        expect_path(&cluster, v4, &app, Reached::App, "killed, fail open").await;
        expect_path(&cluster, v6, &app, Reached::App, "killed, fail open").await;
        drop(agent);

        // A new agent takes over; SIGTERM with a request in flight.
        let mut agent = NodeAgent::start(&path).expect("agent again");
        expect_path(&cluster, v6, &app, Reached::Agent, "restarted").await;
        app.take_requests();
        let slow = Req::get(HOST, "/slow?ms=1500").header("Origin", ALLOWED);
        let in_flight = cluster.send(Proto::Http1, v4, None, &slow);
        let stop = async {
            let seen = app.wait_for_requests(1, Duration::from_secs(5)).await;
            assert_eq!(seen.len(), 1, "the slow request reached the app");
            agent.signal("TERM");
            // No longer accepting: new connections reach the app directly at once.
            expect_path(&cluster, v6, &app, Reached::App, "draining, fail open").await;
        };
        let (reply, ()) = tokio::join!(in_flight, stop);
        let reply = reply.expect("the in-flight request completes");
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("access-control-allow-origin"), Some(ALLOWED));
        let status = agent
            .wait_exit(Duration::from_secs(10))
            .expect("exits after draining");
        assert_eq!(status.code(), Some(0), "{}", agent.log());
        assert!(
            agent.log().contains("detaching (fail open"),
            "{}",
            agent.log()
        );
        expect_path(&cluster, v4, &app, Reached::App, "stopped, fail open").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_closed_refuses_until_an_agent_is_back() {
    require_root();
    within_test_timeout(async {
        let cluster = Cluster::new(&["a"]).expect("cluster");
        let bpffs = BpffsMount::new().expect("bpffs");
        let app = cluster.start_app("a", 8080, Reply::default()).unwrap();
        let other = cluster.start_app("a", 9090, Reply::default()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        write_routes(dir.path());
        let path = dir.path().join("node.yaml");
        let mut closed = config(&cluster, &["a"]);
        closed.fail_mode = Some("closed".into());
        closed.pin_dir = Some(bpffs.path.join("cors-agent"));
        closed.write(&path);
        let pins = bpffs.path.join("cors-agent/a");
        let (v4, v6) = (cluster.pod("a").v4(8080), cluster.pod("a").v6(8080));

        let mut agent = NodeAgent::start(&path).expect("agent");
        expect_path(&cluster, v4, &app, Reached::Agent, "started").await;
        assert!(pins.is_dir(), "pinned under {}", pins.display());
        agent.signal("KILL");
        assert!(agent.wait_exit(Duration::from_secs(5)).is_some());
        expect_path(&cluster, v4, &app, Reached::Refused, "killed, fail closed").await;
        expect_path(&cluster, v6, &app, Reached::Refused, "killed, fail closed").await;
        // Ports that are not steered are unaffected.
        expect_path(
            &cluster,
            cluster.pod("a").v4(9090),
            &other,
            Reached::App,
            "other port",
        )
        .await;
        drop(agent);

        // A restarted agent takes the pinned program over: enforcement is back.
        let mut agent = NodeAgent::start(&path).expect("agent again");
        expect_path(&cluster, v4, &app, Reached::Agent, "restarted").await;
        expect_path(&cluster, v6, &app, Reached::Agent, "restarted").await;

        // SIGTERM: exits 0, and the pod stays refused.
        agent.signal("TERM");
        let status = agent.wait_exit(Duration::from_secs(10)).expect("exits");
        assert_eq!(status.code(), Some(0), "{}", agent.log());
        expect_path(&cluster, v4, &app, Reached::Refused, "stopped, fail closed").await;
        drop(agent);

        // Removing the pod from the configuration releases it for good: pins removed.
        let agent = NodeAgent::start(&path).expect("agent, third");
        expect_path(&cluster, v4, &app, Reached::Agent, "third start").await;
        let mut none = closed.clone();
        none.pods.clear();
        none.write(&path);
        agent.wait_generation(2, SETTLE).await.unwrap();
        expect_path(&cluster, v4, &app, Reached::App, "pod removed").await;
        assert!(!pins.exists(), "pins removed with the pod");
    })
    .await;
}
