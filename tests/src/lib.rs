//! Shared helpers for cors-agent's end-to-end suites.

pub mod agent;
pub mod backend;
#[cfg(target_os = "linux")]
pub mod browser;
pub mod cases;
pub mod certs;
pub mod client;
#[cfg(target_os = "linux")]
pub mod cluster;
#[cfg(target_os = "linux")]
pub mod netns;
