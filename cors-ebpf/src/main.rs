//! sk_lookup program that steers TCP connections for a pod's steered ports to
//! the cors-agent listener socket stored in a sock map.
//!
//! Attached per pod network namespace. For every TCP connection that the
//! kernel is about to deliver locally it decides:
//! * port not steered, loopback, or source == destination -> `SK_PASS` with no
//!   socket selected: the normal lookup runs and the app gets the connection.
//!   The loopback / same-address exceptions are what let the agent reach the
//!   app in the same pod without being steered back to itself.
//! * steered -> assign the listener for the address family, `SK_PASS`.
//! * steered but no usable listener -> `SK_PASS` (fail open) or `SK_DROP`
//!   (fail closed; TCP answers the SYN with a reset), per `CORS_FAIL_CLOSED`.
#![no_std]
#![no_main]

use aya_ebpf::{
    Global,
    bindings::{bpf_sk_lookup, sk_action},
    macros::{map, sk_lookup},
    maps::{HashMap, SockMap},
    programs::SkLookupContext,
};
use aya_log_ebpf::{debug, warn};

// The map layouts and names shared with user space. Compiled in as a module
// rather than depended on as a crate: cargo hashes the absolute path of a path
// dependency outside this workspace into every symbol name, which would make
// the object differ between checkouts (see cors-common/src/shared.rs).
#[allow(dead_code)]
#[path = "../../cors-common/src/shared.rs"]
mod cors_common;

use cors_common::{LISTENER_SLOTS, ListenerSlot, MAX_PORTS, PORT_FLAG_STEER, PortKey, PortValue};

// The `#[map(name = ...)]` attributes need literals; make sure they match the
// names user space looks up.
const _: () = assert!(str_eq(cors_common::MAP_LISTENERS, "CORS_LISTENERS"));
const _: () = assert!(str_eq(cors_common::MAP_PORTS, "CORS_PORTS"));
const _: () = assert!(str_eq(cors_common::GLOBAL_FAIL_CLOSED, "CORS_FAIL_CLOSED"));
const _: () = assert!(str_eq(cors_common::PROGRAM_NAME, "cors_steer"));

const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = 6;

#[map(name = "CORS_LISTENERS")]
static CORS_LISTENERS: SockMap = SockMap::with_max_entries(LISTENER_SLOTS, 0);

#[map(name = "CORS_PORTS")]
static CORS_PORTS: HashMap<PortKey, PortValue> = HashMap::with_max_entries(MAX_PORTS, 0);

/// Patched by user space before load (see `cors_common::GLOBAL_FAIL_CLOSED`).
#[unsafe(no_mangle)]
static CORS_FAIL_CLOSED: Global<u8> = Global::new(0);

#[sk_lookup]
pub fn cors_steer(ctx: SkLookupContext) -> u32 {
    try_cors_steer(&ctx)
}

/// What the program decided; kept separate from the verdict so the decision
/// logic reads as plain control flow.
enum Decision {
    /// Not ours: let the normal socket lookup run.
    Pass,
    /// Steer to the listener in this slot.
    Steer(ListenerSlot),
}

fn try_cors_steer(ctx: &SkLookupContext) -> u32 {
    // SAFETY: the kernel passes a valid `bpf_sk_lookup` context for the
    // duration of the program; we only read from it.
    let lookup: &bpf_sk_lookup = unsafe { &*ctx.lookup };
    let slot = match decide(lookup) {
        Decision::Pass => return sk_action::SK_PASS,
        Decision::Steer(slot) => slot,
    };
    match CORS_LISTENERS.redirect_sk_lookup(ctx, slot as u32, 0) {
        Ok(()) => {
            debug!(
                ctx,
                "steered port {} to listener slot {}", lookup.local_port, slot as u32
            );
            sk_action::SK_PASS
        }
        Err(err) => {
            // -ENOENT: no listener (agent down). Other errors (e.g. the socket
            // is not listening any more) are handled the same way.
            if CORS_FAIL_CLOSED.load() != 0 {
                warn!(
                    ctx,
                    "no listener for port {} (err {}): refusing (fail closed)",
                    lookup.local_port,
                    err
                );
                sk_action::SK_DROP
            } else {
                warn!(
                    ctx,
                    "no listener for port {} (err {}): passing to app (fail open)",
                    lookup.local_port,
                    err
                );
                sk_action::SK_PASS
            }
        }
    }
}

fn decide(lookup: &bpf_sk_lookup) -> Decision {
    if lookup.protocol != IPPROTO_TCP {
        return Decision::Pass;
    }
    // `local_port` is in host byte order (unlike `remote_port`).
    let Ok(port) = u16::try_from(lookup.local_port) else {
        return Decision::Pass;
    };
    // SAFETY: `get` returns a reference into the map value; PortValue is Pod.
    let steered = unsafe { CORS_PORTS.get(PortKey::new(port)) }
        .is_some_and(|v| v.flags & PORT_FLAG_STEER != 0);
    if !steered {
        return Decision::Pass;
    }
    match lookup.family {
        AF_INET => {
            // Addresses are in network byte order; compare as big-endian.
            let src = u32::from_be(lookup.remote_ip4);
            let dst = u32::from_be(lookup.local_ip4);
            if is_loopback_v4(src) || is_loopback_v4(dst) || src == dst {
                Decision::Pass
            } else {
                Decision::Steer(ListenerSlot::V4)
            }
        }
        AF_INET6 => {
            let src = lookup.remote_ip6;
            let dst = lookup.local_ip6;
            if is_loopback_v6(&src) || is_loopback_v6(&dst) || src == dst {
                Decision::Pass
            } else {
                Decision::Steer(ListenerSlot::V6)
            }
        }
        _ => Decision::Pass,
    }
}

/// 127.0.0.0/8 (host byte order input).
fn is_loopback_v4(addr: u32) -> bool {
    addr >> 24 == 127
}

/// `::1` and IPv4-mapped loopback `::ffff:127.0.0.0/104` (words in network
/// byte order, as the kernel stores them).
fn is_loopback_v6(addr: &[u32; 4]) -> bool {
    let w = [
        u32::from_be(addr[0]),
        u32::from_be(addr[1]),
        u32::from_be(addr[2]),
        u32::from_be(addr[3]),
    ];
    let native_loopback = w == [0, 0, 0, 1];
    let mapped_loopback = w[0] == 0 && w[1] == 0 && w[2] == 0xffff && w[3] >> 24 == 127;
    native_loopback || mapped_loopback
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // eBPF programs cannot panic at run time; the verifier rejects any path
    // that would reach here, so this is never executed.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
