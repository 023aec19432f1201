//! `cargo xtask build-ebpf`: build the `cors-ebpf` sk_lookup program and write
//! it to `cors-agent/src/steer/cors-ebpf.bpf.o`, where the agent embeds it.
//!
//! The object is committed so that a fresh clone builds the agent with the
//! stable toolchain alone. Building the object needs nightly (for
//! `-Z build-std=core` on `bpfel-unknown-none`), `rust-src`, and `bpf-linker`
//! 0.13 linked against the same LLVM major version as that nightly. This
//! module installs what is missing where it can and otherwise says exactly
//! what to run.
//!
//! Reproducibility: every absolute path that ends up in the object (debug
//! info, BTF, panic locations) is remapped (`--remap-path-prefix`) for the
//! workspace, the target directory, `$CARGO_HOME` and `$RUSTUP_HOME`, so the
//! same toolchain produces the same bytes from any checkout location.
//! `--check` relies on that: it rebuilds into a temporary directory and
//! compares bytes with the committed object.

use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

/// Nightly toolchain used for the eBPF build.
const TOOLCHAIN: &str = "nightly";
/// bpf-linker release line the build is tested with.
const BPF_LINKER_VERSION: &str = "0.13";
const TARGET: &str = "bpfel-unknown-none";
/// Committed object, relative to the workspace root.
const OBJECT: &str = "cors-agent/src/steer/cors-ebpf.bpf.o";
/// Committed record of the toolchain that produced [`OBJECT`]; `--check`
/// prints it when the bytes differ, since a different nightly or bpf-linker
/// is the usual reason.
const TOOLCHAIN_RECORD: &str = "cors-agent/src/steer/cors-ebpf.bpf.o.toolchain";

#[derive(clap::Args)]
pub struct BuildEbpf {
    /// Rebuild into a temporary directory and fail if the result differs
    /// from the committed object (for CI).
    #[arg(long)]
    check: bool,
    /// Only report missing prerequisites; do not run apt-get, rustup or
    /// cargo install.
    #[arg(long)]
    no_install: bool,
}

pub fn run(args: BuildEbpf) -> Result<()> {
    let root = crate::workspace_root();
    let tools = Prerequisites::ensure(!args.no_install)?;
    if args.check {
        check(&root, &tools)
    } else {
        let target_dir = root.join("target/ebpf");
        let built = build(&root, &target_dir)?;
        let object = root.join(OBJECT);
        if let Some(dir) = object.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        fs::copy(&built, root.join(OBJECT))
            .with_context(|| format!("copying {} to {OBJECT}", built.display()))?;
        fs::write(root.join(TOOLCHAIN_RECORD), tools.record())
            .with_context(|| format!("writing {TOOLCHAIN_RECORD}"))?;
        println!(
            "wrote {OBJECT} ({} bytes)",
            fs::metadata(root.join(OBJECT))?.len()
        );
        Ok(())
    }
}

fn check(root: &Path, tools: &Prerequisites) -> Result<()> {
    let tmp = env::temp_dir().join(format!("cors-xtask-ebpf-check-{}", std::process::id()));
    // Fresh directory, so nothing from an earlier build can mask a difference.
    let _ = fs::remove_dir_all(&tmp);
    let result = build(root, &tmp).and_then(|built| {
        let fresh = fs::read(&built).with_context(|| format!("reading {}", built.display()))?;
        let committed = fs::read(root.join(OBJECT)).with_context(|| {
            format!("reading committed {OBJECT}; run `cargo xtask build-ebpf` and commit it")
        })?;
        Ok((fresh, committed))
    });
    let _ = fs::remove_dir_all(&tmp);
    let (fresh, committed) = result?;
    if fresh == committed {
        println!("{OBJECT} is up to date ({} bytes)", committed.len());
        return Ok(());
    }
    let first_diff = fresh
        .iter()
        .zip(&committed)
        .position(|(a, b)| a != b)
        .unwrap_or(fresh.len().min(committed.len()));
    let recorded = fs::read_to_string(root.join(TOOLCHAIN_RECORD))
        .unwrap_or_else(|_| format!("(no {TOOLCHAIN_RECORD})\n"));
    bail!(
        "{OBJECT} is stale: a fresh build differs (fresh {} bytes, committed {} bytes, first \
         difference at byte {first_diff}).\n\
         If you changed cors-ebpf/ or cors-common/, run `cargo xtask build-ebpf` and commit \
         {OBJECT} and {TOOLCHAIN_RECORD}.\n\
         Otherwise compare toolchains; the committed object was built with:\n{recorded}\
         this build used:\n{}",
        fresh.len(),
        committed.len(),
        tools.record()
    )
}

/// Builds the object into `target_dir` and returns the path of the result.
fn build(root: &Path, target_dir: &Path) -> Result<PathBuf> {
    let crate_dir = root.join("cors-ebpf");
    let cargo_home = cargo_home()?;
    let rustup_home = rustup_home()?;
    // Later prefixes win when several match (the target dir lives inside the
    // workspace), so the most specific one goes last.
    let remaps = [
        (cargo_home.as_path(), "/cargo"),
        (rustup_home.as_path(), "/rustup"),
        (root, "/cors-agent"),
        (target_dir, "/target"),
    ];
    let mut flags: Vec<OsString> = vec![
        // aya-ebpf uses this cfg for architecture-specific helpers.
        "--cfg=bpf_target_arch=\"x86_64\"".into(),
        // BTF (derived from debug info by bpf-linker) gives readable verifier
        // logs and `bpftool prog dump` output.
        "-Cdebuginfo=2".into(),
        "-Clink-arg=--btf".into(),
    ];
    for (from, to) in remaps {
        let mut flag = OsString::from("--remap-path-prefix=");
        flag.push(from);
        flag.push("=");
        flag.push(to);
        flags.push(flag);
    }
    let encoded = flags.join(&OsString::from("\x1f"));

    let mut cmd = Command::new("rustup");
    cmd.args(["run", TOOLCHAIN, "cargo", "build", "--release", "--locked"])
        .args(["--target", TARGET, "-Z", "build-std=core"])
        .arg("--manifest-path")
        .arg(crate_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(&crate_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", encoded)
        .env("PATH", path_with_cargo_bin(&cargo_home)?);
    // Anything inherited from the outer (stable) cargo invocation would
    // either change the bytes or pick the wrong compiler.
    for var in [
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTDOC",
        "RUSTUP_TOOLCHAIN",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        cmd.env_remove(var);
    }
    run_cmd(&mut cmd, "building cors-ebpf")?;
    let built = target_dir.join(TARGET).join("release/cors-ebpf");
    if !built.is_file() {
        bail!("build succeeded but {} is missing", built.display());
    }
    Ok(built)
}

/// The tools found (or installed) for the build.
struct Prerequisites {
    rustc_version: String,
    llvm_major: u32,
    bpf_linker_version: String,
}

impl Prerequisites {
    fn ensure(install: bool) -> Result<Self> {
        if which("rustup").is_none() {
            bail!(
                "rustup not found in PATH. The eBPF build needs a rustup-managed nightly toolchain: \
                 install rustup (https://rustup.rs), then run \
                 `rustup toolchain install nightly --component rust-src`."
            );
        }
        let rustc_vv = match output(Command::new("rustup").args(["run", TOOLCHAIN, "rustc", "-vV"]))
        {
            Ok(out) => out,
            Err(_) if install => {
                run_cmd(
                    Command::new("rustup").args([
                        "toolchain",
                        "install",
                        TOOLCHAIN,
                        "--profile",
                        "minimal",
                        "--component",
                        "rust-src",
                    ]),
                    "installing the nightly toolchain",
                )?;
                output(Command::new("rustup").args(["run", TOOLCHAIN, "rustc", "-vV"]))?
            }
            Err(e) => bail!("{e}\nrun: rustup toolchain install {TOOLCHAIN} --component rust-src"),
        };
        let rustc_version = rustc_vv
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned();
        let llvm = field(&rustc_vv, "LLVM version:")
            .context("`rustc +nightly -vV` printed no LLVM version")?;
        let llvm_major: u32 = llvm
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .with_context(|| format!("unparsable LLVM version {llvm:?}"))?;

        ensure_rust_src(install)?;
        let bpf_linker_version = ensure_bpf_linker(llvm_major, install)?;
        Ok(Self {
            rustc_version: format!("{rustc_version} (LLVM {llvm})"),
            llvm_major,
            bpf_linker_version,
        })
    }

    fn record(&self) -> String {
        format!(
            "# Toolchain that built cors-ebpf.bpf.o (written by `cargo xtask build-ebpf`).\n\
             {}\n{} (LLVM {})\n",
            self.rustc_version, self.bpf_linker_version, self.llvm_major
        )
    }
}

fn ensure_rust_src(install: bool) -> Result<()> {
    let sysroot =
        output(Command::new("rustup").args(["run", TOOLCHAIN, "rustc", "--print", "sysroot"]))?;
    let core = Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library/core");
    if core.is_dir() {
        return Ok(());
    }
    let fix = format!("rustup component add rust-src --toolchain {TOOLCHAIN}");
    if !install {
        bail!("rust-src is missing for {TOOLCHAIN} (needed by -Z build-std=core); run: {fix}");
    }
    run_cmd(
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", TOOLCHAIN]),
        "installing rust-src",
    )
}

/// Makes sure a bpf-linker of the expected release line, linked against
/// LLVM `llvm_major`, is on PATH; returns its version string.
fn ensure_bpf_linker(llvm_major: u32, install: bool) -> Result<String> {
    let cargo_home = cargo_home()?;
    let path = path_with_cargo_bin(&cargo_home)?;
    let current = output(
        Command::new("bpf-linker")
            .arg("--version")
            .env("PATH", &path),
    )
    .ok();
    let good_version = current.as_deref().is_some_and(|v| {
        v.trim()
            .starts_with(&format!("bpf-linker {BPF_LINKER_VERSION}."))
    });
    let linked_llvm = bpf_linker_llvm_major(&path);
    // `None` means we could not tell (static LLVM or no ldd): trust it.
    let good_llvm = linked_llvm.is_none_or(|m| m == llvm_major);
    if let (true, true, Some(v)) = (good_version, good_llvm, &current) {
        return Ok(v.trim().to_owned());
    }

    let llvm_prefix = format!("/usr/lib/llvm-{llvm_major}");
    let apt_packages = [
        format!("llvm-{llvm_major}-dev"),
        format!("libpolly-{llvm_major}-dev"),
        "zlib1g-dev".to_owned(),
        "libzstd-dev".to_owned(),
    ];
    let install_cmd = format!(
        "LLVM_PREFIX={llvm_prefix} cargo install bpf-linker --version ~{BPF_LINKER_VERSION} \
         --no-default-features --features llvm-{llvm_major} --force"
    );
    let why = match (&current, linked_llvm) {
        (None, _) => "bpf-linker is not installed".to_owned(),
        (Some(v), Some(m)) if m != llvm_major => {
            format!(
                "{} is linked against LLVM {m}, nightly uses LLVM {llvm_major}",
                v.trim()
            )
        }
        (Some(v), _) => format!("found {}, need {BPF_LINKER_VERSION}.x", v.trim()),
    };
    if !install {
        bail!(
            "{why}. Run:\n  apt-get update && apt-get install -y {}\n  {install_cmd}",
            apt_packages.join(" ")
        );
    }
    eprintln!("xtask: {why}; installing bpf-linker {BPF_LINKER_VERSION} for LLVM {llvm_major}");

    let llvm_config = Path::new(&llvm_prefix).join("bin/llvm-config");
    if !llvm_config.exists() {
        if which("apt-get").is_none() {
            bail!(
                "{} not found and apt-get is unavailable: install LLVM {llvm_major} development \
                 files (llvm-config, libLLVM, Polly) under {llvm_prefix}, then run:\n  {install_cmd}",
                llvm_config.display()
            );
        }
        let fix = format!(
            "apt-get update && apt-get install -y {}",
            apt_packages.join(" ")
        );
        run_cmd(Command::new("apt-get").arg("update"), "apt-get update")
            .with_context(|| format!("needs root; run: {fix}"))?;
        run_cmd(
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends"])
                .args(&apt_packages)
                .env("DEBIAN_FRONTEND", "noninteractive"),
            "installing LLVM development packages",
        )
        .with_context(|| {
            format!("needs root and an apt source with LLVM {llvm_major}; run: {fix}")
        })?;
    }
    run_cmd(
        Command::new("cargo")
            .args(["install", "bpf-linker", "--version"])
            .arg(format!("~{BPF_LINKER_VERSION}"))
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{llvm_major}"))
            .arg("--force")
            .env("LLVM_PREFIX", &llvm_prefix)
            .env_remove("RUSTUP_TOOLCHAIN"),
        "installing bpf-linker",
    )
    .with_context(|| format!("run: {install_cmd}"))?;
    let v = output(
        Command::new("bpf-linker")
            .arg("--version")
            .env("PATH", &path),
    )?;
    Ok(v.trim().to_owned())
}

/// LLVM major version bpf-linker is dynamically linked against, from `ldd`.
fn bpf_linker_llvm_major(path: &OsString) -> Option<u32> {
    let exe = env::split_paths(path)
        .map(|d| d.join("bpf-linker"))
        .find(|p| p.is_file())?;
    let ldd = output(Command::new("ldd").arg(exe)).ok()?;
    let rest = ldd.split("libLLVM").nth(1)?;
    // Forms seen: "libLLVM.so.22.1", "libLLVM-22.so".
    let digits: String = rest
        .trim_start_matches(['.', '-', 's', 'o'])
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

fn home() -> Result<PathBuf> {
    env::var_os("HOME")
        .map(PathBuf::from)
        .context("HOME is not set (needed to find ~/.cargo and ~/.rustup)")
}

fn cargo_home() -> Result<PathBuf> {
    match env::var_os("CARGO_HOME") {
        Some(p) => Ok(PathBuf::from(p)),
        None => Ok(home()?.join(".cargo")),
    }
}

fn rustup_home() -> Result<PathBuf> {
    match env::var_os("RUSTUP_HOME") {
        Some(p) => Ok(PathBuf::from(p)),
        None => Ok(home()?.join(".rustup")),
    }
}

/// PATH with `$CARGO_HOME/bin` first, where `cargo install` puts bpf-linker.
fn path_with_cargo_bin(cargo_home: &Path) -> Result<OsString> {
    let mut dirs = vec![cargo_home.join("bin")];
    if let Some(path) = env::var_os("PATH") {
        dirs.extend(env::split_paths(&path));
    }
    env::join_paths(dirs).context("PATH contains an invalid entry")
}

fn which(program: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("{cmd:?} printed non-UTF-8"))
}

fn run_cmd(cmd: &mut Command, what: &str) -> Result<()> {
    eprintln!("xtask: {what}: {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("{what}: could not run {cmd:?}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}
