//! Booting a guest under qemu with its serial console on a pipe: every line is echoed to the
//! terminal and to a log as it arrives, the markers the init prints are picked out, and the
//! run is bounded by a deadline after which qemu is killed.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::initramfs::{RESULT_MARKER, START_MARKER};

/// After the result line the guest only has to power off; give it this long.
const POWEROFF_GRACE: Duration = Duration::from_secs(30);
/// Under KVM a kernel prints its banner well within this; a KVM that hangs prints nothing.
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// KVM if a probe boot shows it works, else TCG.
    Auto,
    Kvm,
    Tcg,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Kvm => "KVM",
            Self::Tcg => "TCG",
        }
    }
}

/// The suite's counts, as the guest's init summed them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
    /// Binaries that crashed, printed no result, or failed without a failing test; plus
    /// setup steps that failed.
    pub errors: u64,
    pub binaries: u64,
}

/// How a boot ended.
#[derive(Debug)]
pub enum Outcome {
    Finished(Counts),
    /// qemu exited (guest panic, init died, qemu failed) before the result line.
    Stopped {
        reached_suite: bool,
        status: Option<ExitStatus>,
    },
    TimedOut {
        reached_suite: bool,
    },
}

pub struct Boot<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub accel: Accel,
    pub timeout: Duration,
    /// Where the console output is saved.
    pub log: Option<&'a Path>,
    /// Echo console lines to the terminal.
    pub echo: bool,
    /// Kernel messages below warning level (the boot chatter) stay off the console.
    pub quiet: bool,
}

impl Boot<'_> {
    fn command(&self) -> Command {
        let mut cmd = Command::new("qemu-system-x86_64");
        let (accel, cpu) = match self.accel {
            Accel::Kvm => ("kvm", "host"),
            // Without cx16: Debian 12's qemu 7.2 mis-emulates CMPXCHG16B (the guest sees
            // garbage EFLAGS), and 6.12's slab allocator uses it on every allocation, so that
            // guest died with double faults within seconds. Without the feature the kernel
            // takes its lock-based path; nothing the suite tests depends on it.
            Accel::Tcg | Accel::Auto => ("tcg", "max,-cx16"),
        };
        cmd.args(["-accel", accel, "-cpu", cpu, "-smp", "2", "-m", "2G"])
            // No default devices: no network card, so the guest cannot send anything anywhere.
            .args([
                "-nodefaults",
                "-display",
                "none",
                "-no-reboot",
                "-serial",
                "stdio",
            ])
            .arg("-kernel")
            .arg(self.kernel)
            // panic=-1 plus -no-reboot: a guest panic ends qemu instead of hanging.
            .arg("-append")
            .arg(if self.quiet {
                // Warnings and worse only (a WARN splat shows; the boot chatter does not).
                "console=ttyS0 panic=-1 rdinit=/init loglevel=5"
            } else {
                "console=ttyS0 panic=-1 rdinit=/init"
            });
        if let Some(initrd) = self.initrd {
            cmd.arg("-initrd").arg(initrd);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        cmd
    }

    /// Boots and watches the console until the guest powers off or the deadline passes.
    pub fn run(&self) -> Result<Outcome> {
        let mut child = self
            .command()
            .spawn()
            .context("starting qemu-system-x86_64 (apt-get install qemu-system-x86)")?;
        let stdout = child.stdout.take().context("qemu's console pipe")?;
        let (tx, rx) = mpsc::channel::<String>();
        thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
                let line = String::from_utf8_lossy(&line)
                    .trim_end_matches('\r')
                    .to_owned();
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut log = match self.log {
            Some(p) => Some(File::create(p).with_context(|| format!("creating {}", p.display()))?),
            None => None,
        };
        let outcome = self.watch(&rx, log.as_mut());
        let status = stop(&mut child);
        Ok(match outcome? {
            Outcome::Stopped { reached_suite, .. } => Outcome::Stopped {
                reached_suite,
                status,
            },
            other => other,
        })
    }

    fn watch(&self, rx: &mpsc::Receiver<String>, mut log: Option<&mut File>) -> Result<Outcome> {
        let mut deadline = Instant::now() + self.timeout;
        let mut reached_suite = false;
        let mut counts = None;
        loop {
            let line = match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => line,
                // The console closed: qemu exited.
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) if counts.is_some() => {
                    println!("vm-test: the guest did not power off; stopping qemu");
                    break;
                }
                Err(RecvTimeoutError::Timeout) => return Ok(Outcome::TimedOut { reached_suite }),
            };
            if self.echo {
                println!("{line}");
                let _ = std::io::stdout().flush();
            }
            if let Some(f) = log.as_mut() {
                writeln!(f, "{line}").context("writing the console log")?;
            }
            reached_suite |= line.contains(START_MARKER);
            if let Some(c) = parse_result(&line) {
                counts = Some(c);
                deadline = deadline.min(Instant::now() + POWEROFF_GRACE);
            }
        }
        Ok(match counts {
            Some(c) => Outcome::Finished(c),
            None => Outcome::Stopped {
                reached_suite,
                status: None,
            },
        })
    }
}

/// Kills qemu if it still runs, reaps it, and returns how it ended.
fn stop(child: &mut Child) -> Option<ExitStatus> {
    if matches!(child.try_wait(), Ok(None)) {
        // The console is closed or the deadline passed: nothing more is wanted from the guest.
        let _ = child.kill();
    }
    child.wait().ok()
}

/// Parses `VMTEST-RESULT passed=1 failed=0 ...` anywhere in a line (a kernel message may
/// precede it on the same line).
fn parse_result(line: &str) -> Option<Counts> {
    let rest = &line[line.find(RESULT_MARKER)? + RESULT_MARKER.len()..];
    let mut c = Counts::default();
    let mut fields = 0;
    for pair in rest.split_whitespace() {
        let Some((key, value)) = pair.split_once('=') else {
            continue;
        };
        let Ok(n) = value.parse::<u64>() else {
            continue;
        };
        let slot = match key {
            "passed" => &mut c.passed,
            "failed" => &mut c.failed,
            "ignored" => &mut c.ignored,
            "errors" => &mut c.errors,
            "binaries" => &mut c.binaries,
            _ => continue,
        };
        *slot = n;
        fields += 1;
    }
    (fields == 5).then_some(c)
}

/// Whether KVM really runs a guest here: `/dev/kvm` can exist while KVM hangs (this
/// project's build machines), so boot the kernel alone and wait briefly for its banner.
pub fn kvm_works(kernel: &Path) -> bool {
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !usable {
        return false;
    }
    let probe = Boot {
        kernel,
        initrd: None,
        accel: Accel::Kvm,
        timeout: KVM_PROBE_TIMEOUT,
        log: None,
        echo: false,
        // The banner the probe waits for is a notice, which quiet would hide.
        quiet: false,
    };
    let mut child = match probe.command().stderr(Stdio::null()).spawn() {
        Ok(c) => c,
        Err(_) => return false,
    };
    let Some(stdout) = child.stdout.take() else {
        stop(&mut child);
        return false;
    };
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let banner = BufReader::new(stdout)
            .split(b'\n')
            .map_while(Result::ok)
            .any(|l| String::from_utf8_lossy(&l).contains("Linux version"));
        let _ = tx.send(banner);
    });
    let works = rx.recv_timeout(KVM_PROBE_TIMEOUT).unwrap_or(false);
    stop(&mut child);
    works
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_line() {
        let line = "[  9.1] x VMTEST-RESULT passed=12 failed=1 ignored=0 errors=2 binaries=8";
        assert_eq!(
            parse_result(line),
            Some(Counts {
                passed: 12,
                failed: 1,
                ignored: 0,
                errors: 2,
                binaries: 8
            })
        );
        assert_eq!(parse_result("VMTEST-RESULT passed=$passed failed="), None);
        assert_eq!(parse_result("test result: ok. 3 passed"), None);
    }
}
