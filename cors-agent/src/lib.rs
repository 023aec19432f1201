//! cors-agent: route-scoped CORS enforcement in front of an app, configured with Gateway API
//! `HTTPRoute` CORS filters and `AgentgatewayPolicy` resources.

pub mod admin;
pub mod app;
pub mod cli;
pub mod config;
pub mod cors;
pub mod engine;
pub mod memory;
pub mod node;
pub mod proxy;
pub mod routes;
pub mod steer;
pub mod tls;
