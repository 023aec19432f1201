//! The guest's whole root file system: busybox, a few host tools, the kernel modules the
//! suites need, the test binaries, and an init script that runs them and reports.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::cpio;

/// Modules the suites need that Debian's cloud kernels build as modules (veth pairs; the node
/// suites' bridge); their dependencies are added from each module's `depends=`. Network
/// namespaces, IPv6, bpffs and sk_lookup are built in; the console is the built-in 8250 serial
/// port, so no virtio driver is needed.
const MODULES: &[&str] = &["veth", "bridge"];

/// Dynamically linked host programs the suites run that busybox lacks or cuts short, with
/// their guest paths: `ip netns`, `ip -n` and veth pairs made inside namespaces (busybox's
/// `ip` has none of them), and util-linux's `setpriv --bounding-set` (busybox's has no
/// bounding set). Copied with the libraries and loader `ldd` names.
const HOST_TOOLS: &[(&str, &str, &str)] = &[
    ("ip", "/usr/sbin/ip", "iproute2"),
    ("setpriv", "/usr/bin/setpriv", "util-linux"),
];

/// Marks the start of the suite, so the host can tell a failed boot from a failed suite.
pub const START_MARKER: &str = "VMTEST-START";
/// Prefixes the init's final summary line.
pub const RESULT_MARKER: &str = "VMTEST-RESULT";

/// Where things live inside the guest.
const GUEST_TESTS: &str = "/vmtest/tests";
const GUEST_AGENT: &str = "/vmtest/cors-agent";

/// An extracted kernel package.
pub struct Kernel {
    /// `uname -r` of the kernel, e.g. `6.1.0-57-cloud-amd64`.
    pub release: String,
    pub vmlinuz: PathBuf,
    modules: PathBuf,
}

impl Kernel {
    /// Finds the kernel image and module tree in a directory a linux-image .deb was
    /// extracted to.
    pub fn from_extracted(dir: &Path) -> Result<Self> {
        let modules_root = dir.join("lib/modules");
        let release = single_entry(&modules_root)?;
        let vmlinuz = dir.join("boot").join(format!("vmlinuz-{release}"));
        if !vmlinuz.is_file() {
            bail!("{} has no kernel image", dir.display());
        }
        Ok(Self {
            modules: modules_root.join(&release),
            release,
            vmlinuz,
        })
    }
}

/// Everything that goes into one guest.
pub struct Contents<'a> {
    pub kernel: &'a Kernel,
    pub busybox: &'a Path,
    pub tests: &'a [PathBuf],
    pub agent: &'a Path,
    /// Source-tree directories the tests read at run time (`CARGO_MANIFEST_DIR` paths baked
    /// into the binaries): packed at the same absolute paths.
    pub data_dirs: &'a [PathBuf],
    /// The tests crate's directory: the working directory cargo would give the tests.
    pub tests_cwd: &'a Path,
    /// Extra arguments for every test binary.
    pub test_args: &'a [String],
}

/// Writes the initramfs to `out`.
pub fn pack(c: &Contents, out: &Path) -> Result<()> {
    let mut w = cpio::Writer::create(out)?;
    add_skeleton(&mut w)?;
    let lib_dirs = add_host_tools(&mut w)?;
    add_busybox(&mut w, c.busybox)?;
    let modules = add_modules(&mut w, c.kernel)?;
    let names = add_binaries(&mut w, c)?;
    for dir in c.data_dirs {
        add_tree(&mut w, dir)?;
    }
    let init = init_script(&InitParams {
        modules: &modules,
        tests: &names,
        test_args: c.test_args,
        cwd: c.tests_cwd,
        lib_dirs: &lib_dirs,
    });
    w.bytes("/init", 0o755, init.as_bytes())?;
    w.finish()
}

/// Mount points, the console node and the few files in /etc that programs look for.
fn add_skeleton(w: &mut cpio::Writer) -> Result<()> {
    for (dir, perm) in [
        ("/dev", 0o755),
        ("/proc", 0o555),
        ("/sys", 0o555),
        ("/run", 0o755),
        ("/tmp", 0o1777),
        ("/root", 0o700),
        ("/var", 0o755),
        ("/sbin", 0o755),
        ("/usr/bin", 0o755),
    ] {
        w.dir(dir, perm)?;
    }
    // The kernel opens /dev/console for init before anything could mount devtmpfs.
    w.char_device("/dev/console", 0o600, 5, 1)?;
    w.symlink("/var/run", "/run")?;
    w.bytes("/etc/hosts", 0o644, b"127.0.0.1 localhost\n::1 localhost\n")?;
    w.bytes("/etc/nsswitch.conf", 0o644, b"hosts: files\n")?;
    w.bytes("/etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")?;
    w.bytes("/etc/group", 0o644, b"root:x:0:\n")
}

/// The busybox binary and one symlink per applet, except for the [`HOST_TOOLS`].
fn add_busybox(w: &mut cpio::Writer, busybox: &Path) -> Result<()> {
    w.file("/bin/busybox", 0o755, busybox)?;
    let out = Command::new(busybox)
        .arg("--list")
        .output()
        .with_context(|| format!("running {} --list", busybox.display()))?;
    if !out.status.success() {
        bail!("{} --list failed", busybox.display());
    }
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        let applet = applet.trim();
        let replaced = HOST_TOOLS.iter().any(|(name, _, _)| *name == applet);
        if applet.is_empty() || applet == "busybox" || applet.contains('/') || replaced {
            continue;
        }
        w.symlink(&format!("/bin/{applet}"), "busybox")?;
    }
    Ok(())
}

/// The [`HOST_TOOLS`] and their shared libraries. Returns the library directories (for
/// `LD_LIBRARY_PATH`, as the guest has no ld.so.cache).
fn add_host_tools(w: &mut cpio::Writer) -> Result<Vec<String>> {
    let mut libs = BTreeSet::new();
    for (name, guest, package) in HOST_TOOLS {
        let host = which(name).with_context(|| {
            format!("the suites need {name} on the host: apt-get install {package}")
        })?;
        let out = Command::new("ldd")
            .arg(&host)
            .output()
            .with_context(|| format!("running ldd on {}", host.display()))?;
        if !out.status.success() {
            bail!("ldd {} failed", host.display());
        }
        libs.extend(ldd_paths(&String::from_utf8_lossy(&out.stdout)));
        w.file(guest, 0o755, &host)?;
    }
    let mut dirs = BTreeSet::new();
    for lib in &libs {
        w.file(lib, 0o755, Path::new(lib))?;
        if let Some((dir, _)) = lib.rsplit_once('/') {
            dirs.insert(dir.to_owned());
        }
    }
    Ok(dirs.into_iter().collect())
}

/// Absolute library paths from ldd output (`libc.so.6 => /lib/.../libc.so.6 (0x...)` and the
/// loader's `/lib64/ld-linux-x86-64.so.2 (0x...)`).
fn ldd_paths(ldd: &str) -> Vec<String> {
    ldd.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| path.to_owned())
        })
        .collect()
}

fn which(program: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .with_context(|| format!("{program} not found in PATH, /usr/sbin or /sbin"))
}

/// The needed modules and their dependencies, decompressed (busybox's insmod reads plain ELF),
/// in load order. Returns their guest paths.
fn add_modules(w: &mut cpio::Writer, kernel: &Kernel) -> Result<Vec<String>> {
    let index = module_index(&kernel.modules.join("kernel"))?;
    let builtin = fs::read_to_string(kernel.modules.join("modules.builtin")).unwrap_or_default();
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for name in MODULES {
        add_with_deps(name, &index, &builtin, &mut seen, &mut order)?;
    }
    let mut guest_paths = Vec::new();
    for (name, bytes) in order {
        let path = format!("/lib/modules/{}/{name}.ko", kernel.release);
        w.bytes(&path, 0o644, &bytes)?;
        guest_paths.push(path);
    }
    Ok(guest_paths)
}

/// Depth-first: dependencies land in `order` before the modules that need them.
fn add_with_deps(
    name: &str,
    index: &BTreeMap<String, PathBuf>,
    builtin: &str,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<(String, Vec<u8>)>,
) -> Result<()> {
    let name = name.replace('-', "_");
    if !seen.insert(name.clone()) {
        return Ok(());
    }
    let Some(path) = index.get(&name) else {
        let is_builtin = builtin
            .lines()
            .any(|l| module_name(Path::new(l)).is_some_and(|n| n == name));
        if is_builtin {
            return Ok(());
        }
        bail!("kernel module {name} is neither in the package nor built in");
    };
    let bytes = decompress(path)?;
    for dep in modinfo_depends(&bytes) {
        add_with_deps(&dep, index, builtin, seen, order)?;
    }
    order.push((name, bytes));
    Ok(())
}

/// Module name (dashes as underscores, as the kernel sees it) to file, for a module tree.
fn module_index(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut index = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(name) = module_name(&path) {
                index.insert(name, path);
            }
        }
    }
    Ok(index)
}

fn module_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext))?;
    Some(stem.replace('-', "_"))
}

/// Debian 6.12 kernels ship xz-compressed modules; 6.1 ships them plain.
fn decompress(path: &Path) -> Result<Vec<u8>> {
    let file = path.to_string_lossy();
    let tool = if file.ends_with(".xz") {
        "xz"
    } else if file.ends_with(".zst") {
        "zstd"
    } else if file.ends_with(".gz") {
        "gzip"
    } else {
        return fs::read(path).with_context(|| format!("reading {}", path.display()));
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("running {tool} to decompress {}", path.display()))?;
    if !out.status.success() {
        bail!(
            "{tool} -dc {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// The `depends=` list from a module's .modinfo strings (NUL-separated `key=value`).
fn modinfo_depends(module: &[u8]) -> Vec<String> {
    module
        .split(|&b| b == 0)
        .find_map(|s| s.strip_prefix(b"depends="))
        .map(|deps| {
            String::from_utf8_lossy(deps)
                .split(',')
                .filter(|d| !d.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Test binaries under their own file names, and the agent. Returns the tests' names.
fn add_binaries(w: &mut cpio::Writer, c: &Contents) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for test in c.tests {
        let name = test
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("odd test binary path {}", test.display()))?;
        w.file(&format!("{GUEST_TESTS}/{name}"), 0o755, test)?;
        names.push(name.to_owned());
    }
    w.file(GUEST_AGENT, 0o755, c.agent)?;
    Ok(names)
}

/// A host directory tree at the same absolute path (files and directories only).
fn add_tree(w: &mut cpio::Writer, dir: &Path) -> Result<()> {
    let guest = |p: &Path| -> Result<String> {
        p.to_str()
            .map(str::to_owned)
            .with_context(|| format!("non-UTF-8 path {}", p.display()))
    };
    w.dir(&guest(dir)?, 0o755)?;
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    entries.sort();
    for path in entries {
        if path.is_dir() {
            add_tree(w, &path)?;
        } else if path.is_file() {
            w.file(&guest(&path)?, 0o644, &path)?;
        }
    }
    Ok(())
}

struct InitParams<'a> {
    modules: &'a [String],
    tests: &'a [String],
    test_args: &'a [String],
    cwd: &'a Path,
    lib_dirs: &'a [String],
}

/// The guest's /init (busybox sh). It prepares what the suites expect of a host (proc, sysfs,
/// bpffs at /sys/fs/bpf, a tmpfs at /run/netns for `ip netns`, loopback up, modules loaded),
/// runs every test binary with its output streaming to the serial console, prints
/// [`RESULT_MARKER`] with the counts summed from each binary's `test result:` line, and
/// powers off. A binary that prints no result line, or exits non-zero without reporting a
/// failed test, counts as an error.
fn init_script(p: &InitParams) -> String {
    let insmods: String = p
        .modules
        .iter()
        .map(|m| format!("setup insmod {}\n", shell_quote(m)))
        .collect();
    let tests: Vec<String> = p.tests.iter().map(|t| shell_quote(t)).collect();
    let args: Vec<String> = p.test_args.iter().map(|a| shell_quote(a)).collect();
    let cwd = p.cwd.display().to_string();
    format!(
        r#"#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb RUST_BACKTRACE=1
export LD_LIBRARY_PATH={lib_path}
export CORS_AGENT_BIN={agent}
export CARGO_MANIFEST_DIR={cwd_q}
setup_errors=0
setup() {{
    "$@" || {{ echo "vm-test: setup step failed: $*"; setup_errors=$((setup_errors + 1)); }}
}}
setup mount -t proc proc /proc
setup mount -t sysfs sysfs /sys
setup mount -t devtmpfs devtmpfs /dev
setup mount -t bpf bpf /sys/fs/bpf
setup mount -t tmpfs tmpfs /run
setup mkdir -p /run/netns
setup mount -t tmpfs tmpfs /run/netns
setup ip link set lo up
{insmods}echo "vm-test: kernel $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/ {{print $2 / 1024 " MiB"}}' /proc/meminfo)"
echo {start}
passed=0 failed=0 ignored=0 errors=$setup_errors binaries=0
for t in {tests}; do
    binaries=$((binaries + 1))
    echo "vm-test: running ${{t%-*}}"
    rm -f /tmp/vmtest.rc
    ( cd {cwd_q} && {guest_tests}/"$t" {args}; echo $? > /tmp/vmtest.rc ) 2>&1 | tee /tmp/vmtest.out
    rc=$(cat /tmp/vmtest.rc 2>/dev/null || echo lost)
    counts=$(sed -n 's/^test result: [A-Za-z]*\. \([0-9]*\) passed; \([0-9]*\) failed; \([0-9]*\) ignored.*/\1 \2 \3/p' /tmp/vmtest.out | tail -n 1)
    if [ -z "$counts" ]; then
        echo "vm-test: ${{t%-*}} printed no test result (exit status $rc)"
        errors=$((errors + 1))
        continue
    fi
    set -- $counts
    passed=$((passed + $1)) failed=$((failed + $2)) ignored=$((ignored + $3))
    if [ "$rc" != 0 ] && [ "$2" = 0 ]; then
        echo "vm-test: ${{t%-*}} exited with status $rc although no test failed"
        errors=$((errors + 1))
    fi
done
echo "{result} passed=$passed failed=$failed ignored=$ignored errors=$errors binaries=$binaries"
poweroff -f
"#,
        lib_path = shell_quote(&p.lib_dirs.join(":")),
        agent = GUEST_AGENT,
        cwd_q = shell_quote(&cwd),
        guest_tests = GUEST_TESTS,
        tests = tests.join(" "),
        args = args.join(" "),
        start = START_MARKER,
        result = RESULT_MARKER,
    )
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The single directory entry of `dir` (a kernel package has one module tree).
fn single_entry(dir: &Path) -> Result<String> {
    let names: Vec<String> = fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    match names.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!(
            "expected one kernel release in {}, found {names:?}",
            dir.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output() {
        let ldd = "\tlinux-vdso.so.1 (0x00007f)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x7f)\n\t/lib64/ld-linux-x86-64.so.2 (0x7f)\n";
        assert_eq!(
            ldd_paths(ldd),
            [
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
    }

    #[test]
    fn modinfo() {
        let module =
            b"\x7fELF\0junk\0license=GPL\0depends=ip6_udp_tunnel,udp_tunnel\0vermagic=6.1\0";
        assert_eq!(modinfo_depends(module), ["ip6_udp_tunnel", "udp_tunnel"]);
        assert!(modinfo_depends(b"\0depends=\0").is_empty());
        assert_eq!(
            module_name(Path::new("/x/veth.ko.xz")).as_deref(),
            Some("veth")
        );
        assert_eq!(
            module_name(Path::new("kernel/net/ipv4/udp-tunnel.ko")).as_deref(),
            Some("udp_tunnel")
        );
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("a'b"), r"'a'\''b'");
    }
}
