//! Memory: the node agent's resident set idle with one pod, with 100 enrolled pods, and with
//! 10,000 idle keep-alive connections on top (each made one request, then stays open); the
//! proxy and nginx get the same connections, for comparison. Every measurement is of a fresh
//! process, so earlier load does not count.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use super::load::{Listener, ORIGIN, PATH};
use super::procs::{Proc, rss_kib};
use super::systems::{Env, NodePod, System, SystemKind, start_node};
use super::topo::{Topology, in_netns, netns_path};

/// Time for a process's memory to settle after start-up or after the connections opened.
const SETTLE: Duration = Duration::from_millis(500);
/// Opening the idle connections may take this long in all.
const OPEN_DEADLINE: Duration = Duration::from_secs(120);
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// One memory measurement.
#[derive(Clone, Debug)]
pub struct MemEntry {
    pub system: SystemKind,
    /// Pods enrolled (node mode; 0 for the others).
    pub pods: usize,
    pub connections: usize,
    pub rss_kib: u64,
}

impl MemEntry {
    pub fn case(&self) -> String {
        let mut parts = Vec::new();
        if self.pods > 0 {
            parts.push(format!(
                "{} pod{}",
                self.pods,
                if self.pods == 1 { "" } else { "s" }
            ));
        }
        parts.push(if self.connections == 0 {
            "idle".to_owned()
        } else {
            format!("{} idle keep-alive connections", self.connections)
        });
        parts.join(", ")
    }
}

/// The scenario's size.
pub struct Scale {
    pub pods: usize,
    pub connections: usize,
}

pub fn run(
    env: &Env,
    topo: &mut Topology,
    systems: &mut [System],
    scale: &Scale,
) -> Result<Vec<MemEntry>> {
    let mut out = Vec::new();
    for system in systems.iter_mut() {
        match system.kind {
            SystemKind::Node => out.extend(node(env, topo, system, scale)?),
            SystemKind::Proxy | SystemKind::Nginx => out.extend(front(env, system, scale)?),
            _ => {}
        }
    }
    Ok(out)
}

/// The node agent: idle with one pod; then a fresh agent with `scale.pods` pods, idle and
/// with the connections.
fn node(
    env: &Env,
    topo: &mut Topology,
    system: &mut System,
    scale: &Scale,
) -> Result<Vec<MemEntry>> {
    system.stop_fronts();
    let entry = |pods, connections, rss_kib| MemEntry {
        system: SystemKind::Node,
        pods,
        connections,
        rss_kib,
    };
    let pod_netns = netns_path(system.pod_ns());
    let bench_pod = || NodePod {
        name: "bench".into(),
        netns: pod_netns.clone(),
        tls: true,
    };
    let mut out = Vec::new();
    {
        let agent = start_node(env, "mem-node-1", &[bench_pod()])?;
        out.push(entry(1, 0, settled_rss(&agent)));
    }
    let mut pods = vec![bench_pod()];
    let extra = topo.add_bare_pods(scale.pods.saturating_sub(1))?;
    pods.extend(extra.into_iter().enumerate().map(|(i, netns)| NodePod {
        name: format!("idle-{i}"),
        netns,
        tls: false,
    }));
    let mut agent = start_node(env, "mem-node-many", &pods)?;
    let n = pods.len();
    out.push(entry(n, 0, settled_rss(&agent)));
    let conns = open_idle(
        env,
        system.addr(Listener::Http1),
        scale.connections,
        &mut agent,
    )?;
    out.push(entry(n, conns.len(), settled_rss(&agent)));
    Ok(out)
}

/// A fresh proxy (or nginx): idle, then with the connections.
fn front(env: &Env, system: &mut System, scale: &Scale) -> Result<Vec<MemEntry>> {
    system.start_fronts(env)?;
    let kind = system.kind;
    let addr = system.addr(Listener::Http1);
    let proc = system
        .front_mut(Listener::Http1)
        .context("no proxy process")?;
    let idle = settled_rss(proc);
    let conns = open_idle(env, addr, scale.connections, proc)?;
    let loaded = settled_rss(proc);
    Ok(vec![
        MemEntry {
            system: kind,
            pods: 0,
            connections: 0,
            rss_kib: idle,
        },
        MemEntry {
            system: kind,
            pods: 0,
            connections: conns.len(),
            rss_kib: loaded,
        },
    ])
}

fn settled_rss(p: &Proc) -> u64 {
    thread::sleep(SETTLE);
    rss_kib(&p.tree())
}

/// Opens `n` connections from the client namespace to `addr`, makes one request on each
/// (read to the end, so the connection is idle and kept alive) and returns them open.
fn open_idle(env: &Env, addr: SocketAddr, n: usize, server: &mut Proc) -> Result<Vec<TcpStream>> {
    let client = netns_path(&env.client_ns);
    let conns = in_netns(&client, || {
        let deadline = Instant::now() + OPEN_DEADLINE;
        let mut conns = Vec::with_capacity(n);
        for i in 0..n {
            if Instant::now() > deadline {
                bail!("opened only {i} of {n} connections within {OPEN_DEADLINE:?}");
            }
            let s = one_request(addr).with_context(|| format!("connection {i} to {addr}"))?;
            conns.push(s);
        }
        Ok(conns)
    })?;
    server.ensure_running()?;
    Ok(conns)
}

fn one_request(addr: SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    write!(
        &s,
        "GET {PATH} HTTP/1.1\r\nHost: {addr}\r\nOrigin: {ORIGIN}\r\n\r\n"
    )?;
    let mut reader = BufReader::new(&s);
    let mut status = String::new();
    reader.read_line(&mut status)?;
    ensure!(status.contains(" 200 "), "answer: {status:?}");
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse()?;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    drop(reader);
    Ok(s)
}
