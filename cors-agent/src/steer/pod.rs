//! Per-pod steering: one sk_lookup program + maps instance attached to the
//! pod's network namespace, one listener inside that namespace, and a handle
//! on the process's namespace thread for upstream connections.
//!
//! One instance per pod (rather than one shared program keyed by netns
//! cookie) because it isolates pods (a pod's port set or failure never
//! touches another), makes detach a plain drop, and gives fail-closed pods
//! their own pin directory. The cost is one verified program and one 128 KiB
//! aya-log ring buffer per pod.

use std::{
    collections::BTreeSet,
    future::Future,
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use aya::programs::links::FdLink;
use cors_common::{ListenerSlot, MAX_PORTS};
use rustix::net::{AddressFamily, SocketFlags, SocketType};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    task::JoinHandle,
};

use super::{
    ebpf::{self, Maps, PinPaths},
    error::{Result, SteerError},
    netns::{NetNs, NetnsWorker},
};

/// Default directory for fail-closed pins (one sub-directory per pod).
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/cors-agent";

/// What happens to connections on steered ports while no agent listens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// The program goes away with the agent; traffic reaches the app directly.
    #[default]
    Open,
    /// Program, maps and link are pinned and outlive the agent; connections
    /// to steered ports are refused until an agent takes over again.
    Closed,
}

impl FromStr for FailMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "open" => Ok(Self::Open),
            "closed" => Ok(Self::Closed),
            other => Err(format!(
                "unknown failMode {other:?} (expected open or closed)"
            )),
        }
    }
}

/// Options for [`PodSteering::attach_with`].
#[derive(Debug, Clone)]
pub struct SteerOptions {
    pub fail_mode: FailMode,
    /// Where fail-closed pods pin their objects (must be on bpffs).
    pub pin_root: PathBuf,
}

impl Default for SteerOptions {
    fn default() -> Self {
        Self {
            fail_mode: FailMode::Open,
            pin_root: PathBuf::from(DEFAULT_PIN_ROOT),
        }
    }
}

/// What the agent knows about one steered connection.
#[derive(Debug, Clone)]
pub struct SteeredConn {
    /// The client (source address of the connection).
    pub peer: SocketAddr,
    /// Where the client was connecting to: the pod address and app port.
    pub original_dst: SocketAddr,
    pub pod: Arc<str>,
    /// `original_dst.port()`, the steered app port.
    pub port: u16,
}

/// The agent's listeners inside a pod's network namespace: one on
/// `127.0.0.1` and, when the pod has IPv6, one on `[::1]`. They receive every
/// connection the program steers, for all of the pod's steered ports.
///
/// Why not one dual-stack socket: binding an IPv6 socket to a specific
/// address such as `::1` makes the kernel mark it IPv6-only, and
/// `bpf_sk_assign` refuses IPv6-only sockets for IPv4 lookups
/// (`-EAFNOSUPPORT`, measured on 6.18). Only a socket bound to `[::]` could
/// take both, and that would also be reachable directly on every pod
/// address. Loopback listeners are reachable only through the program (or
/// from inside the pod).
#[derive(Debug)]
pub struct SteerListener {
    v4: TcpListener,
    v6: Option<TcpListener>,
    pod: Arc<str>,
}

impl SteerListener {
    /// Accepts one steered connection (IPv4 or IPv6). The accepted socket's
    /// local address is the connection's original destination.
    pub async fn accept(&self) -> io::Result<(TcpStream, SteeredConn)> {
        let (stream, peer) = match &self.v6 {
            // `select!` polls the branches in random order: no starvation.
            Some(v6) => tokio::select! {
                r = self.v4.accept() => r?,
                r = v6.accept() => r?,
            },
            None => self.v4.accept().await?,
        };
        let original_dst = canonical(stream.local_addr()?);
        let conn = SteeredConn {
            peer: canonical(peer),
            original_dst,
            pod: self.pod.clone(),
            port: original_dst.port(),
        };
        Ok((stream, conn))
    }

    /// The listeners' own (loopback) addresses, IPv4 first.
    pub fn local_addrs(&self) -> io::Result<Vec<SocketAddr>> {
        let mut addrs = vec![self.v4.local_addr()?];
        if let Some(v6) = &self.v6 {
            addrs.push(v6.local_addr()?);
        }
        Ok(addrs)
    }

    /// Whether IPv6 connections are steered too (false when the pod's
    /// namespace has no IPv6).
    pub fn has_ipv6(&self) -> bool {
        self.v6.is_some()
    }

    /// The underlying listeners, IPv4 first.
    pub fn into_listeners(self) -> Vec<TcpListener> {
        std::iter::once(self.v4).chain(self.v6).collect()
    }
}

/// Normalises `::ffff:a.b.c.d` (should a v4-mapped address ever show up).
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Opens connections from inside a pod's network namespace. Cheap to clone;
/// it keeps the namespace open (an fd) until the `PodSteering` and every
/// clone are gone.
#[derive(Debug, Clone)]
pub struct Upstream {
    worker: Arc<NetnsWorker>,
}

impl Upstream {
    /// Connects to `original_dst` (pod address and app port) with a socket
    /// created inside the pod's namespace. The program does not steer it back
    /// to the agent: source and destination are both the pod address (or
    /// loopback).
    pub async fn connect(&self, original_dst: SocketAddr) -> io::Result<TcpStream> {
        let v6 = original_dst.is_ipv6();
        // Only socket creation runs in the namespace; connecting is async
        // and may run on any thread (a socket keeps its namespace).
        let socket = self
            .worker
            .run(move || {
                if v6 {
                    TcpSocket::new_v6()
                } else {
                    TcpSocket::new_v4()
                }
            })
            .await?;
        socket.connect(original_dst).await
    }
}

/// Steering for one pod. Dropping it stops the accept loops started with
/// [`serve`](Self::serve) and the log forwarder, and closes every fd (the
/// namespace's once every [`Upstream`] clone is gone too). With [`FailMode::Open`] that also detaches the program
/// and frees the maps. With [`FailMode::Closed`] the pinned program and maps
/// stay (the pod is then refused on steered ports until an agent attaches
/// again); call [`detach`](Self::detach) to remove them.
pub struct PodSteering {
    pod: Arc<str>,
    netns_path: PathBuf,
    ports: BTreeSet<u16>,
    fail_mode: FailMode,
    kernel: Kernel,
    program_id: Option<u32>,
    upstream: Upstream,
    log_task: Option<JoinHandle<()>>,
    serve_tasks: Vec<JoinHandle<()>>,
}

/// What the agent keeps of a loaded object. Not the [`aya::Ebpf`] itself: once the link is taken
/// out of it, the program lives on in the kernel through the link, and the maps through the
/// program and the handles taken here; aya's copy of the object (instructions, line info,
/// ~17 KiB of heap per pod) would only sit there. See [`ebpf::release`].
struct Kernel {
    link: Link,
    maps: Maps,
}

enum Link {
    /// Detached when dropped.
    Owned(#[allow(dead_code)] aya::programs::sk_lookup::SkLookupLink),
    /// Stays attached while pinned.
    Pinned { _fd: FdLink, paths: PinPaths },
}

impl std::fmt::Debug for PodSteering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodSteering")
            .field("pod", &self.pod)
            .field("netns_path", &self.netns_path)
            .field("ports", &self.ports)
            .field("fail_mode", &self.fail_mode)
            .finish_non_exhaustive()
    }
}

impl PodSteering {
    /// Steers `ports` of the pod whose network namespace is at `netns_path`
    /// to a new listener, failing open. See [`attach_with`](Self::attach_with).
    pub fn attach(
        pod: &str,
        netns_path: impl AsRef<Path>,
        ports: &[u16],
    ) -> Result<(Self, SteerListener)> {
        Self::attach_with(pod, netns_path, ports, &SteerOptions::default())
    }

    /// Steers `ports` of the pod whose network namespace is at `netns_path`
    /// to a new listener created inside that namespace.
    ///
    /// Must be called from within a Tokio runtime (the listener and the log
    /// forwarder register with it). Blocks for a few milliseconds (program
    /// verification, a thread spawn); call it from `spawn_blocking` if that
    /// matters. With [`FailMode::Closed`], objects pinned by an earlier agent
    /// for this pod are taken over: the new listener goes into the pinned map,
    /// and this build's program is attached and pinned before the previous
    /// agent's link is unpinned, so the namespace is never without a program.
    pub fn attach_with(
        pod: &str,
        netns_path: impl AsRef<Path>,
        ports: &[u16],
        opts: &SteerOptions,
    ) -> Result<(Self, SteerListener)> {
        let netns_path = netns_path.as_ref();
        let invalid = |reason: String| SteerError::InvalidInput {
            pod: pod.to_owned(),
            reason,
        };
        let pin_name = pin_dir_name(pod)
            .ok_or_else(|| invalid("pod name must be non-empty and at most 200 bytes".into()))?;
        let ports = validate_ports(ports).map_err(invalid)?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(SteerError::NoRuntime {
                pod: pod.to_owned(),
            });
        }
        ebpf::check_environment(pod)?;

        let netns = NetNs::open(netns_path).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => SteerError::NetnsNotFound {
                pod: pod.to_owned(),
                path: netns_path.to_path_buf(),
            },
            _ => SteerError::Netns {
                pod: pod.to_owned(),
                path: netns_path.to_path_buf(),
                source,
            },
        })?;
        let enter_err = |source: io::Error| {
            ebpf::permission_hint(pod, "entering the pod's network namespace", &source)
                .unwrap_or_else(|| SteerError::Netns {
                    pod: pod.to_owned(),
                    path: netns_path.to_path_buf(),
                    source,
                })
        };
        let worker = NetnsWorker::spawn(&netns).map_err(enter_err)?;
        let listener_err = |source| SteerError::Listener {
            pod: pod.to_owned(),
            path: netns_path.to_path_buf(),
            source,
        };
        // A listener must live in the pod's namespace: sk_lookup only
        // assigns sockets of the namespace the lookup runs in.
        let (std_v4, std_v6) = netns.run(create_listeners).map_err(listener_err)?;
        let v4 = TcpListener::from_std(std_v4).map_err(listener_err)?;
        let v6 = std_v6
            .map(TcpListener::from_std)
            .transpose()
            .map_err(listener_err)?;

        let pins = PinPaths::new(opts.pin_root.join(pin_name));
        let fail_closed = opts.fail_mode == FailMode::Closed;
        if fail_closed {
            pins.prepare(pod)?;
            pins.drop_incompatible_maps(pod);
        } else if pins.dir.exists() {
            // Left by an earlier fail-closed run of this pod: the old program
            // would keep refusing connections our new map does not feed.
            tracing::info!(pod, dir = %pins.dir.display(), "removing fail-closed pins (now failing open)");
            pins.remove_all().map_err(|source| SteerError::Pin {
                pod: pod.to_owned(),
                path: pins.dir.clone(),
                source,
            })?;
        }

        let (mut ebpf, mut maps) = ebpf::load(pod, fail_closed, fail_closed.then_some(&pins))?;
        let log_task = match ebpf::forward_logs(&mut ebpf, pod) {
            Ok(task) => Some(task),
            Err(e) => {
                // Steering works without logs; say so and carry on.
                tracing::warn!(pod, error = %e, "eBPF logs will not be forwarded");
                None
            }
        };
        // Fill the maps before attaching so the first steered connection
        // already finds the listener.
        ebpf::sync_ports(&mut maps, pod, &ports)?;
        ebpf::set_listener(&mut maps, pod, &v4, ListenerSlot::V4)?;
        if let Some(v6) = &v6 {
            ebpf::set_listener(&mut maps, pod, v6, ListenerSlot::V6)?;
        }
        let program_id = ebpf::program_id(&ebpf);
        let link = ebpf::attach(&mut ebpf, pod, &netns)?;
        let link = if fail_closed {
            pin_link(pod, link, &pins)?
        } else {
            Link::Owned(link)
        };
        ebpf::release(ebpf);
        tracing::info!(
            pod,
            netns = %netns_path.display(),
            ports = ?ports,
            fail_mode = ?opts.fail_mode,
            program_id,
            ipv6 = v6.is_some(),
            "steering attached"
        );

        let pod: Arc<str> = pod.into();
        let steering = Self {
            pod: pod.clone(),
            netns_path: netns_path.to_path_buf(),
            ports,
            fail_mode: opts.fail_mode,
            kernel: Kernel { link, maps },
            program_id,
            upstream: Upstream {
                worker: Arc::new(worker),
            },
            log_task,
            serve_tasks: Vec::new(),
        };
        let listener = SteerListener { v4, v6, pod };
        Ok((steering, listener))
    }

    pub fn pod(&self) -> &str {
        &self.pod
    }

    pub fn netns_path(&self) -> &Path {
        &self.netns_path
    }

    pub fn ports(&self) -> Vec<u16> {
        self.ports.iter().copied().collect()
    }

    pub fn fail_mode(&self) -> FailMode {
        self.fail_mode
    }

    /// Kernel id of this pod's sk_lookup program, for diagnostics
    /// (`bpftool prog show id N`).
    pub fn program_id(&self) -> Option<u32> {
        self.program_id
    }

    /// Replaces the set of steered ports at run time.
    pub fn set_ports(&mut self, ports: &[u16]) -> Result<()> {
        let ports = validate_ports(ports).map_err(|reason| SteerError::InvalidInput {
            pod: self.pod.to_string(),
            reason,
        })?;
        ebpf::sync_ports(&mut self.kernel.maps, &self.pod, &ports)?;
        self.ports = ports;
        Ok(())
    }

    /// The connector for this pod's upstream (the app), usable after this
    /// `PodSteering` is moved; it keeps the pod's namespace open.
    pub fn upstream(&self) -> Upstream {
        self.upstream.clone()
    }

    /// Connects to the app at `original_dst` from inside the pod's namespace.
    pub async fn connect_upstream(&self, original_dst: SocketAddr) -> io::Result<TcpStream> {
        self.upstream.connect(original_dst).await
    }

    /// Accepts connections on `listener` until this `PodSteering` is dropped
    /// or detached, calling `handler` for each on its own task. Connections
    /// already handed to `handler` are not cancelled by detaching.
    pub fn serve<H, F>(&mut self, listener: SteerListener, handler: H)
    where
        H: Fn(TcpStream, SteeredConn) -> F + Send + Sync + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let pod = self.pod.clone();
        self.serve_tasks.push(tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, conn)) => {
                        tokio::spawn(handler(stream, conn));
                    }
                    Err(e) => {
                        // Typically EMFILE/ENFILE: back off instead of spinning.
                        tracing::warn!(pod = %pod, error = %e, "accepting a steered connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }));
    }

    /// Stops steering this pod for good: like dropping, and with
    /// [`FailMode::Closed`] also removes the pinned program, link and maps,
    /// so traffic reaches the app directly.
    pub fn detach(self) -> Result<()> {
        let result = match &self.kernel.link {
            Link::Pinned { paths, .. } => paths.remove_all().map_err(|source| SteerError::Pin {
                pod: self.pod.to_string(),
                path: paths.dir.clone(),
                source,
            }),
            Link::Owned(_) => Ok(()),
        };
        tracing::info!(pod = %self.pod, "steering detached");
        drop(self);
        result
    }
}

impl Drop for PodSteering {
    fn drop(&mut self) {
        for task in self.serve_tasks.drain(..) {
            task.abort();
        }
        if let Some(task) = self.log_task.take() {
            task.abort();
        }
    }
}

/// Pins the new link next to the pod's maps, then unpins any previous
/// agent's link (see `PinPaths::link`), so the namespace always has a program.
fn pin_link(
    pod: &str,
    link: aya::programs::sk_lookup::SkLookupLink,
    pins: &PinPaths,
) -> Result<Link> {
    let pin_err = |path: PathBuf, source: io::Error| SteerError::Pin {
        pod: pod.to_owned(),
        path,
        source,
    };
    let fd: FdLink = link.into();
    let id = fd
        .info()
        .map_err(|e| pin_err(pins.dir.clone(), io::Error::other(e)))?
        .id();
    let path = pins.link(id);
    let pinned = fd
        .pin(&path)
        .map_err(|e| pin_err(path.clone(), io::Error::other(e)))?;
    pins.remove_links_except(Some(&path))
        .map_err(|e| pin_err(pins.dir.clone(), e))?;
    Ok(Link::Pinned {
        _fd: pinned.into(),
        paths: pins.clone(),
    })
}

/// Creates the listeners; runs inside the pod's namespace. IPv6 is skipped
/// when the namespace has none (no `::1`, or IPv6 disabled).
fn create_listeners() -> io::Result<(std::net::TcpListener, Option<std::net::TcpListener>)> {
    let v4 = bind_listener(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
    let v6 = match bind_listener(SocketAddr::from((Ipv6Addr::LOCALHOST, 0))) {
        Ok(l) => Some(l),
        Err(e) if e == rustix::io::Errno::ADDRNOTAVAIL || e == rustix::io::Errno::AFNOSUPPORT => {
            None
        }
        Err(e) => return Err(e.into()),
    };
    Ok((v4, v6))
}

fn bind_listener(addr: SocketAddr) -> Result<std::net::TcpListener, rustix::io::Errno> {
    let family = if addr.is_ipv6() {
        AddressFamily::INET6
    } else {
        AddressFamily::INET
    };
    let fd = rustix::net::socket_with(
        family,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?;
    rustix::net::bind(&fd, &addr)?;
    rustix::net::listen(&fd, 1024)?;
    Ok(std::net::TcpListener::from(fd))
}

fn validate_ports(ports: &[u16]) -> Result<BTreeSet<u16>, String> {
    let set: BTreeSet<u16> = ports.iter().copied().collect();
    if set.contains(&0) {
        return Err("port 0 cannot be steered".into());
    }
    if set.len() > MAX_PORTS as usize {
        return Err(format!(
            "{} ports requested, at most {MAX_PORTS} can be steered per pod",
            set.len()
        ));
    }
    Ok(set)
}

/// Directory name for a pod's pins. bpffs refuses names containing dots,
/// so everything but ASCII alphanumerics and `-` becomes `_`. Kubernetes
/// names (`namespace/name`) never contain `_` and namespaces never contain
/// `.`, so two pods cannot collide.
pub(crate) fn pin_dir_name(pod: &str) -> Option<String> {
    let name: String = pod
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    (!name.is_empty() && name.len() <= 200).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_validated() {
        assert_eq!(
            validate_ports(&[8080, 80, 8080])
                .unwrap()
                .into_iter()
                .collect::<Vec<_>>(),
            vec![80, 8080]
        );
        assert!(validate_ports(&[0]).is_err());
        let many: Vec<u16> = (1..=(MAX_PORTS as u16 + 1)).collect();
        assert!(validate_ports(&many).is_err());
        assert!(validate_ports(&[]).unwrap().is_empty());
    }

    #[test]
    fn pin_dir_names() {
        assert_eq!(
            pin_dir_name("default/web-0").as_deref(),
            Some("default_web-0")
        );
        assert_eq!(
            pin_dir_name("default/web.v2").as_deref(),
            Some("default_web_v2")
        );
        assert_eq!(pin_dir_name("../x").as_deref(), Some("___x"));
        assert_eq!(pin_dir_name("..").as_deref(), Some("__"));
        assert_eq!(pin_dir_name(""), None);
        assert_eq!(pin_dir_name(&"a".repeat(201)), None);
    }

    #[test]
    fn fail_mode_parses() {
        assert_eq!("closed".parse::<FailMode>(), Ok(FailMode::Closed));
        assert_eq!("open".parse::<FailMode>(), Ok(FailMode::Open));
        assert!("Closed".parse::<FailMode>().is_err());
        assert_eq!(FailMode::default(), FailMode::Open);
    }
}
