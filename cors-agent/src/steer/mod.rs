//! Transparent steering: an sk_lookup eBPF program, attached to each
//! enrolled pod's network namespace, hands TCP connections for the pod's
//! steered ports to an agent listener inside that namespace; the agent then
//! reaches the app from inside the pod. Nothing in the pod is reconfigured.
//!
//! Node mode, per pod:
//! ```ignore
//! let (mut steering, listener) =
//!     PodSteering::attach_with(pod, "/var/run/netns/<pod-netns>", &[8080], &opts)?;
//! let upstream = steering.upstream();
//! steering.serve(listener, move |stream, conn| {
//!     let upstream = upstream.clone();
//!     async move {
//!         // conn.peer, conn.original_dst, conn.pod, conn.port
//!         let app = upstream.connect(conn.original_dst).await;
//!         // ... serve_connection(stream, ...) ...
//!     }
//! });
//! // later: steering.detach()?  (or drop it)
//! ```
//!
//! The kernel program lives in `cors-ebpf/`; its map layouts in
//! `cors-common`. The compiled object is committed next to this file and
//! rebuilt with `cargo xtask build-ebpf`.
#![cfg(target_os = "linux")]

mod ebpf;
mod error;
mod netns;
mod pod;

pub(crate) use ebpf::check_environment;
pub use error::{Result, SteerError};
pub use netns::{NetNs, NetnsWorker, in_netns};
pub(crate) use pod::pin_dir_name;
pub use pod::{
    DEFAULT_PIN_ROOT, FailMode, PodSteering, SteerListener, SteerOptions, SteeredConn, Upstream,
};
