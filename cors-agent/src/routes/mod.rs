//! The compiled route table: which HTTPRoute rule a request matches (Gateway API precedence),
//! and which CORS policy that rule carries (contract §2).

mod attach;
mod build;
mod index;
mod matching;

use std::path::Path;
use std::sync::Arc;

use http::{HeaderMap, Method};

pub use attach::{AttachedPolicy, Level, PolicySource};
pub use build::{BuildOptions, ServiceRef};

use crate::config::{Diagnostics, ResourceId, Resources};
use index::EntryIndex;
use matching::Entry;

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
    /// Which entries a request can match at all, by host and first path segment.
    index: EntryIndex,
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
        let entry = self
            .index
            .find(q.host, q.path, |i| self.entries[i as usize].matches(q))
            .map(|i| &self.entries[i as usize])?;
        let rule = &self.rules[entry.rule];
        Some(RouteHit {
            route: &self.routes[rule.route],
            rule,
            match_index: entry.match_index,
        })
    }

    /// Called once the entries are sorted.
    fn index_entries(&mut self) {
        self.index = EntryIndex::build(&self.entries);
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
