//! How the agent's memory goes back to the system.
//!
//! The binary's allocator is mimalloc 2 (`main.rs`). Under glibc's malloc, an agent holding
//! 10,000 idle keep-alive connections kept about 10 MiB of freed request buffers resident:
//! the connections' small long-lived objects sat between them, so the heap could not shrink
//! (`cargo xtask bench`, memory scenario: node mode with 100 pods and 10,000 connections
//! 42.6 MiB under glibc, 29.6 MiB under mimalloc 2). mimalloc keeps objects of one size class
//! on pages of their own, so freed buffers leave whole pages free, which it returns to the
//! system. mimalloc 3 kept more resident when idle (its first arena is committed eagerly,
//! before `main` can say otherwise): 12.7 MiB for an idle proxy against 10.2.
//!
//! mimalloc returns free pages after a delay, and only when the freeing thread calls the
//! allocator again: an agent that has gone idle kept them. Here they go back at once.
//!
//! Transparent huge pages are off for the process: with the kernel's `always` mode, a 2 MiB
//! region the allocator touched became resident whole, for no gain to a proxy whose working
//! set is a few megabytes.

use std::ffi::c_long;

/// `mi_option_purge_delay` in mimalloc's `mi_option_e` (`include/mimalloc.h`, 2.x and 3.x);
/// the bindings (libmimalloc-sys, pinned in Cargo.lock) still call it `reset_delay` in
/// places and do not export it. The unit test below fails if the number is wrong.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Call first thing in `main`. `MIMALLOC_PURGE_DELAY` in the environment still wins.
pub fn configure() {
    // Best effort: on a kernel without the flag, huge pages cost memory, nothing else.
    #[cfg(target_os = "linux")]
    let _ = rustix::thread::disable_transparent_huge_pages(true);
    // mimalloc reads its options when the process starts, before `main`: set, not defaulted.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: setting an option has no preconditions; mimalloc reads options atomically.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0 as c_long) };
    }
}

/// Returns freed memory to the system now: after a burst of short-lived allocations
/// (loading an eBPF object parses the kernel's BTF, about 20 MB).
pub fn release_freed() {
    // SAFETY: mi_collect has no preconditions; `force` frees what every thread freed.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resident memory of this process, in bytes.
    fn rss() -> usize {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: usize = statm.split(' ').nth(1).unwrap().parse().unwrap();
        pages * 4096
    }

    #[test]
    fn freed_memory_goes_back_to_the_system_at_once() {
        // Through mimalloc itself: unit tests run with the system allocator.
        configure();
        let before = rss();
        let blocks: Vec<_> = (0..512)
            // SAFETY: plain allocations of 64 KiB, written so they are resident, freed below.
            .map(|_| unsafe {
                let p = libmimalloc_sys::mi_malloc(64 * 1024).cast::<u8>();
                std::ptr::write_bytes(p, 1, 64 * 1024);
                p
            })
            .collect();
        let grown = rss();
        assert!(grown >= before + 24 * 1024 * 1024, "{before} -> {grown}");
        for p in blocks {
            // SAFETY: each pointer came from mi_malloc above and is freed once.
            unsafe { libmimalloc_sys::mi_free(p.cast()) };
        }
        let after = rss();
        assert!(
            after < before + 8 * 1024 * 1024,
            "32 MiB freed, still resident: {before} -> {grown} -> {after} bytes"
        );
    }
}
