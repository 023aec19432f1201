//! `cargo xtask vm-test`: run the eBPF end-to-end suites (the `steer*` and `*node*` test
//! binaries of `cors-agent-tests`, whole) inside a qemu guest booted with one of Debian's
//! cloud kernels, so a change is checked on the oldest kernel the project tests as well as on
//! the machine's own.
//!
//! Steps: build the test binaries and `cors-agent` statically (into `target/vm/build`, so the
//! host build is untouched); fetch the kernel package and busybox-static with apt into a
//! private cache (`target/vm/cache`); pack an initramfs with them, the host's iproute2 `ip` and
//! util-linux `setpriv`, the modules the suites need and an init script; boot it and stream its
//! serial console; read the counts the init prints. Work files (initramfs, console log) go to
//! `target/vm/work/<release>-<pid>/` and are removed unless `--keep`.

mod apt;
mod build;
mod cpio;
mod initramfs;
mod qemu;

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::workspace_root;
use initramfs::Kernel;
use qemu::{Accel, Counts, Outcome};

#[derive(clap::Args)]
pub struct VmTest {
    /// Kernel to boot: 6.1 (bookworm; the oldest kernel tested), 6.12 (bookworm-backports), or
    /// all, in that order.
    #[arg(long, value_enum, default_value = "6.1")]
    kernel: KernelChoice,
    /// Keep the work directory (initramfs, console log) and print its path.
    #[arg(long)]
    keep: bool,
    /// Give up on one kernel's boot and suite after this many seconds.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
    /// Accelerator: auto uses KVM only when a probe boot shows it works, else TCG.
    #[arg(long, value_enum, default_value = "auto")]
    accel: Accel,
    /// Arguments for every test binary, e.g. `-- steers` to filter by name.
    #[arg(last = true)]
    test_args: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum KernelChoice {
    #[value(name = "6.1")]
    V6_1,
    #[value(name = "6.12")]
    V6_12,
    All,
}

impl KernelChoice {
    /// The kernel series to run, oldest first.
    fn series(self) -> &'static [&'static str] {
        match self {
            Self::V6_1 => &["6.1"],
            Self::V6_12 => &["6.12"],
            Self::All => &["6.1", "6.12"],
        }
    }
}

/// Paths and inputs shared by every kernel's run.
struct Setup {
    root: PathBuf,
    cache: PathBuf,
    work: PathBuf,
    built: build::Built,
    busybox: PathBuf,
}

pub fn run(args: VmTest) -> Result<()> {
    check_host_tools()?;
    let root = workspace_root();
    let vm = root.join("target/vm");
    let cache = vm.join("cache");
    let built = build::build(&root, &vm.join("build"))?;
    let mut apt = apt::Apt::open(&cache.join("apt"))?;
    let busybox = fetch_busybox(&mut apt, &cache)?;
    let setup = Setup {
        root,
        cache,
        work: vm.join("work"),
        built,
        busybox,
    };
    let mut reports = Vec::new();
    for series in args.kernel.series() {
        let report = run_kernel(series, &setup, &mut apt, &args).unwrap_or_else(|e| Report {
            kernel: format!("{series} kernel"),
            verdict: Verdict::Error(format!("{e:#}")),
            elapsed: None,
            expected_binaries: 0,
        });
        reports.push(report);
    }
    println!();
    for report in &reports {
        println!("{report}");
    }
    let failed = reports.iter().filter(|r| !r.passed()).count();
    if failed > 0 {
        bail!("vm-test failed on {failed} of {} kernel(s)", reports.len());
    }
    Ok(())
}

/// Fail early, naming the package, rather than halfway through a run.
fn check_host_tools() -> Result<()> {
    for (tool, package) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("apt-get", "apt"),
        ("dpkg-deb", "dpkg"),
        ("ldd", "libc-bin"),
        ("xz", "xz-utils"),
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            bail!("{tool} is missing on this machine: apt-get install {package}");
        }
    }
    Ok(())
}

fn fetch_busybox(apt: &mut apt::Apt, cache: &Path) -> Result<PathBuf> {
    let pkg = apt.candidate("busybox-static")?;
    let deb = apt.download(&pkg, &cache.join("debs"))?;
    let dir = extract(&deb, &cache.join("extracted"))?;
    let busybox = dir.join("bin/busybox");
    if !busybox.is_file() {
        bail!("{} has no bin/busybox", deb.display());
    }
    Ok(busybox)
}

/// Extracts a .deb once into `<into>/<deb file stem>/` and returns that directory.
fn extract(deb: &Path, into: &Path) -> Result<PathBuf> {
    let stem = deb
        .file_stem()
        .with_context(|| format!("odd package path {}", deb.display()))?;
    let dir = into.join(stem);
    if dir.join(".complete").exists() {
        return Ok(dir);
    }
    // Unpack next to the final place and rename, so an interrupted run leaves no half tree
    // that looks complete.
    let tmp = into.join(format!(".partial-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let status = Command::new("dpkg-deb")
        .arg("-x")
        .arg(deb)
        .arg(&tmp)
        .status()
        .context("running dpkg-deb")?;
    if !status.success() {
        bail!("dpkg-deb -x {} failed ({status})", deb.display());
    }
    fs::write(tmp.join(".complete"), "")?;
    if let Err(e) = fs::rename(&tmp, &dir) {
        let _ = fs::remove_dir_all(&tmp);
        // A concurrent run may have finished the same package first.
        if !dir.join(".complete").exists() {
            return Err(e).with_context(|| format!("moving the unpacked {}", deb.display()));
        }
    }
    Ok(dir)
}

fn run_kernel(series: &str, s: &Setup, apt: &mut apt::Apt, args: &VmTest) -> Result<Report> {
    let pkg = apt.kernel_image(series)?;
    println!("vm-test: kernel {series}: {} {}", pkg.name, pkg.version);
    let deb = apt.download(&pkg, &s.cache.join("debs"))?;
    let kernel = Kernel::from_extracted(&extract(&deb, &s.cache.join("extracted"))?)?;
    // Per process: two runs at once (several engineers, one tree) must not share files.
    let work = s
        .work
        .join(format!("{}-{}", kernel.release, std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let result = boot_kernel(&kernel, &work, s, args);
    if args.keep {
        println!("vm-test: kept the work directory {}", work.display());
    } else {
        let _ = fs::remove_dir_all(&work);
    }
    result
}

fn boot_kernel(kernel: &Kernel, work: &Path, s: &Setup, args: &VmTest) -> Result<Report> {
    let initrd = work.join("initramfs.cpio");
    let data_dirs: Vec<PathBuf> = ["tests", "examples"]
        .iter()
        .map(|d| s.root.join(d))
        .filter(|d| d.is_dir())
        .collect();
    initramfs::pack(
        &initramfs::Contents {
            kernel,
            busybox: &s.busybox,
            tests: &s.built.tests,
            agent: &s.built.agent,
            data_dirs: &data_dirs,
            tests_cwd: &s.root.join("tests"),
            test_args: &args.test_args,
        },
        &initrd,
    )
    .context("packing the initramfs")?;
    let size = fs::metadata(&initrd).map(|m| m.len() >> 20).unwrap_or(0);
    let accel = choose_accel(args.accel, kernel);
    println!(
        "vm-test: booting {} under {}, initramfs {size} MiB, {} test binaries",
        kernel.release,
        accel.name(),
        s.built.tests.len()
    );
    let started = Instant::now();
    let outcome = qemu::Boot {
        kernel: &kernel.vmlinuz,
        initrd: Some(&initrd),
        accel,
        timeout: Duration::from_secs(args.timeout),
        log: Some(&work.join("console.log")),
        echo: true,
        quiet: true,
    }
    .run()?;
    Ok(Report {
        kernel: kernel.release.clone(),
        verdict: Verdict::Ran {
            outcome,
            timeout: Duration::from_secs(args.timeout),
        },
        elapsed: Some(started.elapsed()),
        expected_binaries: s.built.tests.len() as u64,
    })
}

fn choose_accel(wanted: Accel, kernel: &Kernel) -> Accel {
    if wanted != Accel::Auto {
        return wanted;
    }
    if qemu::kvm_works(&kernel.vmlinuz) {
        Accel::Kvm
    } else {
        println!("vm-test: KVM is unavailable or does not boot a guest here; using TCG");
        Accel::Tcg
    }
}

/// One kernel's line in the summary.
struct Report {
    kernel: String,
    verdict: Verdict,
    elapsed: Option<Duration>,
    expected_binaries: u64,
}

enum Verdict {
    Ran {
        outcome: Outcome,
        timeout: Duration,
    },
    /// Preparing the run failed (download, packing, qemu missing).
    Error(String),
}

impl Report {
    /// Passed: every binary reported, something ran, nothing failed or errored.
    fn passed(&self) -> bool {
        match &self.verdict {
            Verdict::Ran {
                outcome: Outcome::Finished(c),
                ..
            } => {
                c.failed == 0
                    && c.errors == 0
                    && c.passed > 0
                    && c.binaries == self.expected_binaries
            }
            _ => false,
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let verdict = if self.passed() { "PASS" } else { "FAIL" };
        write!(f, "vm-test {}: {verdict} (", self.kernel)?;
        match &self.verdict {
            Verdict::Error(e) => write!(f, "not run: {e}")?,
            Verdict::Ran { outcome, timeout } => {
                write_outcome(f, outcome, *timeout, self.expected_binaries)?
            }
        }
        write!(f, ")")?;
        if let Some(t) = self.elapsed {
            write!(f, " in {}", human(t))?;
        }
        Ok(())
    }
}

fn write_outcome(
    f: &mut fmt::Formatter,
    outcome: &Outcome,
    timeout: Duration,
    expected_binaries: u64,
) -> fmt::Result {
    let phase = |reached_suite: bool| {
        if reached_suite {
            "while the suite ran"
        } else {
            "before the suite started"
        }
    };
    match outcome {
        Outcome::Finished(c) => write_counts(f, c, expected_binaries),
        Outcome::TimedOut { reached_suite } => {
            write!(
                f,
                "timed out after {} {}",
                human(timeout),
                phase(*reached_suite)
            )
        }
        Outcome::Stopped {
            reached_suite,
            status,
        } => {
            write!(f, "the guest stopped {}", phase(*reached_suite))?;
            match status.filter(|s| !s.success()) {
                Some(s) => write!(f, "; qemu {s}"),
                None => Ok(()),
            }
        }
    }
}

fn write_counts(f: &mut fmt::Formatter, c: &Counts, expected_binaries: u64) -> fmt::Result {
    write!(f, "{} passed, {} failed", c.passed, c.failed)?;
    if c.ignored > 0 {
        write!(f, ", {} ignored", c.ignored)?;
    }
    if c.errors > 0 {
        write!(f, ", {} errors (see the log above)", c.errors)?;
    }
    if c.binaries != expected_binaries {
        write!(
            f,
            ", {} of {expected_binaries} test binaries ran",
            c.binaries
        )?;
    }
    if c.passed + c.failed == 0 {
        write!(f, ", no test ran")?;
    }
    Ok(())
}

/// `2m31s`, `45s`.
fn human(d: Duration) -> String {
    let secs = d.as_secs();
    if secs >= 60 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{secs}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(counts: Counts) -> Report {
        Report {
            kernel: "6.1.0-57-cloud-amd64".into(),
            verdict: Verdict::Ran {
                outcome: Outcome::Finished(counts),
                timeout: Duration::from_secs(900),
            },
            elapsed: Some(Duration::from_secs(151)),
            expected_binaries: 2,
        }
    }

    #[test]
    fn summary_lines() {
        let ok = Counts {
            passed: 12,
            binaries: 2,
            ..Counts::default()
        };
        assert_eq!(
            report(ok).to_string(),
            "vm-test 6.1.0-57-cloud-amd64: PASS (12 passed, 0 failed) in 2m31s"
        );
        let failed = Counts { failed: 1, ..ok };
        assert!(!report(failed).passed());
        let none_ran = Counts { passed: 0, ..ok };
        assert!(!report(none_ran).passed());
        assert!(report(none_ran).to_string().contains("no test ran"));
        let missing_binary = Counts { binaries: 1, ..ok };
        assert!(!report(missing_binary).passed());
    }
}
