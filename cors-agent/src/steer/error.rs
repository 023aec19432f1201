//! Errors of the steering layer. Each names the pod and, where relevant, the
//! network namespace path, map or pin path involved, so a log line alone says
//! what failed where.

use std::{io, path::PathBuf};

/// Result alias for this module.
pub type Result<T, E = SteerError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum SteerError {
    #[error("pod {pod}: network namespace {} does not exist", path.display())]
    NetnsNotFound { pod: String, path: PathBuf },

    #[error("pod {pod}: cannot open network namespace {}: {source}", path.display())]
    Netns {
        pod: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "pod {pod}: missing capabilities {missing}; steering needs CAP_BPF and CAP_NET_ADMIN \
         (load and attach the sk_lookup program) and CAP_SYS_ADMIN (enter the pod's network \
         namespace)"
    )]
    MissingCapabilities { pod: String, missing: String },

    #[error(
        "pod {pod}: permission denied while {action} ({source}); steering needs CAP_BPF, \
         CAP_NET_ADMIN and CAP_SYS_ADMIN in the initial user namespace"
    )]
    PermissionDenied {
        pod: String,
        action: &'static str,
        #[source]
        source: io::Error,
    },

    #[error("kernel {release} has no sk_lookup programs (needs Linux 5.9 or newer)")]
    KernelTooOld { release: String },

    #[error("pod {pod}: {reason}")]
    InvalidInput { pod: String, reason: String },

    #[error("pod {pod}: steering must be set up from inside a Tokio runtime")]
    NoRuntime { pod: String },

    #[error("pod {pod}: loading the eBPF object: {source}")]
    Load {
        pod: String,
        #[source]
        source: Box<aya::EbpfError>,
    },

    #[error("pod {pod}: eBPF object has no {what} named {name}")]
    MissingObject {
        pod: String,
        what: &'static str,
        name: &'static str,
    },

    #[error("pod {pod}: {action} sk_lookup program: {source}")]
    Program {
        pod: String,
        action: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },

    #[error("pod {pod}: map {map}: {action}: {source}")]
    Map {
        pod: String,
        map: &'static str,
        action: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },

    #[error(
        "pod {pod}: {} is not on a BPF filesystem (failMode: closed pins objects there; \
         mount one with `mount -t bpf bpf /sys/fs/bpf`)",
        path.display()
    )]
    NotBpffs { pod: String, path: PathBuf },

    #[error("pod {pod}: pinning under {}: {source}", path.display())]
    Pin {
        pod: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("pod {pod}: creating the listener in network namespace {}: {source}", path.display())]
    Listener {
        pod: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("pod {pod}: forwarding eBPF logs: {source}")]
    Logger {
        pod: String,
        #[source]
        source: Box<aya_log::Error>,
    },
}
