//! Loading Kubernetes resources from files, kubectl style, with diagnostics that name the
//! file, line, resource and field path.

mod diagnostic;
mod load;
pub mod spec;
pub mod yaml;

pub use diagnostic::{Diagnostic, Diagnostics, Severity};
pub use load::{Loaded, ResourceId, Resources, load, serde_message};
pub use yaml::LineIndex;
