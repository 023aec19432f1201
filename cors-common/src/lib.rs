//! Types and names shared by the `cors-ebpf` sk_lookup program (kernel side)
//! and `cors-agent`'s `steer` module (user side).
//!
//! Everything is `#[repr(C)]` with fixed-width fields and no implicit
//! padding, so the byte layout the eBPF program sees is exactly the one user
//! space writes. The crate is `no_std` because the eBPF program uses it too.
#![no_std]

mod shared;
pub use shared::*;

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
