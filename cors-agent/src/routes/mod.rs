//! The compiled route table: which HTTPRoute rule a request matches (Gateway API precedence),
//! and which CORS policy that rule carries (contract §2).

mod attach;
mod build;
mod matching;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use http::{HeaderMap, Method};

pub use attach::{AttachedPolicy, Level, PolicySource};
pub use build::{BuildOptions, ServiceRef};

use crate::config::{Diagnostics, ResourceId, Resources};
use matching::{Entry, HostMatch};

/// One HTTPRoute as served.
#[derive(Debug)]
pub struct RouteInfo {
    pub id: ResourceId,
    pub file: Arc<Path>,
    pub line: usize,
    pub hostnames: Vec<String>,
}

/// One rule of an HTTPRoute, with its candidate policies, most specific first.
#[derive(Debug)]
pub struct RuleInfo {
    pub route: usize,
    pub index: usize,
    pub name: Option<String>,
    /// `policies[0]` wins; the rest are what it beat, for `explain`.
    pub policies: Vec<Arc<AttachedPolicy>>,
    /// `name:port` of the chosen backendRef.
    pub backend: Option<String>,
}

impl RuleInfo {
    pub fn policy(&self) -> Option<&AttachedPolicy> {
        self.policies.first().map(|p| &**p)
    }
}

/// What a request is routed by.
#[derive(Clone, Copy, Debug)]
pub struct RouteQuery<'a> {
    /// Host without port, as the client sent it (`Host` or `:authority`).
    pub host: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    /// For a preflight, the method it asks about (contract §3).
    pub method: &'a Method,
    /// `None` for a preflight: header matches count as satisfied.
    pub headers: Option<&'a HeaderMap>,
}

#[derive(Clone, Copy, Debug)]
pub struct RouteHit<'t> {
    pub route: &'t RouteInfo,
    pub rule: &'t RuleInfo,
    /// Index into the rule's `matches`.
    pub match_index: usize,
}

#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<RouteInfo>,
    rules: Vec<RuleInfo>,
    /// Sorted by precedence: the first entry that matches wins.
    entries: Vec<Entry>,
    /// Per exact hostname (lower case), the entries that can match it, in precedence order;
    /// saves comparing the host against every route on every request.
    by_host: HashMap<Box<str>, Vec<u32>>,
    /// Entries for any other host: wildcard hostnames and routes without hostnames.
    other_hosts: Vec<u32>,
    /// Gateway-level policies for answers that match no route (404), winner first.
    fallback: Vec<Arc<AttachedPolicy>>,
}

impl RouteTable {
    /// Validates and compiles `resources`. Errors stop the build; warnings come back with the
    /// table.
    pub fn build(
        resources: &Resources,
        options: &BuildOptions,
    ) -> Result<(RouteTable, Diagnostics), Diagnostics> {
        build::build(resources, options)
    }

    pub fn find(&self, q: &RouteQuery<'_>) -> Option<RouteHit<'_>> {
        let mut buf = [0u8; MAX_HOST_LEN];
        let candidates = lowercase(q.host, &mut buf)
            .and_then(|h| self.by_host.get(h))
            .unwrap_or(&self.other_hosts);
        let entry = candidates
            .iter()
            .map(|&i| &self.entries[i as usize])
            .find(|e| e.matches(q))?;
        let rule = &self.rules[entry.rule];
        Some(RouteHit {
            route: &self.routes[rule.route],
            rule,
            match_index: entry.match_index,
        })
    }

    /// Called once the entries are sorted.
    fn index_hosts(&mut self) {
        self.by_host.clear();
        self.other_hosts.clear();
        for (i, e) in self.entries.iter().enumerate() {
            match &e.host {
                HostMatch::Exact(h) => self
                    .by_host
                    .entry(h.as_str().into())
                    .or_default()
                    .push(i as u32),
                _ => self.other_hosts.push(i as u32),
            }
        }
        for (i, e) in self.entries.iter().enumerate() {
            if !matches!(e.host, HostMatch::Exact(_)) {
                for list in self.by_host.values_mut() {
                    list.push(i as u32);
                }
            }
        }
        for list in self.by_host.values_mut() {
            list.sort_unstable();
        }
    }

    /// The policy for an answer to a request that matched no route, and what it beat.
    pub fn fallback_policies(&self) -> &[Arc<AttachedPolicy>] {
        &self.fallback
    }

    pub fn routes(&self) -> &[RouteInfo] {
        &self.routes
    }

    pub fn rules(&self) -> &[RuleInfo] {
        &self.rules
    }
}

/// Hostnames are at most 253 characters; anything longer cannot match an exact hostname.
const MAX_HOST_LEN: usize = 253;

fn lowercase<'b>(host: &str, buf: &'b mut [u8; MAX_HOST_LEN]) -> Option<&'b str> {
    let out = buf.get_mut(..host.len())?;
    out.copy_from_slice(host.as_bytes());
    out.make_ascii_lowercase();
    std::str::from_utf8(out).ok()
}
