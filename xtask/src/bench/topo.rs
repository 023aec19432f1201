//! The bench's network: a client namespace (the load generator) and one pod namespace per
//! system, each joined to the client by its own veth pair, so that every system is measured
//! across the same kind of link and no system's netfilter or eBPF setup touches another's.
//!
//! ```text
//!   client ns  v<i> 10.233.<i>.2/24 ──veth── eth0 10.233.<i>.1/24  pod ns <i>
//! ```
//!
//! The addresses exist only inside these namespaces. Names carry the bench's pid, so a later
//! run can remove what a killed run left behind without touching a concurrent run's.

use std::fs::File;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;

use anyhow::{Context, Result, bail};
use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

/// Every namespace of a run is called `cxbench<pid>-<role>`.
const PREFIX: &str = "cxbench";

pub struct Pod {
    /// The `ip netns` name.
    pub ns: String,
    pub ip: Ipv4Addr,
}

pub struct Topology {
    tag: String,
    pub client: String,
    pods: Vec<(String, Pod)>,
    /// Every namespace created, for Drop.
    created: Vec<String>,
}

impl Topology {
    /// The client namespace and one pod namespace per label (`direct`, `proxy`, ...).
    pub fn new(labels: &[&str]) -> Result<Self> {
        remove_stale();
        let tag = format!("{PREFIX}{}", std::process::id());
        let mut topo = Self {
            client: format!("{tag}-client"),
            tag,
            pods: Vec::new(),
            created: Vec::new(),
        };
        topo.add_ns(&topo.client.clone())?;
        // Short connections (W3) cycle through many client ports.
        sysctl(&topo.client, "net.ipv4.ip_local_port_range", "1024 65000")?;
        for (i, label) in labels.iter().enumerate() {
            let n = u8::try_from(i + 1)?;
            topo.add_pod(label, n)?;
        }
        Ok(topo)
    }

    fn add_ns(&mut self, ns: &str) -> Result<()> {
        ip(&["netns", "add", ns])?;
        self.created.push(ns.to_owned());
        ip(&["-n", ns, "link", "set", "lo", "up"])
    }

    fn add_pod(&mut self, label: &str, n: u8) -> Result<()> {
        let pod = Pod {
            ns: format!("{}-{label}", self.tag),
            ip: Ipv4Addr::new(10, 233, n, 1),
        };
        self.add_ns(&pod.ns)?;
        let client_if = format!("v{n}");
        // Created directly inside the namespaces: nothing appears in the host's.
        ip(&[
            "link",
            "add",
            "name",
            &client_if,
            "netns",
            &self.client,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &pod.ns,
        ])?;
        let client_ip = Ipv4Addr::new(10, 233, n, 2);
        for (ns, dev, addr) in [
            (&self.client, client_if.as_str(), client_ip),
            (&pod.ns, "eth0", pod.ip),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        self.pods.push((label.to_owned(), pod));
        Ok(())
    }

    pub fn pod(&self, label: &str) -> Result<&Pod> {
        self.pods
            .iter()
            .find(|(l, _)| l == label)
            .map(|(_, p)| p)
            .with_context(|| format!("no pod namespace {label:?} in the bench topology"))
    }

    /// `n` more pod namespaces with nothing in them, to enroll in node mode (the memory
    /// scenario's 100 pods). Made with one `ip -batch` call: 100 `ip` processes are slow.
    pub fn add_bare_pods(&mut self, n: usize) -> Result<Vec<PathBuf>> {
        let names: Vec<String> = (0..n).map(|i| format!("{}-idle{i}", self.tag)).collect();
        let script: String = names.iter().map(|ns| format!("netns add {ns}\n")).collect();
        let mut child = Command::new("ip")
            .args(["-batch", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .context("running ip -batch")?;
        child
            .stdin
            .take()
            .context("ip -batch stdin")?
            .write_all(script.as_bytes())?;
        // Recorded before the status check: a partial batch is removed on drop too.
        self.created.extend(names.iter().cloned());
        let status = child.wait()?;
        if !status.success() {
            bail!("ip -batch (netns add) failed: {status}");
        }
        Ok(names.iter().map(|ns| netns_path(ns)).collect())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Deleting a namespace removes its veth end (and the peer) and detaches what was
        // attached to it.
        delete_namespaces(&self.created);
    }
}

fn delete_namespaces(names: &[String]) {
    let script: String = names.iter().map(|ns| format!("netns del {ns}\n")).collect();
    let child = Command::new("ip")
        .args(["-force", "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    if let Ok(mut child) = child {
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(script.as_bytes());
        }
        let _ = child.wait();
    }
}

/// Removes namespaces left by bench runs whose process is gone (killed runs skip Drop).
fn remove_stale() {
    let Ok(entries) = std::fs::read_dir("/var/run/netns") else {
        return;
    };
    let stale: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| {
            let pid = name
                .strip_prefix(PREFIX)
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<u32>().ok());
            pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
        })
        .collect();
    if !stale.is_empty() {
        println!(
            "removing {} namespaces left by an earlier bench run",
            stale.len()
        );
        delete_namespaces(&stale);
    }
}

pub fn netns_path(ns: &str) -> PathBuf {
    Path::new("/var/run/netns").join(ns)
}

/// Runs `ip ARGS`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    ip(&[
        "netns",
        "exec",
        ns,
        "sysctl",
        "-q",
        "-w",
        &format!("{key}={value}"),
    ])
}

/// `program` run inside namespace `ns` (when given), pinned to `cpus` (when given):
/// `ip netns exec NS taskset -c CPUS PROGRAM`. Both exec, so the child's pid is the
/// program's.
pub fn command_in(ns: Option<&str>, cpus: Option<&str>, program: &Path) -> Command {
    let mut argv: Vec<String> = Vec::new();
    if let Some(ns) = ns {
        argv.extend(["ip", "netns", "exec", ns].map(String::from));
    }
    if let Some(cpus) = cpus {
        argv.extend(["taskset", "-c", cpus].map(String::from));
    }
    argv.push(program.display().to_string());
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    cmd
}

/// Runs `f` on a thread that entered the network namespace at `path`: the sockets it creates
/// live there for good.
pub fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let ns = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    thread::scope(|s| {
        s.spawn(|| {
            move_into_link_name_space(ns.as_fd(), Some(LinkNameSpaceType::Network))
                .with_context(|| format!("entering {}", path.display()))?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("a thread in {} panicked", path.display()))?
    })
}
