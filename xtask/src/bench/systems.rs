//! The five systems under test, each in its own pod namespace with its own copy of the
//! reference backend (nginx serving a static 1 KiB file, bench/backend.conf):
//!
//! | system | what the client connects to |
//! |---|---|
//! | direct | the backend: :8080, :8443 (TLS), :8082 (h2c) |
//! | proxy | `cors-agent proxy` in the pod: :9080 (HTTP/1.1 + h2c), :9443 (TLS, a 2nd process) |
//! | node | the backend's :8080 and :8443, steered by sk_lookup to `cors-agent node` (host ns) |
//! | nginx | nginx with bench/nginx-cors.conf in the pod: :9080, :9443 (TLS), :9082 (h2c) |
//! | iptables | the backend's :8080/:8443, REDIRECTed to `cors-agent proxy` :15001/:15443 |
//!
//! Every proxy forwards to the backend over the pod's loopback (node mode: to the pod's own
//! address, from inside the pod) and is pinned to the server cores with the backend.

use std::collections::BTreeMap;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use super::load::{self, Listener, Workload};
use super::procs::Proc;
use super::topo::{Topology, command_in, in_netns, netns_path};

/// How long a server may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SystemKind {
    Direct,
    Proxy,
    Node,
    Nginx,
    Iptables,
}

impl SystemKind {
    pub const ALL: [SystemKind; 5] = [
        SystemKind::Direct,
        SystemKind::Proxy,
        SystemKind::Node,
        SystemKind::Nginx,
        SystemKind::Iptables,
    ];

    /// Also the pod namespace's label.
    pub fn label(self) -> &'static str {
        match self {
            SystemKind::Direct => "direct",
            SystemKind::Proxy => "proxy",
            SystemKind::Node => "node",
            SystemKind::Nginx => "nginx",
            SystemKind::Iptables => "iptables",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            SystemKind::Direct => "direct (no proxy)",
            SystemKind::Proxy => "cors-agent proxy",
            SystemKind::Node => "cors-agent node (sk_lookup)",
            SystemKind::Nginx => "nginx + CORS config",
            SystemKind::Iptables => "iptables REDIRECT + cors-agent",
        }
    }

    /// Whether the system answers preflights (the backend alone does not).
    pub fn has_cors(self) -> bool {
        self != SystemKind::Direct
    }

    fn port(self, listener: Listener) -> u16 {
        match (self, listener) {
            (SystemKind::Proxy | SystemKind::Nginx, Listener::Http1) => 9080,
            (SystemKind::Proxy | SystemKind::Nginx, Listener::Tls) => 9443,
            (SystemKind::Proxy, Listener::H2c) => 9080,
            (SystemKind::Nginx, Listener::H2c) => 9082,
            (SystemKind::Direct, Listener::H2c) => 8082,
            (_, Listener::Tls) => 8443,
            (_, _) => 8080,
        }
    }
}

/// What every system is started with.
pub struct Env {
    /// The run's working directory (configs, logs, nginx prefixes).
    pub dir: PathBuf,
    /// Files the agents watch (resources, certificates, node.yaml) and nothing else.
    pub config: PathBuf,
    /// The release `cors-agent` binary.
    pub agent: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// bench/routes.yaml, copied into `config`.
    pub routes: PathBuf,
    /// The backend's document root with the 1 KiB file.
    pub www: PathBuf,
    /// Cores for the proxies and the backend.
    pub cpus: Option<String>,
    pub client_ns: String,
}

impl Env {
    fn server(&self, ns: Option<&str>, program: &Path) -> Command {
        command_in(ns, self.cpus.as_deref(), program)
    }

    fn agent_command(&self, ns: Option<&str>) -> Command {
        let mut cmd = self.server(ns, &self.agent);
        // The default, stated: one access-log line per request, as deployed.
        cmd.env("RUST_LOG", "info").env("NO_COLOR", "1");
        cmd
    }
}

pub struct System {
    pub kind: SystemKind,
    pod_ns: String,
    pod_ip: Ipv4Addr,
    backend: Proc,
    /// The proxy's processes; proxy and iptables run a second agent for TLS (`--tls-cert`
    /// makes a listener TLS-only).
    fronts: Vec<Proc>,
}

impl System {
    pub fn start(kind: SystemKind, env: &Env, topo: &Topology) -> Result<Self> {
        let pod = topo.pod(kind.label())?;
        let backend = start_backend(env, kind, &pod.ns)?;
        let mut system = Self {
            kind,
            pod_ns: pod.ns.clone(),
            pod_ip: pod.ip,
            backend,
            fronts: Vec::new(),
        };
        // Every backend listens on :8080 (node and iptables steer it only later).
        let app = SocketAddr::from((pod.ip, 8080));
        wait_listening(env, app, &mut system.backend)?;
        system.start_fronts(env)?;
        Ok(system)
    }

    /// (Re)starts the proxy processes: fresh ones, for the memory scenario.
    pub fn start_fronts(&mut self, env: &Env) -> Result<()> {
        self.stop_fronts();
        let fronts = match self.kind {
            SystemKind::Direct => Vec::new(),
            SystemKind::Proxy => self.start_agent_pair(env, 9080, 9443)?,
            SystemKind::Iptables => {
                let fronts = self.start_agent_pair(env, 15001, 15443)?;
                redirect(&self.pod_ns, 8080, 15001)?;
                redirect(&self.pod_ns, 8443, 15443)?;
                fronts
            }
            SystemKind::Nginx => vec![start_nginx_cors(env, &self.pod_ns, self.pod_ip)?],
            SystemKind::Node => {
                let pods = [NodePod::bench(&self.pod_ns)];
                vec![start_node(env, "node-agent", &pods)?]
            }
        };
        self.fronts = fronts;
        Ok(())
    }

    pub fn stop_fronts(&mut self) {
        for mut f in self.fronts.drain(..) {
            f.stop();
        }
        if self.kind == SystemKind::Iptables {
            // Rules without a listener behind them would refuse connections.
            let _ = iptables(&self.pod_ns, &["-t", "nat", "-F", "PREROUTING"]);
        }
    }

    fn start_agent_pair(&self, env: &Env, plain: u16, tls: u16) -> Result<Vec<Proc>> {
        let mut out = Vec::new();
        for (port, with_tls) in [(plain, false), (tls, true)] {
            let listen = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
            let mut p = start_agent_proxy(env, &self.pod_ns, listen, with_tls)?;
            wait_listening(env, SocketAddr::from((self.pod_ip, port)), &mut p)?;
            out.push(p);
        }
        Ok(out)
    }

    pub fn addr(&self, listener: Listener) -> SocketAddr {
        SocketAddr::from((self.pod_ip, self.kind.port(listener)))
    }

    /// The process serving `listener`'s connections (none for direct).
    pub fn front(&self, listener: Listener) -> Option<&Proc> {
        let two = matches!(self.kind, SystemKind::Proxy | SystemKind::Iptables);
        if two && listener == Listener::Tls {
            self.fronts.get(1)
        } else {
            self.fronts.first()
        }
    }

    pub fn front_mut(&mut self, listener: Listener) -> Option<&mut Proc> {
        let two = matches!(self.kind, SystemKind::Proxy | SystemKind::Iptables);
        if two && listener == Listener::Tls {
            self.fronts.get_mut(1)
        } else {
            self.fronts.first_mut()
        }
    }

    pub fn pod_ns(&self) -> &str {
        &self.pod_ns
    }

    pub fn backend(&self) -> &Proc {
        &self.backend
    }

    /// Fails unless every process of the system still runs.
    pub fn ensure_running(&mut self) -> Result<()> {
        self.backend.ensure_running()?;
        for f in &mut self.fronts {
            f.ensure_running()?;
        }
        Ok(())
    }

    /// One request of workload `w` with curl from the client namespace, checked: status,
    /// body size and the CORS answer. A system that answers wrongly is not measured.
    pub fn verify(&self, w: Workload, env: &Env) -> Result<()> {
        let reply = curl(env, w, self.addr(w.listener()))?;
        let context = || format!("{} {}: {}", self.kind.label(), w.id(), reply.raw);
        ensure!((200..300).contains(&reply.status), "status: {}", context());
        if w != Workload::Preflight {
            ensure!(reply.size == 1024, "body size: {}", context());
        }
        if !self.kind.has_cors() {
            ensure!(
                !reply.headers.contains_key("access-control-allow-origin"),
                "direct must not answer CORS: {}",
                context()
            );
            return Ok(());
        }
        let header = |name: &str| reply.headers.get(name).map(String::as_str).unwrap_or("");
        ensure!(
            header("access-control-allow-origin") == load::ORIGIN,
            "allow-origin: {}",
            context()
        );
        ensure!(
            header("access-control-allow-credentials") == "true",
            "credentials: {}",
            context()
        );
        ensure!(
            header("vary").to_ascii_lowercase().contains("origin"),
            "vary: {}",
            context()
        );
        if w == Workload::Preflight {
            ensure!(
                header("access-control-allow-methods").contains("GET"),
                "allow-methods: {}",
                context()
            );
        }
        Ok(())
    }
}

impl Drop for System {
    fn drop(&mut self) {
        self.stop_fronts();
    }
}

/// The backend for `kind`: every system's listeners are plain HTTP/1.1 on :8080; direct
/// also terminates TLS and h2c itself; node mode's TLS port is plain (the agent terminates
/// TLS and forwards to the original port).
fn start_backend(env: &Env, kind: SystemKind, ns: &str) -> Result<Proc> {
    let listens: &[&str] = match kind {
        SystemKind::Direct => &["8080", "8443 ssl", "8082 http2"],
        SystemKind::Node => &["8080", "8443"],
        _ => &["8080"],
    };
    let listen: String = listens
        .iter()
        .map(|l| format!("        listen {l};\n"))
        .collect();
    let dir = env.dir.join(format!("backend-{}", kind.label()));
    let vars = [("listen", listen.trim_end().to_owned())];
    let conf = render_nginx(
        env,
        &dir,
        include_str!("../../../bench/backend.conf"),
        &vars,
    )?;
    start_nginx(env, ns, &dir, &conf, "backend")
}

fn start_nginx_cors(env: &Env, ns: &str, ip: Ipv4Addr) -> Result<Proc> {
    let dir = env.dir.join("nginx-cors");
    let conf = render_nginx(
        env,
        &dir,
        include_str!("../../../bench/nginx-cors.conf"),
        &[("ip", ip.to_string())],
    )?;
    let mut p = start_nginx(env, ns, &dir, &conf, "nginx-cors")?;
    wait_listening(env, SocketAddr::from((ip, 9080)), &mut p)?;
    Ok(p)
}

/// Writes an nginx config from a bench/ template into its own prefix folder `dir`.
fn render_nginx(env: &Env, dir: &Path, template: &str, vars: &[(&str, String)]) -> Result<PathBuf> {
    fs::create_dir_all(dir.join("tmp")).with_context(|| format!("creating {}", dir.display()))?;
    let mut text = template.to_owned();
    let common = [
        ("dir", dir.display().to_string()),
        ("www", env.www.display().to_string()),
        ("cert", env.cert.display().to_string()),
        ("key", env.key.display().to_string()),
    ];
    for (name, value) in vars.iter().cloned().chain(common) {
        text = text.replace(&format!("{{{{{name}}}}}"), &value);
    }
    if let Some(at) = text.find("{{") {
        let name: String = text[at..].chars().take_while(|&c| c != '}').collect();
        bail!("nginx template: nothing fills {name}}}}}");
    }
    let path = dir.join("nginx.conf");
    fs::write(&path, text)?;
    Ok(path)
}

fn start_nginx(env: &Env, ns: &str, dir: &Path, conf: &Path, name: &str) -> Result<Proc> {
    let mut cmd = env.server(Some(ns), Path::new("nginx"));
    // -e: errors before the config is read go to the prefix too, not to /var/log/nginx.
    cmd.arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(conf)
        .arg("-e")
        .arg(dir.join("error.log"));
    Proc::spawn(name, &mut cmd, &dir.join("stderr.log"))
}

fn start_agent_proxy(env: &Env, ns: &str, listen: SocketAddr, tls: bool) -> Result<Proc> {
    let mut cmd = env.agent_command(Some(ns));
    cmd.args(["proxy", "--listen", &listen.to_string()])
        .args(["--upstream", "127.0.0.1:8080", "-f"])
        .arg(&env.routes);
    if tls {
        cmd.arg("--tls-cert")
            .arg(&env.cert)
            .arg("--tls-key")
            .arg(&env.key);
    }
    let name = format!(
        "agent-{}-{}",
        ns.rsplit('-').next().unwrap_or(ns),
        listen.port()
    );
    Proc::spawn(&name, &mut cmd, &env.dir.join(format!("{name}.log")))
}

/// A pod of node.yaml.
pub struct NodePod {
    pub name: String,
    pub netns: PathBuf,
    /// Steer :8080 (plain) and :8443 (TLS terminated by the agent) when true; only :8080
    /// otherwise.
    pub tls: bool,
}

impl NodePod {
    fn bench(ns: &str) -> Self {
        Self {
            name: "bench".into(),
            netns: netns_path(ns),
            tls: true,
        }
    }
}

/// `cors-agent node` in the host namespace (as a hostNetwork DaemonSet pod), for `pods`.
pub fn start_node(env: &Env, name: &str, pods: &[NodePod]) -> Result<Proc> {
    let config = env.config.join(format!("{name}.yaml"));
    fs::write(&config, node_yaml(env, pods)).context("writing node.yaml")?;
    let mut cmd = env.agent_command(None);
    cmd.arg("node").arg("--config").arg(&config);
    let mut p = Proc::spawn(name, &mut cmd, &env.dir.join(format!("{name}.log")))?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        p.ensure_running()?;
        let log = fs::read_to_string(&p.log).unwrap_or_default();
        if log.contains("cors-agent node ready") {
            return Ok(p);
        }
        if Instant::now() > deadline {
            bail!("cors-agent node not ready within {START_TIMEOUT:?}:\n{log}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn node_yaml(env: &Env, pods: &[NodePod]) -> String {
    let q = |p: &Path| serde_json::Value::from(p.display().to_string()).to_string();
    let mut y = format!("resources: [{}]\npods:\n", q(&env.routes));
    for pod in pods {
        y += &format!(
            "- name: {}\n  netns: {}\n  ports:\n  - port: 8080\n",
            pod.name,
            q(&pod.netns)
        );
        if pod.tls {
            y += &format!(
                "  - port: 8443\n    tls: {{cert: {}, key: {}}}\n",
                q(&env.cert),
                q(&env.key)
            );
        }
    }
    y
}

/// The sidecar-mesh way in: `nat PREROUTING` REDIRECT of the app port to the agent, in the
/// pod's namespace (loopback traffic, the agent's own to the app, is not redirected).
fn redirect(ns: &str, from: u16, to: u16) -> Result<()> {
    iptables(
        ns,
        &[
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "--dport",
            &from.to_string(),
            "-j",
            "REDIRECT",
            "--to-ports",
            &to.to_string(),
        ],
    )
}

fn iptables(ns: &str, args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "iptables", "-w"])
        .args(args)
        .output()
        .context("running iptables")?;
    ensure!(
        out.status.success(),
        "iptables {} in {ns}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Waits until `addr` accepts connections from the client namespace.
fn wait_listening(env: &Env, addr: SocketAddr, p: &mut Proc) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    let client = netns_path(&env.client_ns);
    loop {
        p.ensure_running()?;
        let connected = in_netns(&client, || {
            Ok(TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())
        })?;
        if connected {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{} not listening on {addr} within {START_TIMEOUT:?}",
                p.name
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

struct Reply {
    status: u16,
    size: u64,
    headers: BTreeMap<String, String>,
    raw: String,
}

/// One request with curl from the client namespace.
fn curl(env: &Env, w: Workload, addr: SocketAddr) -> Result<Reply> {
    let mut cmd = command_in(Some(&env.client_ns), None, Path::new("curl"));
    cmd.args(["-sS", "--max-time", "5", "-o", "/dev/null", "-D", "-"])
        .args([
            "-w",
            "\nBENCH %{http_code} %{size_download}\n",
            "-X",
            w.method(),
        ]);
    match w.listener() {
        Listener::Tls => cmd.arg("-k"),
        Listener::H2c => cmd.arg("--http2-prior-knowledge"),
        Listener::Http1 => cmd.arg("--http1.1"),
    };
    for (name, value) in w.headers() {
        cmd.args(["-H", &format!("{name}: {value}")]);
    }
    let scheme = if w.listener() == Listener::Tls {
        "https"
    } else {
        "http"
    };
    let out = cmd
        .arg(format!("{scheme}://{addr}{}", load::PATH))
        .output()
        .context("running curl")?;
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "curl {addr}: {}{raw}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_curl(raw)
}

fn parse_curl(raw: String) -> Result<Reply> {
    let (status, size) = raw
        .lines()
        .find_map(|l| l.strip_prefix("BENCH "))
        .and_then(|l| l.split_once(' '))
        .and_then(|(s, n)| Some((s.parse().ok()?, n.trim().parse().ok()?)))
        .with_context(|| format!("unexpected curl output: {raw}"))?;
    let headers = raw
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(Reply {
        status,
        size,
        headers,
        raw,
    })
}
