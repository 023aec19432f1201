//! Map layouts and names shared by the kernel and user sides.
//!
//! This file is also compiled directly into the `cors-ebpf` crate as a module
//! (`#[path]`), not as a dependency: cargo mixes the absolute path of a path
//! dependency that lies outside the building workspace into every symbol
//! name, which would make the committed eBPF object differ between checkouts.
//! So: no crate-level attributes and no dependencies here.

/// Name of the sk_lookup program inside the object file.
pub const PROGRAM_NAME: &str = "cors_steer";

/// `SOCKMAP` holding the agent's listener socket(s), indexed by [`ListenerSlot`].
/// (Kernel object names are limited to 15 bytes.)
pub const MAP_LISTENERS: &str = "CORS_LISTENERS";

/// `HASH` of steered destination ports: [`PortKey`] -> [`PortValue`].
pub const MAP_PORTS: &str = "CORS_PORTS";

/// Read-only global: non-zero means "fail closed" (drop steered connections
/// when no listener is in the map) instead of "fail open" (let them through to
/// the app untouched). Patched by user space before load.
pub const GLOBAL_FAIL_CLOSED: &str = "CORS_FAIL_CLOSED";

/// Maximum number of steered ports per pod.
pub const MAX_PORTS: u32 = 64;

/// Slots of [`MAP_LISTENERS`]. The program picks the slot by the address
/// family of the incoming connection: an IPv6 socket bound to `::1` is
/// IPv6-only and cannot take IPv4 connections, so there are two listeners.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerSlot {
    V4 = 0,
    V6 = 1,
}

/// Number of entries in [`MAP_LISTENERS`].
pub const LISTENER_SLOTS: u32 = 2;

/// Key of [`MAP_PORTS`]: a destination port in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortKey {
    pub port: u16,
    /// Always zero; makes the key 4 bytes with no implicit padding, so the
    /// kernel's byte-wise hash of the key is well defined.
    pub pad: u16,
}

impl PortKey {
    pub const fn new(port: u16) -> Self {
        Self { port, pad: 0 }
    }
}

/// Value of [`MAP_PORTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortValue {
    /// Bit set of `PORT_FLAG_*`.
    pub flags: u32,
}

/// The port is steered to the listener.
pub const PORT_FLAG_STEER: u32 = 1;

impl PortValue {
    pub const STEER: Self = Self {
        flags: PORT_FLAG_STEER,
    };
}
