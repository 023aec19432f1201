//! Debian packages for the guest, fetched with apt into a private cache under `target/`.
//!
//! The host's apt configuration is left alone: a private sources list (bookworm, its security
//! suite and bookworm-backports, from the mirrors the host already uses) and private lists,
//! package cache and status file are passed with `-o Dir::...`. The host's `apt.conf.d` still
//! applies, so proxies configured there keep working.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};

/// Refresh the private package lists when they are older than this: Debian removes superseded
/// kernel packages from the mirrors, so stale lists soon point at files that are gone.
const LISTS_MAX_AGE: Duration = Duration::from_secs(12 * 3600);
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
const DEFAULT_SECURITY_MIRROR: &str = "http://deb.debian.org/debian-security";
/// The metapackage whose versions name the cloud kernel of each series: 6.1.x in bookworm and
/// bookworm-security, 6.12.x in bookworm-backports.
const KERNEL_META: &str = "linux-image-cloud-amd64";

pub struct Apt {
    dir: PathBuf,
    /// Set once the lists were refreshed in this run, so a failure is not retried in vain.
    refreshed: bool,
}

/// A package version resolved from the lists.
#[derive(Clone, Debug)]
pub struct Package {
    pub name: String,
    pub version: String,
}

impl Apt {
    /// Prepares the private apt tree in `dir` and refreshes its lists when missing or old.
    pub fn open(dir: &Path) -> Result<Self> {
        if !Path::new(KEYRING).exists() {
            bail!("{KEYRING} is missing: install debian-archive-keyring");
        }
        for sub in ["lists/partial", "cache/archives/partial", "sources.list.d"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        fs::write(dir.join("sources.list"), sources_list())
            .context("writing the private apt sources list")?;
        if !dir.join("status").exists() {
            fs::write(dir.join("status"), "").context("writing the private dpkg status")?;
        }
        let mut apt = Self {
            dir: dir.to_owned(),
            refreshed: false,
        };
        if apt.lists_age().is_none_or(|age| age > LISTS_MAX_AGE) {
            apt.update()?;
        }
        Ok(apt)
    }

    /// The newest cloud kernel image of `series` ("6.1", "6.12").
    pub fn kernel_image(&mut self, series: &str) -> Result<Package> {
        match self.resolve_kernel(series) {
            Ok(pkg) => Ok(pkg),
            Err(_) if !self.refreshed => {
                self.update()?;
                self.resolve_kernel(series)
            }
            Err(e) => Err(e),
        }
    }

    /// Downloads `pkg` (or takes it from the cache) into `debs` and returns the .deb's path.
    pub fn download(&mut self, pkg: &Package, debs: &Path) -> Result<PathBuf> {
        fs::create_dir_all(debs).with_context(|| format!("creating {}", debs.display()))?;
        if let Some(found) = find_deb(debs, pkg)? {
            return Ok(found);
        }
        let spec = format!("{}={}", pkg.name, pkg.version);
        let mut ok = self.run_in(debs, "apt-get", &["download", &spec]).is_ok();
        if !ok && !self.refreshed {
            // The lists may name a version the mirror no longer has.
            self.update()?;
            ok = self.run_in(debs, "apt-get", &["download", &spec]).is_ok();
        }
        if !ok {
            bail!("apt-get download {spec} failed (see apt's messages above)");
        }
        find_deb(debs, pkg)?.with_context(|| format!("apt-get download {spec} wrote no .deb"))
    }

    /// The candidate version of a package, e.g. busybox-static.
    pub fn candidate(&mut self, name: &str) -> Result<Package> {
        let out = self.output("apt-cache", &["madison", name])?;
        let version = madison_versions(&out)
            .into_iter()
            .next()
            .with_context(|| format!("no package {name} in the private apt lists"))?;
        Ok(Package {
            name: name.to_owned(),
            version,
        })
    }

    fn resolve_kernel(&self, series: &str) -> Result<Package> {
        let out = self.output("apt-cache", &["madison", KERNEL_META])?;
        // apt keeps a package's versions sorted newest first.
        let prefix = format!("{series}.");
        let version = madison_versions(&out)
            .into_iter()
            .find(|v| v.starts_with(&prefix))
            .with_context(|| format!("no {KERNEL_META} {series}.x in bookworm or its backports"))?;
        let show = self.output("apt-cache", &["show", &format!("{KERNEL_META}={version}")])?;
        let name = first_dependency(&show)
            .with_context(|| format!("{KERNEL_META} {version} depends on no kernel image"))?;
        Ok(Package { name, version })
    }

    fn update(&mut self) -> Result<()> {
        println!(
            "vm-test: refreshing the private apt lists in {}",
            self.dir.display()
        );
        self.refreshed = true;
        self.run_in(&self.dir, "apt-get", &["-q", "update"])
            .context("apt-get update (private lists for bookworm, -security and -backports)")?;
        fs::write(self.dir.join("lists/.vm-test-updated"), "")
            .context("recording the apt update time")
    }

    fn lists_age(&self) -> Option<Duration> {
        let stamp = fs::metadata(self.dir.join("lists/.vm-test-updated")).ok()?;
        SystemTime::now()
            .duration_since(stamp.modified().ok()?)
            .ok()
    }

    fn command(&self, program: &str) -> Command {
        let d = |sub: &str| self.dir.join(sub).display().to_string();
        let mut cmd = Command::new(program);
        for (key, value) in [
            ("Dir::Etc::SourceList", d("sources.list")),
            ("Dir::Etc::SourceParts", d("sources.list.d")),
            ("Dir::State::Lists", d("lists")),
            ("Dir::State::status", d("status")),
            ("Dir::Cache", d("cache")),
            // The private tree belongs to whoever runs the xtask; apt's `_apt` sandbox user
            // could not write there.
            ("APT::Sandbox::User", "root".to_owned()),
        ] {
            cmd.arg("-o").arg(format!("{key}={value}"));
        }
        cmd
    }

    fn run_in(&self, cwd: &Path, program: &str, args: &[&str]) -> Result<()> {
        let status = self
            .command(program)
            .args(args)
            .current_dir(cwd)
            .status()
            .with_context(|| format!("starting {program} (is apt installed?)"))?;
        if !status.success() {
            bail!("{program} {} exited with {status}", args.join(" "));
        }
        Ok(())
    }

    fn output(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = self
            .command(program)
            .args(args)
            .output()
            .with_context(|| format!("starting {program}"))?;
        if !out.status.success() {
            bail!(
                "{program} {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn sources_list() -> String {
    let mirror = host_mirror("bookworm").unwrap_or_else(|| DEFAULT_MIRROR.to_owned());
    let security =
        host_mirror("bookworm-security").unwrap_or_else(|| DEFAULT_SECURITY_MIRROR.to_owned());
    let line = |uri: &str, suite: &str| format!("deb [signed-by={KEYRING}] {uri} {suite} main\n");
    [
        line(&mirror, "bookworm"),
        line(&mirror, "bookworm-backports"),
        line(&security, "bookworm-security"),
    ]
    .concat()
}

/// The URI the host's apt sources use for `suite` (one-line and deb822 formats), so the
/// private lists come from the same mirror or proxy.
fn host_mirror(suite: &str) -> Option<String> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    files.iter().find_map(|f| {
        let text = fs::read_to_string(f).ok()?;
        match f.extension().and_then(|e| e.to_str()) {
            Some("sources") => deb822_mirror(&text, suite),
            Some("list") | None => one_line_mirror(&text, suite),
            _ => None,
        }
    })
}

fn one_line_mirror(text: &str, suite: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        if words.next()? != "deb" {
            return None;
        }
        let mut uri = words.next()?;
        if uri.starts_with('[') {
            // Options: skip up to the closing bracket.
            while !uri.ends_with(']') {
                uri = words.next()?;
            }
            uri = words.next()?;
        }
        (words.next()? == suite).then(|| uri.trim_end_matches('/').to_owned())
    })
}

fn deb822_mirror(text: &str, suite: &str) -> Option<String> {
    text.split("\n\n").find_map(|stanza| {
        let field = |name: &str| {
            stanza.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
            })
        };
        let is_deb = field("Types").is_some_and(|t| t.split_whitespace().any(|t| t == "deb"));
        let has_suite = field("Suites").is_some_and(|s| s.split_whitespace().any(|s| s == suite));
        let enabled = field("Enabled").is_none_or(|e| e != "no");
        if !(is_deb && has_suite && enabled) {
            return None;
        }
        let uri = field("URIs")?.split_whitespace().next()?;
        Some(uri.trim_end_matches('/').to_owned())
    })
}

/// Versions from `apt-cache madison` output ("pkg | version | source"), in apt's order.
fn madison_versions(out: &str) -> Vec<String> {
    let mut versions: Vec<String> = Vec::new();
    for line in out.lines() {
        if let Some(v) = line.split('|').nth(1).map(str::trim)
            && !versions.iter().any(|seen| seen == v)
        {
            versions.push(v.to_owned());
        }
    }
    versions
}

/// The first package of the first `Depends:` field in `apt-cache show` output.
fn first_dependency(show: &str) -> Option<String> {
    let deps = show.lines().find_map(|l| l.strip_prefix("Depends:"))?;
    let first = deps.split([',', '|']).next()?.split_whitespace().next()?;
    Some(first.to_owned())
}

/// apt-get download names files `<name>_<version with ':' as %3a>_<arch>.deb`.
fn find_deb(dir: &Path, pkg: &Package) -> Result<Option<PathBuf>> {
    let prefix = format!("{}_{}_", pkg.name, pkg.version.replace(':', "%3a"));
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_from_both_source_formats() {
        let deb822 = "Types: deb\nURIs: http://deb.debian.org/debian/\nSuites: bookworm bookworm-updates\nComponents: main\n\nTypes: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n";
        assert_eq!(
            deb822_mirror(deb822, "bookworm").as_deref(),
            Some("http://deb.debian.org/debian")
        );
        assert_eq!(
            deb822_mirror(deb822, "bookworm-security").as_deref(),
            Some("http://deb.debian.org/debian-security")
        );
        let list =
            "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main\n";
        assert_eq!(
            one_line_mirror(list, "bookworm").as_deref(),
            Some("http://m.example/debian")
        );
        assert_eq!(one_line_mirror(list, "trixie"), None);
    }

    #[test]
    fn madison_and_depends() {
        let madison = "linux-image-cloud-amd64 | 6.12.95-1~bpo12+1 | http://x bookworm-backports/main amd64 Packages\nlinux-image-cloud-amd64 |  6.1.192-3 | http://x bookworm-security/main amd64 Packages\n";
        assert_eq!(
            madison_versions(madison),
            ["6.12.95-1~bpo12+1", "6.1.192-3"]
        );
        let show = "Package: linux-image-cloud-amd64\nDepends: linux-image-6.1.0-57-cloud-amd64 (= 6.1.192-3)\n";
        assert_eq!(
            first_dependency(show).as_deref(),
            Some("linux-image-6.1.0-57-cloud-amd64")
        );
    }
}
