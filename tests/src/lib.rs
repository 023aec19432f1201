//! Shared helpers for cors-agent's end-to-end suites.

pub mod cases;
