//! From raw runs to what the bench reports: per system and workload the median over rounds
//! of each number, and ratios taken within a round (system vs direct, vs nginx, in runs that
//! were interleaved) before the median, because on a noisy machine absolute numbers drift
//! between rounds while ratios of neighbouring runs hold.

use serde_json::{Value, json};

use super::load::{Sample, Workload};
use super::memory::MemEntry;
use super::systems::SystemKind;

/// One load generator run against one system, with the proxy's and the backend's cost.
#[derive(Clone, Debug)]
pub struct Measurement {
    pub round: u32,
    pub system: SystemKind,
    pub workload: Workload,
    pub sample: Sample,
    /// CPU seconds of the proxy's processes during the run (none for direct).
    pub proxy_cpu_s: Option<f64>,
    pub backend_cpu_s: f64,
    /// Peak RSS of the proxy's processes during the run (summed over nginx's processes).
    pub proxy_peak_rss_kib: Option<u64>,
}

impl Measurement {
    fn per_request_us(&self, cpu_s: f64) -> f64 {
        cpu_s * 1e6 / self.sample.requests as f64
    }

    pub fn proxy_us(&self) -> Option<f64> {
        self.proxy_cpu_s.map(|s| self.per_request_us(s))
    }

    pub fn backend_us(&self) -> f64 {
        self.per_request_us(self.backend_cpu_s)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "round": self.round,
            "system": self.system.label(),
            "workload": self.workload.id(),
            "requests": self.sample.requests,
            "seconds": self.sample.seconds,
            "rps": self.sample.rps(),
            "p50_us": self.sample.p50_us,
            "p99_us": self.sample.p99_us,
            "proxy_cpu_s": self.proxy_cpu_s,
            "proxy_cpu_us_per_request": self.proxy_us(),
            "backend_cpu_s": self.backend_cpu_s,
            "backend_cpu_us_per_request": self.backend_us(),
            "proxy_peak_rss_kib": self.proxy_peak_rss_kib,
        })
    }
}

/// Medians over the rounds of one system on one workload.
#[derive(Clone, Debug)]
pub struct Summary {
    pub system: SystemKind,
    pub workload: Workload,
    pub rounds: usize,
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub proxy_us: Option<f64>,
    pub backend_us: f64,
    pub peak_rss_kib: Option<f64>,
    /// This system's req/s over direct's, in the same round.
    pub rps_vs_direct: Option<f64>,
    pub rps_vs_nginx: Option<f64>,
    /// nginx's CPU per request over this system's: above 1 is more efficient than nginx.
    pub efficiency_vs_nginx: Option<f64>,
}

impl Summary {
    fn to_json(&self) -> Value {
        json!({
            "system": self.system.label(),
            "workload": self.workload.id(),
            "rounds": self.rounds,
            "rps": self.rps,
            "p50_us": self.p50_us,
            "p99_us": self.p99_us,
            "proxy_cpu_us_per_request": self.proxy_us,
            "proxy_cpu_s_per_10k_requests": self.proxy_us.map(|u| u / 100.0),
            "backend_cpu_us_per_request": self.backend_us,
            "proxy_peak_rss_kib": self.peak_rss_kib,
            "rps_vs_direct": self.rps_vs_direct,
            "rps_vs_nginx": self.rps_vs_nginx,
            "cpu_efficiency_vs_nginx": self.efficiency_vs_nginx,
        })
    }
}

pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

/// Summaries for every (workload, system) measured, in workload then system order.
pub fn summarize(runs: &[Measurement]) -> Vec<Summary> {
    let mut out = Vec::new();
    for w in Workload::ALL {
        for s in SystemKind::ALL {
            let mine: Vec<&Measurement> = runs
                .iter()
                .filter(|m| m.system == s && m.workload == w)
                .collect();
            if mine.is_empty() {
                continue;
            }
            let med = |f: &dyn Fn(&Measurement) -> Option<f64>| {
                median(mine.iter().filter_map(|m| f(m)).collect())
            };
            let rps_ratio = |other: SystemKind| {
                ratio_in_round(runs, &mine, other, |m| Some(m.sample.rps()), false)
            };
            out.push(Summary {
                system: s,
                workload: w,
                rounds: mine.len(),
                rps: med(&|m| Some(m.sample.rps())).unwrap_or(0.0),
                p50_us: med(&|m| Some(m.sample.p50_us)).unwrap_or(0.0),
                p99_us: med(&|m| Some(m.sample.p99_us)).unwrap_or(0.0),
                proxy_us: med(&|m| m.proxy_us()),
                backend_us: med(&|m| Some(m.backend_us())).unwrap_or(0.0),
                peak_rss_kib: med(&|m| m.proxy_peak_rss_kib.map(|k| k as f64)),
                rps_vs_direct: rps_ratio(SystemKind::Direct),
                rps_vs_nginx: rps_ratio(SystemKind::Nginx),
                efficiency_vs_nginx: ratio_in_round(
                    runs,
                    &mine,
                    SystemKind::Nginx,
                    Measurement::proxy_us,
                    true,
                ),
            });
        }
    }
    out
}

/// Median over rounds of `f(mine) / f(other)` (or the inverse), both from the same round.
fn ratio_in_round(
    runs: &[Measurement],
    mine: &[&Measurement],
    other: SystemKind,
    f: impl Fn(&Measurement) -> Option<f64>,
    inverse: bool,
) -> Option<f64> {
    let ratios = mine
        .iter()
        .filter_map(|m| {
            let o = runs
                .iter()
                .find(|o| o.system == other && o.workload == m.workload && o.round == m.round)?;
            let (a, b) = (f(m)?, f(o)?);
            let (num, den) = if inverse { (b, a) } else { (a, b) };
            (den > 0.0).then(|| num / den)
        })
        .collect();
    median(ratios)
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "—".to_owned(), f)
}

/// The results table, as Markdown (the README's Performance section shows it as is).
pub fn table(summaries: &[Summary]) -> String {
    let mut t = String::from(
        "| workload | system | req/s | × direct | × nginx | p50 ms | p99 ms \
         | proxy CPU s/10k req (µs/req) | CPU efficiency × nginx | proxy peak RSS MiB \
         | backend µs/req |\n|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    let mut last = None;
    for s in summaries {
        let workload = if last == Some(s.workload) {
            String::new()
        } else {
            format!("{} {}", s.workload.id(), s.workload.title())
        };
        last = Some(s.workload);
        t += &format!(
            "| {workload} | {} | {:.0} | {} | {} | {:.2} | {:.2} | {} | {} | {} | {:.1} |\n",
            s.system.title(),
            s.rps,
            opt(s.rps_vs_direct, |r| format!("{r:.2}")),
            opt(s.rps_vs_nginx, |r| format!("{r:.2}")),
            s.p50_us / 1e3,
            s.p99_us / 1e3,
            opt(s.proxy_us, |u| format!("{:.3} ({u:.1})", u / 100.0)),
            opt(s.efficiency_vs_nginx, |r| format!("{r:.2}")),
            opt(s.peak_rss_kib, |k| format!("{:.1}", k / 1024.0)),
            s.backend_us,
        );
    }
    t
}

pub fn memory_table(entries: &[MemEntry]) -> String {
    let mut t = String::from("| system | case | RSS MiB |\n|---|---|--:|\n");
    for e in entries {
        t += &format!(
            "| {} | {} | {:.1} |\n",
            e.system.title(),
            e.case(),
            e.rss_kib as f64 / 1024.0
        );
    }
    t
}

pub fn memory_json(entries: &[MemEntry]) -> Value {
    entries
        .iter()
        .map(|e| {
            json!({
                "system": e.system.label(),
                "pods": e.pods,
                "connections": e.connections,
                "rss_kib": e.rss_kib,
            })
        })
        .collect()
}

/// A target of the issue, checked against this run (reported, never asserted).
pub struct Target {
    pub name: &'static str,
    pub goal: &'static str,
    pub value: String,
    /// `None`: not measured in this run.
    pub met: Option<bool>,
}

impl Target {
    fn line(&self) -> String {
        let verdict = match self.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "not measured",
        };
        format!(
            "| {} | {} | {} | {verdict} |\n",
            self.name, self.goal, self.value
        )
    }

    fn to_json(&self) -> Value {
        json!({"name": self.name, "goal": self.goal, "value": self.value, "met": self.met})
    }
}

fn find(summaries: &[Summary], s: SystemKind, w: Workload) -> Option<&Summary> {
    summaries.iter().find(|x| x.system == s && x.workload == w)
}

pub fn targets(summaries: &[Summary], memory: &[MemEntry]) -> Vec<Target> {
    let proxy_get = find(summaries, SystemKind::Proxy, Workload::Get);
    let cpu = proxy_get.and_then(|s| s.proxy_us);
    // The target is relative: nginx measured in the same run is the yardstick.
    let eff = proxy_get.and_then(|s| s.efficiency_vs_nginx);
    let preflight =
        find(summaries, SystemKind::Proxy, Workload::Preflight).and_then(|s| s.proxy_us);
    let w3 = |s| find(summaries, s, Workload::NewConn).map(|x| x.rps);
    let (node3, ipt3, proxy3) = (
        w3(SystemKind::Node),
        w3(SystemKind::Iptables),
        w3(SystemKind::Proxy),
    );
    let node_mem = |pred: &dyn Fn(&MemEntry) -> bool| {
        memory
            .iter()
            .find(|e| e.system == SystemKind::Node && pred(e))
    };
    let mib = |e: &MemEntry| e.rss_kib as f64 / 1024.0;
    let idle1 = node_mem(&|e| e.pods == 1 && e.connections == 0).map(mib);
    // Only a run at the target's scale counts (--quick runs a smaller one).
    let loaded = node_mem(&|e| e.pods >= 100 && e.connections >= 10_000);
    let loaded_value = match (loaded, node_mem(&|e| e.connections > 0)) {
        (Some(e), _) => format!("{:.1} MiB", mib(e)),
        (None, Some(small)) => format!("{:.1} MiB at {} (scaled down)", mib(small), small.case()),
        (None, None) => "—".to_owned(),
    };
    vec![
        Target {
            name: "W1 proxy CPU per GET",
            goal: "1.3× nginx's efficiency (~21 µs where nginx takes 28)",
            value: format!(
                "{} µs, {}× nginx",
                opt(cpu, |u| format!("{u:.1}")),
                opt(eff, |r| format!("{r:.2}"))
            ),
            met: eff.map(|r| r >= 1.3),
        },
        Target {
            name: "W1 proxy vs nginx, floor",
            goal: "nginx parity: efficiency ≥ 1.0×",
            value: format!("{}×", opt(eff, |r| format!("{r:.2}"))),
            met: eff.map(|r| r >= 1.0),
        },
        Target {
            name: "W2 preflight CPU",
            goal: "< 7 µs",
            value: format!("{} µs", opt(preflight, |u| format!("{u:.1}"))),
            met: preflight.map(|u| u < 7.0),
        },
        Target {
            name: "W3 sk_lookup vs iptables REDIRECT",
            goal: "node req/s ≥ iptables req/s",
            value: format!(
                "{} vs {}",
                opt(node3, |r| format!("{r:.0}")),
                opt(ipt3, |r| format!("{r:.0}"))
            ),
            met: node3.zip(ipt3).map(|(n, i)| n >= i),
        },
        Target {
            name: "W3 sk_lookup vs plain proxy",
            goal: "node req/s within 5% of proxy",
            value: format!(
                "{} vs {}",
                opt(node3, |r| format!("{r:.0}")),
                opt(proxy3, |r| format!("{r:.0}"))
            ),
            met: node3.zip(proxy3).map(|(n, p)| n >= 0.95 * p),
        },
        Target {
            name: "node RSS idle, 1 pod",
            goal: "< 15 MiB",
            value: format!("{} MiB", opt(idle1, |m| format!("{m:.1}"))),
            met: idle1.map(|m| m < 15.0),
        },
        Target {
            name: "node RSS, 100 pods + 10,000 idle connections",
            goal: "< 30 MiB",
            value: loaded_value,
            met: loaded.map(|e| mib(e) < 30.0),
        },
    ]
}

pub fn targets_table(targets: &[Target]) -> String {
    let mut t = String::from("| target | goal | this run | verdict |\n|---|---|---|---|\n");
    for target in targets {
        t += &target.line();
    }
    t
}

pub fn to_json(
    runs: &[Measurement],
    summaries: &[Summary],
    memory: &[MemEntry],
    targets: &[Target],
) -> Value {
    json!({
        "measurements": runs.iter().map(Measurement::to_json).collect::<Vec<_>>(),
        "summary": summaries.iter().map(Summary::to_json).collect::<Vec<_>>(),
        "memory": memory_json(memory),
        "targets": targets.iter().map(Target::to_json).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(round: u32, system: SystemKind, rps: f64, cpu: Option<f64>) -> Measurement {
        Measurement {
            round,
            system,
            workload: Workload::Get,
            sample: Sample {
                requests: (rps * 10.0) as u64,
                seconds: 10.0,
                p50_us: 100.0,
                p99_us: 200.0,
            },
            proxy_cpu_s: cpu,
            backend_cpu_s: 1.0,
            proxy_peak_rss_kib: cpu.map(|_| 1024),
        }
    }

    #[test]
    fn ratios_are_taken_within_a_round() {
        // Round 2 is twice as fast for everyone: the ratio stays 0.5.
        let runs = vec![
            m(1, SystemKind::Direct, 1000.0, None),
            m(1, SystemKind::Proxy, 500.0, Some(1.0)),
            m(1, SystemKind::Nginx, 500.0, Some(2.0)),
            m(2, SystemKind::Direct, 2000.0, None),
            m(2, SystemKind::Proxy, 1000.0, Some(2.0)),
            m(2, SystemKind::Nginx, 1000.0, Some(4.0)),
        ];
        let s = summarize(&runs);
        let proxy = s.iter().find(|s| s.system == SystemKind::Proxy).unwrap();
        assert_eq!(proxy.rps_vs_direct, Some(0.5));
        assert_eq!(proxy.rps_vs_nginx, Some(1.0));
        assert_eq!(proxy.efficiency_vs_nginx, Some(2.0));
        assert_eq!(proxy.rounds, 2);
    }

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }
}
