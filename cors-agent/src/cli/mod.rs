//! Offline commands: they read resources and print, and never open a socket.

pub mod explain;
pub mod validate;

/// Exit code for invalid resources, shared by every command that loads them.
pub const EXIT_INVALID: u8 = 2;
