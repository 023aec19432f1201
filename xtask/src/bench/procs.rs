//! The processes the bench starts (kept by pid, stopped on drop, never found by name) and what
//! `/proc` says about them: CPU time and resident memory, summed over a process and its
//! children (nginx's master and worker).

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rustix::process::{Pid, Signal, kill_process};

/// How long a stopped process gets to exit after SIGTERM before it and its children are
/// killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A child process with its output in a log file; stopped (with its children) on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Self> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log: log.to_path_buf(),
        })
    }

    /// The pid of the program itself: `ip netns exec` and `taskset` exec into it.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// This process and its descendants, as they are now.
    pub fn tree(&self) -> Vec<u32> {
        tree(self.pid())
    }

    /// Fails with the end of the log if the process has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); its log ({}) ends with:\n{}",
                self.name,
                self.log.display(),
                log_tail(&self.log)
            );
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL for it and its children if it has not exited in time.
    pub fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let family = self.tree();
        signal(self.pid(), Signal::TERM);
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        // nginx workers outlive a killed master: kill what is left of the family by pid.
        for pid in family {
            if alive(pid) {
                signal(pid, Signal::KILL);
            }
        }
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn signal(pid: u32, sig: Signal) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        let _ = kill_process(pid, sig);
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The last 2 KiB of a log, for error messages.
pub fn log_tail(path: &Path) -> String {
    let text = fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(2048);
    String::from_utf8_lossy(&text[start..]).into_owned()
}

/// `pid` and all its descendants.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for (child, parent) in all_parents() {
        children.entry(parent).or_default().push(child);
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        if let Some(kids) = children.get(&out[i]) {
            out.extend(kids);
        }
        i += 1;
    }
    out
}

/// (pid, parent pid) of every process.
fn all_parents() -> Vec<(u32, u32)> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, stat_fields(pid).ok()?.ppid)))
        .collect()
}

struct Stat {
    ppid: u32,
    /// utime + stime, in clock ticks: all threads, also those that have exited.
    cpu_ticks: u64,
}

/// The fields of `/proc/PID/stat` the bench uses.
fn stat_fields(pid: u32) -> Result<Stat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may contain spaces: split after it.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): ppid is field 4, utime 14, stime 15.
    let field = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .context("short /proc/PID/stat")?
            .parse()
            .context("bad number in /proc/PID/stat")
    };
    Ok(Stat {
        ppid: u32::try_from(field(4)?)?,
        cpu_ticks: field(14)? + field(15)?,
    })
}

/// CPU seconds (user + system) the processes have used so far.
pub fn cpu_seconds(pids: &[u32]) -> Result<f64> {
    let ticks_per_second = rustix::param::clock_ticks_per_second() as f64;
    let mut ticks = 0;
    for &pid in pids {
        ticks += stat_fields(pid)
            .with_context(|| format!("reading /proc/{pid}/stat"))?
            .cpu_ticks;
    }
    Ok(ticks as f64 / ticks_per_second)
}

/// Resets the peak resident set size (`VmHWM`) of the processes to their current RSS.
pub fn reset_peak_rss(pids: &[u32]) {
    for pid in pids {
        // "5" resets the peak RSS (proc(5), clear_refs); root may write it for any process.
        let _ = fs::write(format!("/proc/{pid}/clear_refs"), "5");
    }
}

/// Sum of the processes' peak RSS since the last reset, in KiB.
pub fn peak_rss_kib(pids: &[u32]) -> u64 {
    pids.iter().map(|&p| status_kib(p, "VmHWM:")).sum()
}

/// Sum of the processes' current RSS, in KiB.
pub fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter().map(|&p| status_kib(p, "VmRSS:")).sum()
}

fn status_kib(pid: u32, key: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// `/proc/loadavg`'s first three fields, to record how quiet the machine was.
pub fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}
