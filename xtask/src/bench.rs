//! `cargo xtask bench`: what cors-agent costs next to what users would otherwise deploy, on
//! the same backend and load generator, in one run, as ratios.
//!
//! Systems (`systems.rs`): direct, cors-agent proxy, cors-agent node (sk_lookup), nginx with a
//! CORS configuration, iptables REDIRECT to cors-agent. Workloads (`load.rs`): W1 GET
//! keep-alive, W2 preflight, W3 a new connection per request, W4 HTTPS keep-alive and TLS
//! handshakes, W5 HTTP/2. Each system lives in its own pod namespace and is driven across a
//! veth from one client namespace (`topo.rs`); the load generator is pinned to its own core,
//! the proxy and the backend share another. The runs are interleaved: every round runs every
//! workload on every system, in a rotated order, and the report (`report.rs`) takes medians
//! over rounds and ratios within a round. Then the memory scenario (`memory.rs`).
//!
//! Writes `target/bench/bench-<time>.json` and `target/bench/latest.{json,md}`; prints the
//! tables. Needs root; installs nginx, wrk, nghttp2-client (h2load), iptables, curl and
//! openssl from Debian when missing.

mod load;
mod memory;
mod procs;
mod report;
mod setup;
mod systems;
mod topo;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde_json::json;

use load::{LoadGen, Workload};
use memory::{MemEntry, Scale};
use procs::{cpu_seconds, load_average, peak_rss_kib, reset_peak_rss};
use report::Measurement;
use systems::{Env, System, SystemKind};
use topo::Topology;

#[derive(clap::Args)]
pub struct Bench {
    /// A short run for CI smoke use: one round of 1 s per measurement, a small memory
    /// scenario (10 pods, 1,000 connections). It fails only if something does not work,
    /// never on speed.
    #[arg(long)]
    quick: bool,
    /// Rounds; each runs every workload on every system (default 3, --quick 1).
    #[arg(long)]
    rounds: Option<u32>,
    /// Seconds per measurement (default 6, --quick 1), after a 1 s warm-up (none with
    /// --quick).
    #[arg(long)]
    seconds: Option<u32>,
    /// Only these systems (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    systems: Vec<SystemKind>,
    /// Only these workloads (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    workloads: Vec<Workload>,
    /// Cores of the load generator, as taskset takes them (default: 0).
    #[arg(long, value_name = "LIST")]
    loadgen_cpus: Option<String>,
    /// Cores of the proxies and the backend (default: 1).
    #[arg(long, value_name = "LIST")]
    server_cpus: Option<String>,
    /// Pods enrolled in the memory scenario (default 100, --quick 10).
    #[arg(long)]
    pods: Option<usize>,
    /// Idle keep-alive connections in the memory scenario (default 10000, --quick 1000).
    #[arg(long)]
    connections: Option<usize>,
    /// Skip the memory scenario.
    #[arg(long)]
    no_memory: bool,
    /// Fail instead of installing missing Debian packages.
    #[arg(long)]
    no_install: bool,
    /// Keep the working folder (configs and logs) under target/bench/.
    #[arg(long)]
    keep: bool,
}

/// How long and how often.
struct Plan {
    rounds: u32,
    seconds: u32,
    warmup: u32,
    systems: Vec<SystemKind>,
    workloads: Vec<Workload>,
    scale: Option<Scale>,
    loadgen_cpus: Option<String>,
    server_cpus: Option<String>,
}

impl Plan {
    fn from(args: &Bench) -> Self {
        let q = args.quick;
        let (loadgen_cpus, server_cpus) = default_cpus(args);
        Self {
            rounds: args.rounds.unwrap_or(pick(q, 3, 1)).max(1),
            seconds: args.seconds.unwrap_or(pick(q, 6, 1)).max(1),
            warmup: pick(q, 1, 0),
            systems: or_all(&args.systems, &SystemKind::ALL),
            workloads: or_all(&args.workloads, &Workload::ALL),
            scale: (!args.no_memory).then(|| Scale {
                pods: args.pods.unwrap_or(pick(q, 100, 10)).max(1),
                connections: args.connections.unwrap_or(pick(q, 10_000, 1_000)),
            }),
            loadgen_cpus,
            server_cpus,
        }
    }

    /// The runs of one round: every workload, each on every system, the systems' order
    /// rotated by the round so no system always runs first (or right after another).
    fn round(&self, round: u32) -> Vec<(Workload, usize)> {
        let n = self.systems.len();
        let shift = round as usize % n;
        self.workloads
            .iter()
            .flat_map(|&w| (0..n).map(move |i| (w, (i + shift) % n)))
            .filter(|&(w, i)| self.systems[i].has_cors() || w != Workload::Preflight)
            .collect()
    }
}

/// The full run's value, or the quick one.
fn pick<T>(quick: bool, full: T, short: T) -> T {
    if quick { short } else { full }
}

fn or_all<T: Copy + PartialEq>(chosen: &[T], all: &[T]) -> Vec<T> {
    // Kept in the canonical order, whatever order they were given in.
    all.iter()
        .copied()
        .filter(|x| chosen.is_empty() || chosen.contains(x))
        .collect()
}

/// Load generator on core 0, server side on core 1; no pinning on a one-core machine.
fn default_cpus(args: &Bench) -> (Option<String>, Option<String>) {
    let multi = setup::cpu_count() >= 2;
    let default = |core: &str| multi.then(|| core.to_owned());
    (
        args.loadgen_cpus.clone().or_else(|| default("0")),
        args.server_cpus.clone().or_else(|| default("1")),
    )
}

pub fn run(args: Bench) -> Result<()> {
    let started = Instant::now();
    // Before our own build and load generators: how busy the machine was to begin with.
    let load_before = load_average();
    setup::require_root()?;
    setup::install_tools(!args.no_install)?;
    let agent = setup::build_agent()?;
    setup::raise_fd_limit()?;
    let plan = Plan::from(&args);
    let out_dir = crate::target_dir().join("bench");
    let work = out_dir.join(format!("work-{}", std::process::id()));
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    println!(
        "bench: {} round(s) of {} s per run, load generator on cpus {:?}, servers on {:?}, load average before {load_before}",
        plan.rounds, plan.seconds, plan.loadgen_cpus, plan.server_cpus
    );

    let result = measure_all(&plan, &agent, &work);
    if !args.keep {
        let _ = fs::remove_dir_all(&work);
    }
    let (runs, memory) = result?;
    let record = json!({
        "command": command_line(),
        "unix_time": unix_time(),
        "git": setup::version("git", &["rev-parse", "--short", "HEAD"]),
        "kernel": setup::version("uname", &["-r"]),
        "cpus": setup::cpu_count(),
        "loadgen_cpus": plan.loadgen_cpus,
        "server_cpus": plan.server_cpus,
        "load_before": load_before,
        "load_after": load_average(),
        "rounds": plan.rounds,
        "seconds": plan.seconds,
        "tools": {
            "nginx": setup::version("nginx", &["-v"]),
            "wrk": setup::version("wrk", &["-v"]),
            "h2load": setup::version("h2load", &["--version"]),
            "iptables": setup::version("iptables", &["-V"]),
        },
    });
    publish(&out_dir, record, &runs, &memory)?;
    println!("bench: done in {:.0?}", started.elapsed());
    Ok(())
}

/// Starts everything, runs the rounds and the memory scenario; stops everything however it
/// ends (Drop: processes first, then the namespaces).
fn measure_all(
    plan: &Plan,
    agent: &Path,
    work: &Path,
) -> Result<(Vec<Measurement>, Vec<MemEntry>)> {
    let t = Instant::now();
    let labels: Vec<&str> = plan.systems.iter().map(|s| s.label()).collect();
    let mut topo = Topology::new(&labels)?;
    let env = environment(plan, agent, work, &topo)?;
    let mut systems = Vec::new();
    for &kind in &plan.systems {
        let system = System::start(kind, &env, &topo)
            .with_context(|| format!("starting system {}", kind.label()))?;
        systems.push(system);
    }
    for system in &systems {
        for &w in &plan.workloads {
            if system.kind.has_cors() || w != Workload::Preflight {
                system.verify(w, &env)?;
            }
        }
    }
    println!(
        "bench: {} systems up and answering correctly ({:.1?})",
        systems.len(),
        t.elapsed()
    );
    let loadgen = LoadGen::new(&topo.client, plan.loadgen_cpus.clone(), work)?;
    let mut runs = Vec::new();
    for round in 1..=plan.rounds {
        // The bench's own load is ~2 (two busy cores); more means others are running.
        println!("bench: round {round}, load average {}", load_average());
        for (w, i) in plan.round(round - 1) {
            let m = measure(&mut systems[i], w, &loadgen, round, plan).with_context(|| {
                format!("round {round}: {} on {}", w.id(), plan.systems[i].label())
            })?;
            print_run(&m);
            runs.push(m);
        }
    }
    println!("bench: rounds done ({:.1?})", t.elapsed());
    let memory = match &plan.scale {
        Some(scale) => memory::run(&env, &mut topo, &mut systems, scale)?,
        None => Vec::new(),
    };
    println!("bench: memory scenario done ({:.1?})", t.elapsed());
    drop(systems);
    Ok((runs, memory))
}

fn environment(plan: &Plan, agent: &Path, work: &Path, topo: &Topology) -> Result<Env> {
    // The agents watch the folders of their -f files and certificates: nothing else may be
    // written there, or every log line would wake their watcher threads.
    let config = work.join("config");
    fs::create_dir_all(&config)?;
    let routes = config.join("routes.yaml");
    fs::write(&routes, include_str!("../../bench/routes.yaml"))?;
    let (cert, key) = setup::write_certificate(&config)?;
    Ok(Env {
        dir: work.to_path_buf(),
        config,
        agent: agent.to_path_buf(),
        cert,
        key,
        routes,
        www: setup::write_www(work)?,
        cpus: plan.server_cpus.clone(),
        client_ns: topo.client.clone(),
    })
}

/// One measured run: an unmeasured warm-up, then the load generator, with the proxy's and
/// the backend's CPU time read from /proc around it and the proxy's peak RSS reset before.
fn measure(
    system: &mut System,
    w: Workload,
    loadgen: &LoadGen,
    round: u32,
    plan: &Plan,
) -> Result<Measurement> {
    let addr = system.addr(w.listener());
    if plan.warmup > 0 {
        loadgen.run(w, addr, plan.warmup)?;
    }
    let front = system.front(w.listener()).map(|p| p.tree());
    let backend = system.backend().tree();
    if let Some(front) = &front {
        reset_peak_rss(front);
    }
    let front_cpu = front.as_deref().map(cpu_seconds).transpose()?;
    let backend_cpu = cpu_seconds(&backend)?;
    let sample = loadgen.run(w, addr, plan.seconds)?;
    let front_cpu = match (&front, front_cpu) {
        (Some(pids), Some(before)) => Some(cpu_seconds(pids)? - before),
        _ => None,
    };
    let backend_cpu = cpu_seconds(&backend)? - backend_cpu;
    system.ensure_running()?;
    Ok(Measurement {
        round,
        system: system.kind,
        workload: w,
        proxy_peak_rss_kib: front.as_deref().map(peak_rss_kib),
        sample,
        proxy_cpu_s: front_cpu,
        backend_cpu_s: backend_cpu,
    })
}

fn print_run(m: &Measurement) {
    let cpu = m
        .proxy_us()
        .map_or_else(String::new, |u| format!(", proxy {u:.1} µs/req"));
    println!(
        "  round {} {:<3} {:<9} {:>8.0} req/s, p50 {:.2} ms, p99 {:.2} ms{cpu}, backend {:.1} µs/req",
        m.round,
        m.workload.id(),
        m.system.label(),
        m.sample.rps(),
        m.sample.p50_us / 1e3,
        m.sample.p99_us / 1e3,
        m.backend_us(),
    );
}

/// Prints the tables and writes the JSON and Markdown files.
fn publish(
    out_dir: &Path,
    mut record: serde_json::Value,
    runs: &[Measurement],
    memory: &[MemEntry],
) -> Result<()> {
    let summaries = report::summarize(runs);
    let targets = report::targets(&summaries, memory);
    let mut md = format!(
        "Command: `{}` at commit {}; load average (1, 5, 15 min) before the run {}, after it \
         {} (the bench's own load included).\n\n{}",
        record["command"].as_str().unwrap_or(""),
        record["git"].as_str().unwrap_or(""),
        record["load_before"].as_str().unwrap_or(""),
        record["load_after"].as_str().unwrap_or(""),
        report::table(&summaries)
    );
    if !memory.is_empty() {
        md += &format!("\n{}", report::memory_table(memory));
    }
    md += &format!("\n{}", report::targets_table(&targets));
    println!("\n{md}");

    let results = report::to_json(runs, &summaries, memory, &targets);
    if let (Some(r), Some(extra)) = (record.as_object_mut(), results.as_object()) {
        r.extend(extra.clone());
    }
    let text = serde_json::to_string_pretty(&record)?;
    let stamped: PathBuf = out_dir.join(format!("bench-{}.json", unix_time()));
    for path in [stamped, out_dir.join("latest.json")] {
        fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    fs::write(out_dir.join("latest.md"), md)?;
    Ok(())
}

fn command_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    format!("cargo xtask {}", args.join(" "))
}

fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
