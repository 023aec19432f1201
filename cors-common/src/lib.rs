//! Types and names shared by the `cors-ebpf` sk_lookup program (kernel side)
//! and `cors-agent`'s `steer` module (user side).
//!
//! Everything here is `#[repr(C)]` with fixed-width fields and explicit
//! padding, so the byte layout the eBPF program sees is exactly the one user
//! space writes. The crate is `no_std` because the eBPF program links it too.
#![no_std]

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
/// family of the incoming connection. A dual-stack listener is stored in both.
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

#[cfg(feature = "user")]
mod user {
    // SAFETY: both types are `#[repr(C)]`, `Copy`, made only of integers, and
    // have no implicit padding, so every byte pattern is a valid value.
    unsafe impl aya::Pod for super::PortKey {}
    unsafe impl aya::Pod for super::PortValue {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<PortKey>(), 4);
        assert_eq!(core::mem::size_of::<PortValue>(), 4);
        assert!(PROGRAM_NAME.len() < 16);
        assert!(MAP_LISTENERS.len() < 16);
        assert!(MAP_PORTS.len() < 16);
    }
}
