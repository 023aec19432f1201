//! A small cluster made of network namespaces, and the `cors-agent node` binary running
//! against it, for the node-mode suites (Linux, root).
//!
//! ```text
//!   client ns  eth0 10.232.0.2   fd00:232::2  ──┐
//!   pod ns "a" eth0 10.232.0.10  fd00:232::a  ──┤ veth pairs, joined by br0 in a bridge ns
//!   pod ns "b" eth0 10.232.0.11  fd00:232::b  ──┘
//! ```
//!
//! The bridge has its own namespace, so nothing is created in the host's, and the addresses
//! exist only inside these namespaces (every cluster has its own bridge, so parallel tests may
//! reuse them). Namespace names carry a random suffix; everything is removed on drop, also when
//! a test fails. The agent itself runs in the test's own namespace, as a DaemonSet pod with
//! `hostNetwork` would, and reaches the pods only through the steering program.
//!
//! Client requests are made from a thread that entered the client namespace, with its own
//! current-thread runtime: the tokio sockets it creates live there (a socket keeps the
//! namespace of the thread that created it), and no `.await` of the test's runtime ever runs
//! in a foreign namespace.

use std::collections::BTreeMap;
use std::fs::File;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use cors_agent::steer::NetNs;
use rustls::ClientConfig;

use crate::agent::{binary, logged_addr, poll};
use crate::backend::{Backend, Reply};
use crate::certs::write_atomically;
use crate::client::{self, Proto, Req};
use crate::netns::{ip, random_suffix};

/// One namespace of the cluster.
#[derive(Clone, Debug)]
pub struct Member {
    /// The `ip netns` name.
    pub ns: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    /// Index of its veth end on the bridge (`p<index>`).
    index: u16,
}

impl Member {
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.ns)
    }

    pub fn v4(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.v4, port))
    }

    pub fn v6(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.v6, port))
    }
}

pub struct Cluster {
    sfx: String,
    bridge_ns: String,
    client: Member,
    pods: BTreeMap<String, Member>,
    created: Vec<String>,
}

impl Cluster {
    /// A client namespace and one namespace per pod name, all on one bridge.
    pub fn new(pods: &[&str]) -> Result<Self> {
        let sfx = random_suffix();
        let mut cluster = Self {
            bridge_ns: format!("cors-node-{sfx}-br"),
            client: Member {
                ns: format!("cors-node-{sfx}-client"),
                v4: Ipv4Addr::new(10, 232, 0, 2),
                v6: Ipv6Addr::new(0xfd00, 0x232, 0, 0, 0, 0, 0, 2),
                index: 2,
            },
            sfx,
            pods: BTreeMap::new(),
            created: Vec::new(),
        };
        // From here on Drop removes whatever was created.
        ip(&["netns", "add", &cluster.bridge_ns])?;
        cluster.created.push(cluster.bridge_ns.clone());
        let br = cluster.bridge_ns.clone();
        ip(&["-n", &br, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &br,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            // No multicast snooping: IPv6 neighbour discovery must reach every port at once.
            "mcast_snooping",
            "0",
        ])?;
        ip(&["-n", &br, "link", "set", "br0", "up"])?;
        let client = cluster.client.clone();
        cluster.join(&client)?;
        for (i, name) in pods.iter().enumerate() {
            let index = 10 + u16::try_from(i)?;
            let member = Member {
                ns: format!("cors-node-{}-{name}", cluster.sfx),
                v4: Ipv4Addr::new(10, 232, 0, u8::try_from(index)?),
                v6: Ipv6Addr::new(0xfd00, 0x232, 0, 0, 0, 0, 0, index),
                index,
            };
            cluster.join(&member)?;
            cluster.pods.insert(name.to_string(), member);
        }
        Ok(cluster)
    }

    /// Creates `m`'s namespace and plugs it into the bridge.
    fn join(&mut self, m: &Member) -> Result<()> {
        ip(&["netns", "add", &m.ns])?;
        self.created.push(m.ns.clone());
        let port = format!("p{}", m.index);
        ip(&[
            "link",
            "add",
            "name",
            "eth0",
            "netns",
            &m.ns,
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            &self.bridge_ns,
        ])?;
        ip(&[
            "-n",
            &self.bridge_ns,
            "link",
            "set",
            &port,
            "master",
            "br0",
            "up",
        ])?;
        ip(&["-n", &m.ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &m.ns,
            "addr",
            "add",
            &format!("{}/24", m.v4),
            "dev",
            "eth0",
        ])?;
        // nodad: usable at once instead of after duplicate address detection.
        ip(&[
            "-n",
            &m.ns,
            "addr",
            "add",
            &format!("{}/64", m.v6),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ip(&["-n", &m.ns, "link", "set", "eth0", "up"])?;
        Ok(())
    }

    pub fn client(&self) -> &Member {
        &self.client
    }

    /// The pod called `name` (as given to [`Cluster::new`]).
    pub fn pod(&self, name: &str) -> &Member {
        self.pods
            .get(name)
            .unwrap_or_else(|| panic!("no pod {name:?} in this cluster"))
    }

    /// Deletes pod `name`'s namespace and makes a new one at the same path with the same
    /// addresses, as when a pod is replaced and its IP reused.
    pub fn recreate_pod(&mut self, name: &str) -> Result<()> {
        let member = self.pod(name).clone();
        // Deleting the bridge end removes the pair: the old namespace (which the agent may
        // still hold open) keeps no interface on the bridge.
        ip(&[
            "-n",
            &self.bridge_ns,
            "link",
            "del",
            &format!("p{}", member.index),
        ])?;
        ip(&["netns", "del", &member.ns])?;
        self.created.retain(|ns| ns != &member.ns);
        self.join(&member)?;
        // The new interface has a new MAC address. Forget the old one everywhere, as the new
        // pod's gratuitous ARP would make its neighbours do; otherwise they keep sending to
        // the old address for seconds.
        let others = std::iter::once(&self.client).chain(self.pods.values());
        for m in others.filter(|m| m.ns != member.ns) {
            ip(&["-n", &m.ns, "neigh", "flush", "all"])?;
        }
        Ok(())
    }

    /// Starts the recording app in pod `pod`, listening on `[::]:port` (both families). Call
    /// it from within the test's tokio runtime, which then serves it.
    pub fn start_app(&self, pod: &str, port: u16, reply: Reply) -> Result<Backend> {
        let ns = NetNs::open(self.pod(pod).netns_path())?;
        let listener = ns.run(|| TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)))?;
        Ok(Backend::start_on(listener, reply)?)
    }

    /// Runs `f`'s future to completion on a thread inside the client namespace.
    pub async fn from_client<F, Fut, T>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T>>,
        T: Send + 'static,
    {
        let path = self.client.netns_path();
        tokio::task::spawn_blocking(move || {
            let ns = NetNs::open(&path)?;
            ns.run(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                Ok(runtime.block_on(f()))
            })?
        })
        .await?
    }

    /// Sends `req` from the client namespace (see [`client::send`]).
    pub async fn send(
        &self,
        proto: Proto,
        addr: SocketAddr,
        tls: Option<&Arc<ClientConfig>>,
        req: &Req,
    ) -> Result<client::Reply> {
        let (tls, req) = (tls.cloned(), req.clone());
        self.from_client(move || async move { client::send(proto, addr, tls.as_ref(), &req).await })
            .await
    }

    /// Opens (and closes) a TCP connection from the client namespace.
    pub async fn connect(&self, addr: SocketAddr) -> io::Result<()> {
        let result = self
            .from_client(move || async move {
                let connect = tokio::net::TcpStream::connect(addr);
                Ok(
                    match tokio::time::timeout(Duration::from_secs(3), connect).await {
                        Ok(r) => r.map(drop),
                        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect")),
                    },
                )
            })
            .await;
        result.map_err(io::Error::other)?
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Deleting the bridge namespace destroys the bridge ends of every veth pair, and with
        // them the other ends.
        for ns in self.created.iter().rev() {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// `node.yaml`, as the suites write it.
#[derive(Clone, Debug, Default)]
pub struct NodeConfig {
    pub resources: Vec<PathBuf>,
    pub unmatched_preflights: Option<String>,
    pub fail_mode: Option<String>,
    pub pin_dir: Option<PathBuf>,
    pub pods: Vec<PodEntry>,
}

#[derive(Clone, Debug)]
pub struct PodEntry {
    pub name: String,
    pub netns: PathBuf,
    pub ports: Vec<PortEntry>,
}

#[derive(Clone, Debug)]
pub struct PortEntry {
    pub port: u16,
    pub service: Option<String>,
    pub tls: Option<(PathBuf, PathBuf)>,
}

impl PortEntry {
    pub fn new(port: u16) -> Self {
        Self {
            port,
            service: None,
            tls: None,
        }
    }

    pub fn service(mut self, service: &str) -> Self {
        self.service = Some(service.into());
        self
    }

    pub fn tls(mut self, cert: PathBuf, key: PathBuf) -> Self {
        self.tls = Some((cert, key));
        self
    }
}

impl PodEntry {
    /// Pod `name` of `cluster`, with its namespace path.
    pub fn new(cluster: &Cluster, name: &str, ports: Vec<PortEntry>) -> Self {
        Self {
            name: name.into(),
            netns: cluster.pod(name).netns_path(),
            ports,
        }
    }
}

/// A YAML scalar: JSON strings are YAML strings, with every character escaped as needed.
fn quote(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

fn quote_path(path: &Path) -> String {
    quote(&path.display().to_string())
}

impl NodeConfig {
    pub fn to_yaml(&self) -> String {
        let mut y = String::from("resources:\n");
        for r in &self.resources {
            y += &format!("- {}\n", quote_path(r));
        }
        if let Some(u) = &self.unmatched_preflights {
            y += &format!("unmatchedPreflights: {}\n", quote(u));
        }
        if let Some(f) = &self.fail_mode {
            y += &format!("failMode: {}\n", quote(f));
        }
        if let Some(p) = &self.pin_dir {
            y += &format!("pinDir: {}\n", quote_path(p));
        }
        y += "pods:\n";
        if self.pods.is_empty() {
            y.truncate(y.len() - 1);
            y += " []\n";
        }
        for pod in &self.pods {
            y += &format!(
                "- name: {}\n  netns: {}\n  ports:\n",
                quote(&pod.name),
                quote_path(&pod.netns)
            );
            for port in &pod.ports {
                y += &format!("  - port: {}\n", port.port);
                if let Some(s) = &port.service {
                    y += &format!("    service: {}\n", quote(s));
                }
                if let Some((cert, key)) = &port.tls {
                    y += &format!(
                        "    tls: {{cert: {}, key: {}}}\n",
                        quote_path(cert),
                        quote_path(key)
                    );
                }
            }
        }
        y
    }

    /// Writes the file atomically (write, then rename), as a ConfigMap update does.
    pub fn write(&self, path: &Path) {
        write_atomically(path, &self.to_yaml());
    }
}

/// How long a node agent may take to attach its pods and be ready.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// `cors-agent node`, started as a child process with an admin listener on loopback; killed
/// when dropped.
pub struct NodeAgent {
    child: Child,
    admin: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

fn node_command(config: &Path, args: &[&str], log: &Path) -> Result<Command> {
    let mut cmd = Command::new(binary());
    cmd.arg("node")
        .arg("--config")
        .arg(config)
        .args(["--admin", "127.0.0.1:0", "--drain-timeout", "5s"])
        .args(args)
        .env("RUST_LOG", "info,cors_agent=debug")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(File::create(log.with_extension("out"))?)
        .stderr(File::create(log)?);
    Ok(cmd)
}

impl NodeAgent {
    /// Starts the agent and waits until it says it is ready.
    pub fn start(config: &Path) -> Result<Self> {
        Self::start_with(config, &[])
    }

    /// Like [`NodeAgent::start`], with extra flags.
    pub fn start_with(config: &Path, args: &[&str]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("node-agent.log");
        let mut child = node_command(config, args, &log)?
            .spawn()
            .context("start cors-agent node")?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(status) = child.try_wait()? {
                bail!("cors-agent node exited early ({status}); log:\n{text}");
            }
            if text.contains("cors-agent node ready")
                && let Some(admin) = logged_addr(&text, "admin listening", "addr=")
            {
                return Ok(Self {
                    child,
                    admin,
                    log,
                    _dir: dir,
                });
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("cors-agent node not ready within {START_TIMEOUT:?}; log:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs the agent expecting it to exit by itself; returns its status and stderr.
    pub fn run_to_exit(
        config: &Path,
        wrapper: &[&str],
        within: Duration,
    ) -> Result<(ExitStatus, String)> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("node-agent.log");
        let agent = node_command(config, &[], &log)?;
        // `wrapper` runs the agent, e.g. `setpriv --bounding-set -bpf`.
        let mut cmd = match wrapper.split_first() {
            None => agent,
            Some((program, rest)) => {
                let mut cmd = Command::new(program);
                cmd.args(rest)
                    .arg(agent.get_program())
                    .args(agent.get_args())
                    .envs(agent.get_envs().filter_map(|(k, v)| Some((k, v?))))
                    .stdin(Stdio::null())
                    .stderr(File::create(&log)?);
                cmd
            }
        };
        let mut child = cmd.spawn().context("start cors-agent node")?;
        let exited = poll(within, || matches!(child.try_wait(), Ok(Some(_))));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if !exited {
            let _ = child.kill();
            let _ = child.wait();
            bail!("cors-agent node did not exit within {within:?}; log:\n{text}");
        }
        let status = child.wait()?;
        Ok((status, text))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// Everything the agent logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (at most `within`) until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, within: Duration) -> bool {
        poll(within, || self.log().contains(needle))
    }

    /// Sends a signal by name (`TERM`, `HUP`, `KILL`) with kill(1).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits at most `within` for the agent to exit.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let child = &mut self.child;
        let mut status = None;
        poll(within, || {
            status = child.try_wait().ok().flatten();
            status.is_some()
        });
        status
    }

    pub async fn admin_get(&self, path: &str) -> Result<client::Reply> {
        client::http1(self.admin, &Req::get("localhost", path)).await
    }

    pub async fn config_dump(&self) -> Result<serde_json::Value> {
        let reply = self.admin_get("/config_dump").await?;
        serde_json::from_slice(&reply.body).context("/config_dump is not JSON")
    }

    pub async fn metrics(&self) -> Result<String> {
        let reply = self.admin_get("/metrics").await?;
        Ok(String::from_utf8_lossy(&reply.body).into_owned())
    }

    /// Waits (at most `within`) until the agent serves configuration generation `generation`
    /// or later, and returns its `/config_dump`.
    pub async fn wait_generation(
        &self,
        generation: u64,
        within: Duration,
    ) -> Result<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let dump = self.config_dump().await?;
            if dump["generation"].as_u64().unwrap_or(0) >= generation {
                return Ok(dump);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(anyhow!(
                    "generation {generation} not served within {within:?}; dump: {dump}\nlog:\n{}",
                    self.log()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The names of the agent's threads.
    pub fn threads(&self) -> Vec<String> {
        let dir = format!("/proc/{}/task", self.pid());
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| std::fs::read_to_string(e.path().join("comm")).ok())
            .map(|s| s.trim().to_owned())
            .collect()
    }

    /// What the agent's file descriptors refer to (`socket:[…]`, `anon_inode:bpf-prog`, …).
    pub fn fds(&self) -> Vec<String> {
        let dir = format!("/proc/{}/fd", self.pid());
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .map(|target| target.to_string_lossy().into_owned())
            .collect()
    }

    /// How many of the agent's file descriptors are BPF objects (programs, maps, links).
    pub fn bpf_fds(&self) -> usize {
        self.fds()
            .iter()
            .filter(|t| t.starts_with("anon_inode:bpf"))
            .count()
    }

    /// How many of the agent's file descriptors are sockets.
    pub fn sockets(&self) -> usize {
        self.fds()
            .iter()
            .filter(|t| t.starts_with("socket:"))
            .count()
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` every 50 ms until it holds or `within` passes; returns whether it held.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
