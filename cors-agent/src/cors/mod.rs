//! The CORS engine: pure functions from request parts and a compiled policy to a decision.
//!
//! Nothing here does I/O or knows about tokio or hyper. The proxy classifies the request
//! ([`classify`]), picks the route and its policy, asks [`evaluate`] what to do, and then acts
//! on the [`Decision`]: answer a preflight locally, or forward and apply [`ResponseEdits`] to
//! whatever comes back (including the agent's own error answers).

mod decision;
mod headers;
pub(crate) mod origin;
mod policy;
mod request;

pub use decision::{
    Decision, Outcome, PreflightAnswer, ResponseEdits, UnmatchedPreflights, evaluate,
};
pub use origin::{AllowOrigins, Origin, OriginList, OriginMatch, OriginPattern, Scheme};
pub use policy::{AllowList, CorsPolicy, CorsPolicyError};
pub use request::{RequestKind, classify};
