//! Kernel side plumbing: the embedded sk_lookup object, environment checks,
//! loading one program + maps instance, map updates, and forwarding the
//! program's aya-log records into `tracing`.

use std::{
    collections::BTreeSet,
    io,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, MapError, MapInfo, MapType, SockMap},
    programs::SkLookup,
};
use aya_log::EbpfLogger;
use cors_common::{
    GLOBAL_FAIL_CLOSED, LISTENER_SLOTS, ListenerSlot, MAP_LISTENERS, MAP_PORTS, MAX_PORTS,
    PROGRAM_NAME, PortKey, PortValue,
};
use rustix::thread::CapabilitySet;
use tokio::{io::unix::AsyncFd, task::JoinHandle};

use super::error::{Result, SteerError};

/// The sk_lookup program, built by `cargo xtask build-ebpf` and committed so
/// the agent builds with the stable toolchain alone.
static OBJECT: &[u8] = aya::include_bytes_aligned!("cors-ebpf.bpf.o");

/// `f_type` of bpffs.
const BPF_FS_MAGIC: u64 = 0xcafe_4a11;

/// Typed handles on the two maps the program reads.
pub(crate) struct Maps {
    pub listeners: SockMap<MapData>,
    pub ports: HashMap<MapData, PortKey, PortValue>,
}

/// Fails early, with the reason, when this process or kernel cannot steer.
pub(crate) fn check_environment(pod: &str) -> Result<()> {
    let uname = rustix::system::uname();
    let release = uname.release().to_string_lossy().into_owned();
    if !kernel_at_least(&release, 5, 9) {
        return Err(SteerError::KernelTooOld { release });
    }
    // Only a pre-check for a readable message; the kernel has the last word
    // (see `permission_hint`).
    if let Ok(caps) = rustix::thread::capabilities(None) {
        let needed = [
            (CapabilitySet::BPF, "CAP_BPF"),
            (CapabilitySet::NET_ADMIN, "CAP_NET_ADMIN"),
            (CapabilitySet::SYS_ADMIN, "CAP_SYS_ADMIN"),
        ];
        let missing: Vec<&str> = needed
            .iter()
            .filter(|(cap, _)| !caps.effective.contains(*cap))
            .map(|(_, name)| *name)
            .collect();
        if !missing.is_empty() {
            return Err(SteerError::MissingCapabilities {
                pod: pod.to_owned(),
                missing: missing.join(", "),
            });
        }
    }
    Ok(())
}

/// Parses "6.18.44-foo" style releases.
fn kernel_at_least(release: &str, major: u32, minor: u32) -> bool {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u32>().unwrap_or(0));
    let (Some(maj), Some(min)) = (parts.next(), parts.next()) else {
        // Unknown format: let the load attempt decide.
        return true;
    };
    (maj, min) >= (major, minor)
}

/// Maps `EPERM`/`EACCES` from a kernel call to a message naming the
/// capabilities; other errors go through `other`.
pub(crate) fn permission_hint(
    pod: &str,
    action: &'static str,
    err: &io::Error,
) -> Option<SteerError> {
    matches!(err.kind(), io::ErrorKind::PermissionDenied).then(|| SteerError::PermissionDenied {
        pod: pod.to_owned(),
        action,
        source: io::Error::new(err.kind(), err.to_string()),
    })
}

/// Where a fail-closed pod's objects are pinned.
#[derive(Debug, Clone)]
pub(crate) struct PinPaths {
    pub dir: PathBuf,
    pub listeners: PathBuf,
    pub ports: PathBuf,
}

/// Pinned links are named `link_<kernel link id>` (bpffs refuses names with
/// dots). bpffs has no rename, so a
/// takeover pins the new link under its own name first and only then
/// removes the old one(s): the namespace is never without a program.
const LINK_PREFIX: &str = "link_";

impl PinPaths {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            listeners: dir.join(MAP_LISTENERS),
            ports: dir.join(MAP_PORTS),
            dir,
        }
    }

    /// Creates the directory; checks it is on bpffs.
    pub fn prepare(&self, pod: &str) -> Result<()> {
        let pin_err = |source| SteerError::Pin {
            pod: pod.to_owned(),
            path: self.dir.clone(),
            source,
        };
        // Check the closest existing ancestor first so a missing bpffs mount
        // gives a clear message instead of mkdir creating a plain directory.
        let mut probe: &Path = &self.dir;
        while !probe.exists() {
            match probe.parent() {
                Some(p) => probe = p,
                None => break,
            }
        }
        let fs = rustix::fs::statfs(probe).map_err(|e| pin_err(e.into()))?;
        #[allow(clippy::unnecessary_cast)]
        if fs.f_type as u64 != BPF_FS_MAGIC {
            return Err(SteerError::NotBpffs {
                pod: pod.to_owned(),
                path: probe.to_path_buf(),
            });
        }
        std::fs::create_dir_all(&self.dir).map_err(pin_err)
    }

    /// Removes pinned maps that do not match what this build expects (left
    /// by an older agent), so the load below creates fresh ones.
    pub fn drop_incompatible_maps(&self, pod: &str) {
        let expected = [
            (&self.listeners, MapType::SockMap, 4, 4, LISTENER_SLOTS),
            (&self.ports, MapType::Hash, 4, 4, MAX_PORTS),
        ];
        for (path, ty, key, value, max) in expected {
            if !path.exists() {
                continue;
            }
            let ok = MapInfo::from_pin(path).is_ok_and(|info| {
                info.map_type().is_ok_and(|t| t == ty)
                    && info.key_size() == key
                    && info.value_size() == value
                    && info.max_entries() == max
            });
            if !ok {
                tracing::warn!(pod, path = %path.display(), "removing incompatible pinned map");
                let _ = std::fs::remove_file(path);
            }
        }
    }

    pub fn link(&self, link_id: u32) -> PathBuf {
        self.dir.join(format!("{LINK_PREFIX}{link_id}"))
    }

    /// Unpins every link except `keep` (an earlier agent's; detached once no
    /// process holds it any more).
    pub fn remove_links_except(&self, keep: Option<&Path>) -> io::Result<()> {
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let is_link = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(LINK_PREFIX));
            if is_link && Some(path.as_path()) != keep {
                remove_if_exists(&path)?;
            }
        }
        Ok(())
    }

    /// Removes everything pinned for the pod. Unpinning the links detaches
    /// the program once no process holds it.
    pub fn remove_all(&self) -> io::Result<()> {
        if !self.dir.exists() {
            return Ok(());
        }
        self.remove_links_except(None)?;
        remove_if_exists(&self.listeners)?;
        remove_if_exists(&self.ports)?;
        match std::fs::remove_dir(&self.dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The program's aya-log ring buffer, in bytes (a power of two, whole pages).
/// aya-log-ebpf's default, 128 KiB, is mapped twice into the agent for wrap-
/// around reads: 260 KiB of resident memory per enrolled pod, 26 MiB for 100
/// pods (`cargo xtask bench`). The program logs warnings only at the default
/// level; 16 KiB holds two of the largest records. Debug records beyond it
/// are dropped under load, which costs diagnostics, never steering.
const LOG_RING_BYTES: u32 = 16 * 1024;
/// aya-log's map (`aya_log::MAP_NAME`, private in aya-log 0.3).
const MAP_LOGS: &str = "AYA_LOGS";

/// Loads one instance of the object: maps created (or, with `pins`, reused
/// from bpffs), program verified and loaded but not attached.
pub(crate) fn load(pod: &str, fail_closed: bool, pins: Option<&PinPaths>) -> Result<(Ebpf, Maps)> {
    let loaded = load_object(pod, fail_closed, pins);
    // The loader, and the kernel BTF it parsed, are gone now.
    crate::memory::release_freed();
    loaded
}

/// Drops what aya keeps of a loaded object once the program is attached (its link taken)
/// and the maps and the log ring are taken: the program and its maps stay in the kernel, held
/// by the link. Dropping it unloads nothing else: aya detaches only the links it still owns.
/// Then returns the freed heap, as after a load.
pub(crate) fn release(ebpf: Ebpf) {
    drop(ebpf);
    crate::memory::release_freed();
}

fn load_object(pod: &str, fail_closed: bool, pins: Option<&PinPaths>) -> Result<(Ebpf, Maps)> {
    let mut loader = EbpfLoader::new();
    loader.map_max_entries(MAP_LOGS, LOG_RING_BYTES);
    let fail_closed = u8::from(fail_closed);
    let log_level = ebpf_log_level();
    loader
        .override_global(GLOBAL_FAIL_CLOSED, &fail_closed, true)
        // Records above the agent's tracing level are skipped in the kernel.
        .override_global(aya_log::LEVEL, &log_level, false);
    if let Some(pins) = pins {
        // Reuses the pinned maps if present, otherwise creates and pins them.
        loader
            .map_pin_path(MAP_LISTENERS, pins.listeners.as_path())
            .map_pin_path(MAP_PORTS, pins.ports.as_path());
    }
    let mut ebpf = loader.load(OBJECT).map_err(|e| {
        if let aya::EbpfError::MapError(MapError::CreateError { io_error, .. }) = &e
            && let Some(hint) = permission_hint(pod, "creating BPF maps", io_error)
        {
            return hint;
        }
        SteerError::Load {
            pod: pod.to_owned(),
            source: Box::new(e),
        }
    })?;

    let program: &mut SkLookup = ebpf
        .program_mut(PROGRAM_NAME)
        .ok_or(SteerError::MissingObject {
            pod: pod.to_owned(),
            what: "program",
            name: PROGRAM_NAME,
        })?
        .try_into()
        .map_err(|e| program_err(pod, "typing", e))?;
    program.load().map_err(|e| program_err(pod, "loading", e))?;

    let listeners = take_map(&mut ebpf, pod, MAP_LISTENERS)?;
    let listeners =
        SockMap::try_from(listeners).map_err(|e| map_err(pod, MAP_LISTENERS, "opening", e))?;
    let ports = take_map(&mut ebpf, pod, MAP_PORTS)?;
    let ports = HashMap::try_from(ports).map_err(|e| map_err(pod, MAP_PORTS, "opening", e))?;
    Ok((ebpf, Maps { listeners, ports }))
}

/// Attaches the loaded program to a network namespace. The link stays owned
/// by the program inside `ebpf` unless taken (for pinning).
pub(crate) fn attach(
    ebpf: &mut Ebpf,
    pod: &str,
    netns: impl AsFd,
) -> Result<aya::programs::sk_lookup::SkLookupLink> {
    let program: &mut SkLookup = ebpf
        .program_mut(PROGRAM_NAME)
        .ok_or(SteerError::MissingObject {
            pod: pod.to_owned(),
            what: "program",
            name: PROGRAM_NAME,
        })?
        .try_into()
        .map_err(|e| program_err(pod, "typing", e))?;
    let id = program
        .attach(netns)
        .map_err(|e| program_err(pod, "attaching", e))?;
    program
        .take_link(id)
        .map_err(|e| program_err(pod, "taking the link of", e))
}

/// Kernel id of the loaded program, if the kernel tells.
pub(crate) fn program_id(ebpf: &Ebpf) -> Option<u32> {
    ebpf.program(PROGRAM_NAME)?.info().ok().map(|i| i.id())
}

fn take_map(ebpf: &mut Ebpf, pod: &str, name: &'static str) -> Result<aya::maps::Map> {
    ebpf.take_map(name).ok_or(SteerError::MissingObject {
        pod: pod.to_owned(),
        what: "map",
        name,
    })
}

fn program_err(pod: &str, action: &'static str, e: aya::programs::ProgramError) -> SteerError {
    let io_error = match &e {
        aya::programs::ProgramError::LoadError { io_error, .. } => Some(io_error),
        aya::programs::ProgramError::SyscallError(s) => Some(&s.io_error),
        _ => None,
    };
    if let Some(hint) = io_error.and_then(|io| permission_hint(pod, action, io)) {
        return hint;
    }
    SteerError::Program {
        pod: pod.to_owned(),
        action,
        source: Box::new(e),
    }
}

pub(crate) fn map_err(
    pod: &str,
    map: &'static str,
    action: &'static str,
    e: MapError,
) -> SteerError {
    SteerError::Map {
        pod: pod.to_owned(),
        map,
        action,
        source: Box::new(e),
    }
}

/// Makes the steered port set exactly `ports`: adds missing ones first, then
/// removes stale ones, so a port in both sets is never briefly unsteered.
pub(crate) fn sync_ports(maps: &mut Maps, pod: &str, ports: &BTreeSet<u16>) -> Result<()> {
    for &port in ports {
        maps.ports
            .insert(PortKey::new(port), PortValue::STEER, 0)
            .map_err(|e| map_err(pod, MAP_PORTS, "adding a port", e))?;
    }
    let stale: Vec<PortKey> = maps
        .ports
        .keys()
        .filter_map(|k| k.ok())
        .filter(|k| !ports.contains(&k.port))
        .collect();
    for key in stale {
        match maps.ports.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(pod, MAP_PORTS, "removing a port", e)),
        }
    }
    Ok(())
}

/// Puts a listener into the slot of the family it serves.
pub(crate) fn set_listener(
    maps: &mut Maps,
    pod: &str,
    listener: &impl std::os::fd::AsRawFd,
    slot: ListenerSlot,
) -> Result<()> {
    maps.listeners
        .set(slot as u32, listener, 0)
        .map_err(|e| map_err(pod, MAP_LISTENERS, "storing the listener", e))
}

/// aya-log level matching the most verbose level `tracing` lets through.
fn ebpf_log_level() -> u8 {
    use aya_log::Level;
    use tracing::level_filters::LevelFilter;
    let level = match LevelFilter::current() {
        LevelFilter::OFF => return 0,
        LevelFilter::ERROR => Level::Error,
        LevelFilter::WARN => Level::Warn,
        LevelFilter::INFO => Level::Info,
        LevelFilter::DEBUG => Level::Debug,
        _ => Level::Trace,
    };
    level as u8
}

/// Starts a task that drains the program's aya-log ring buffer into
/// `tracing` (target `cors_ebpf`, with the pod name). Abort the returned
/// task to stop. Needs a Tokio runtime.
pub(crate) fn forward_logs(ebpf: &mut Ebpf, pod: &str) -> Result<JoinHandle<()>> {
    let logger = EbpfLogger::init_with_logger(
        ebpf,
        TracingLog {
            pod: pod.to_owned(),
        },
    )
    .map_err(|e| SteerError::Logger {
        pod: pod.to_owned(),
        source: Box::new(e),
    })?;
    // SAFETY: the logger owns the ring buffer map's fd for its whole life and
    // `as_raw_fd` always returns that same fd; the AsyncFd owns the logger.
    let registered =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut fd = registered.map_err(|e| SteerError::Logger {
        pod: pod.to_owned(),
        source: Box::new(aya_log::Error::MapError(MapError::IoError(
            io::Error::from(e),
        ))),
    })?;
    let pod = pod.to_owned();
    Ok(tokio::spawn(async move {
        loop {
            match fd.readable_mut().await {
                Ok(mut guard) => {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                Err(e) => {
                    tracing::warn!(pod, error = %e, "eBPF log forwarding stopped");
                    return;
                }
            }
        }
    }))
}

/// `log::Log` adapter: aya-log speaks the `log` facade; the agent logs with
/// `tracing`. A dedicated adapter (rather than a global `tracing-log`
/// bridge) lets each record carry the pod it came from.
struct TracingLog {
    pod: String,
}

impl log::Log for TracingLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let pod = self.pod.as_str();
        let msg = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: "cors_ebpf", pod, "{msg}"),
            log::Level::Warn => tracing::warn!(target: "cors_ebpf", pod, "{msg}"),
            log::Level::Info => tracing::info!(target: "cors_ebpf", pod, "{msg}"),
            log::Level::Debug => tracing::debug!(target: "cors_ebpf", pod, "{msg}"),
            log::Level::Trace => tracing::trace!(target: "cors_ebpf", pod, "{msg}"),
        }
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions() {
        assert!(kernel_at_least("6.18.44-fc-v1147", 5, 9));
        assert!(kernel_at_least("5.9.0", 5, 9));
        assert!(!kernel_at_least("5.8.18", 5, 9));
        assert!(!kernel_at_least("4.19.0-20-amd64", 5, 9));
        assert!(kernel_at_least("weird", 5, 9));
    }
}
