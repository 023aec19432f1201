//! Real network namespaces for steering tests (Linux, root).
//!
//! [`Topology`] builds a "pod" namespace and a "client" namespace joined by a
//! veth pair, with IPv4 (10.231.0.0/30) and ULA IPv6 (fd00:c0de:231::/64)
//! addresses that exist only inside those namespaces. Everything is removed
//! on drop, also when a test fails. Names carry a random suffix, so parallel
//! tests and leftovers from killed runs do not collide.

use std::{
    collections::hash_map::RandomState,
    hash::{BuildHasher, Hasher},
    io::{self, BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use cors_agent::steer::NetNs;

/// Panics (loudly, never skips) unless running as root: these tests create
/// namespaces, load eBPF programs and mount bpffs.
pub fn require_root() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?");
    assert_eq!(
        euid, "0",
        "steering tests need root (network namespaces, eBPF, bpffs); effective uid is {euid}. \
         Run them as root, e.g. `sudo -E cargo test -p cors-agent-tests --test steer_netns`."
    );
}

/// A random hex string (std only: RandomState is randomly keyed per process).
pub fn random_suffix() -> String {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    format!("{:08x}", h.finish() as u32)
}

/// Runs `ip ARGS`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (iproute2 must be installed)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A pod namespace and a client namespace joined by a veth pair.
#[derive(Debug)]
pub struct Topology {
    pub pod_ns: String,
    pub client_ns: String,
    pub pod_v4: Ipv4Addr,
    pub client_v4: Ipv4Addr,
    pub pod_v6: Ipv6Addr,
    pub client_v6: Ipv6Addr,
}

impl Topology {
    /// Builds the topology; `pod_ipv6 = false` disables IPv6 in the pod
    /// namespace entirely (an IPv4-only pod).
    pub fn new(pod_ipv6: bool) -> Result<Self> {
        let sfx = random_suffix();
        let topo = Self {
            pod_ns: format!("cors-steer-{sfx}-pod"),
            client_ns: format!("cors-steer-{sfx}-cli"),
            pod_v4: Ipv4Addr::new(10, 231, 0, 1),
            client_v4: Ipv4Addr::new(10, 231, 0, 2),
            pod_v6: "fd00:c0de:231::1".parse().expect("literal"),
            client_v6: "fd00:c0de:231::2".parse().expect("literal"),
        };
        // From here on Drop cleans up whatever was created.
        ip(&["netns", "add", &topo.pod_ns])?;
        ip(&["netns", "add", &topo.client_ns])?;
        let (pod_if, cli_if) = (format!("cp{sfx}"), format!("cc{sfx}"));
        // Created directly inside the namespaces: nothing ever appears in the
        // host namespace.
        ip(&[
            "link",
            "add",
            "name",
            &pod_if,
            "netns",
            &topo.pod_ns,
            "type",
            "veth",
            "peer",
            "name",
            &cli_if,
            "netns",
            &topo.client_ns,
        ])?;
        if !pod_ipv6 {
            sysctl(&topo.pod_ns, "net.ipv6.conf.all.disable_ipv6", "1")?;
            sysctl(&topo.pod_ns, "net.ipv6.conf.default.disable_ipv6", "1")?;
            sysctl(&topo.pod_ns, "net.ipv6.conf.lo.disable_ipv6", "1")?;
            sysctl(
                &topo.pod_ns,
                &format!("net.ipv6.conf.{pod_if}.disable_ipv6"),
                "1",
            )?;
        }
        for (ns, dev, v4, v6) in [
            (&topo.pod_ns, &pod_if, topo.pod_v4, topo.pod_v6),
            (&topo.client_ns, &cli_if, topo.client_v4, topo.client_v6),
        ] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "addr", "add", &format!("{v4}/30"), "dev", dev])?;
            if pod_ipv6 || ns == &topo.client_ns {
                // nodad: usable at once instead of after duplicate detection.
                ip(&[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{v6}/64"),
                    "dev",
                    dev,
                    "nodad",
                ])?;
            }
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(topo)
    }

    pub fn pod_netns_path(&self) -> PathBuf {
        netns_path(&self.pod_ns)
    }

    pub fn client_netns_path(&self) -> PathBuf {
        netns_path(&self.client_ns)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Deleting a namespace destroys its end of the veth pair (and the
        // other end with it) and detaches sk_lookup programs attached to it.
        let _ = ip(&["netns", "del", &self.pod_ns]);
        let _ = ip(&["netns", "del", &self.client_ns]);
    }
}

fn netns_path(name: &str) -> PathBuf {
    Path::new("/var/run/netns").join(name)
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

/// A private bpffs mount in a temporary directory, unmounted on drop (which
/// also drops everything pinned in it).
#[derive(Debug)]
pub struct BpffsMount {
    pub path: PathBuf,
}

impl BpffsMount {
    pub fn new() -> Result<Self> {
        let path = std::env::temp_dir().join(format!("cors-steer-bpffs-{}", random_suffix()));
        std::fs::create_dir_all(&path)?;
        let mount = Self { path };
        let out = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&mount.path)
            .output()
            .context("running mount")?;
        if !out.status.success() {
            bail!(
                "mount -t bpf failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(mount)
    }
}

impl Drop for BpffsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).output();
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// A plain TCP "app" inside a namespace: for each connection on any of its
/// ports it reads one line and answers `app:<port>:<line>\n`, then closes.
/// Stops on drop (and after at most `MAX_LIFETIME` in any case).
pub struct App {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<io::Result<()>>>,
}

const MAX_LIFETIME: Duration = Duration::from_secs(300);
const IO_TIMEOUT: Duration = Duration::from_secs(3);

impl App {
    /// Starts the app in the namespace at `netns`, listening on `[::]:port`
    /// (dual-stack) or `0.0.0.0:port` when `ipv6` is false.
    pub fn start(netns: &Path, ports: &[u16], ipv6: bool) -> Result<Self> {
        let ns = NetNs::open(netns).with_context(|| format!("opening {}", netns.display()))?;
        // Bind in the namespace now, so the app is ready when start returns.
        let listeners = ns.run(|| {
            ports
                .iter()
                .map(|&p| {
                    let addr: SocketAddr = if ipv6 {
                        (Ipv6Addr::UNSPECIFIED, p).into()
                    } else {
                        (Ipv4Addr::UNSPECIFIED, p).into()
                    };
                    let l = TcpListener::bind(addr)?;
                    l.set_nonblocking(true)?;
                    Ok((p, l))
                })
                .collect::<io::Result<Vec<_>>>()
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = thread::Builder::new()
            .name("test-app".into())
            .spawn(move || serve_app(listeners, stop2))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_app(listeners: Vec<(u16, TcpListener)>, stop: Arc<AtomicBool>) -> io::Result<()> {
    let deadline = Instant::now() + MAX_LIFETIME;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let mut idle = true;
        for (port, l) in &listeners {
            match l.accept() {
                Ok((stream, _)) => {
                    idle = false;
                    let _ = answer(stream, *port);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => {}
            }
        }
        if idle {
            thread::sleep(Duration::from_millis(2));
        }
    }
    Ok(())
}

fn answer(stream: TcpStream, port: u16) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(&stream).take(1024).read_line(&mut line)?;
    let mut s = &stream;
    s.write_all(format!("app:{port}:{}\n", line.trim_end()).as_bytes())?;
    s.shutdown(Shutdown::Both)
}

/// From inside the namespace at `netns`: connects to `addr`, sends `msg` and
/// a newline, half-closes, and returns everything read until EOF. Bounded
/// by timeouts. Blocking: call from `spawn_blocking` in async tests.
pub fn exchange(netns: &Path, addr: SocketAddr, msg: &str) -> io::Result<String> {
    let ns = NetNs::open(netns)?;
    // Only the socket must be created in the namespace; do all of it there
    // for simplicity (std sockets are blocking).
    ns.run(|| {
        let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        s.write_all(format!("{msg}\n").as_bytes())?;
        s.shutdown(Shutdown::Write)?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
}

/// `exchange` from a blocking thread, for async tests.
pub async fn exchange_async(netns: PathBuf, addr: SocketAddr, msg: &str) -> io::Result<String> {
    let msg = msg.to_owned();
    tokio::task::spawn_blocking(move || exchange(&netns, addr, &msg))
        .await
        .map_err(io::Error::other)?
}

/// Convenience: a socket address from an IP and port.
pub fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}
