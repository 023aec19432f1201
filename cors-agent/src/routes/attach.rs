//! Where a CORS policy came from, and which one wins (contract §2).

use std::cmp::Ordering;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use crate::config::ResourceId;
use crate::cors::CorsPolicy;

/// Attachment levels, most specific first: a lower level wins outright.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    BackendRefFilter = 1,
    RuleFilter = 2,
    PolicyOnRule = 3,
    PolicyOnRoute = 4,
    PolicyOnListener = 5,
    PolicyOnGateway = 6,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::BackendRefFilter => "CORS filter on the rule's backendRef",
            Self::RuleFilter => "CORS filter on the rule",
            Self::PolicyOnRule => "AgentgatewayPolicy on the rule (sectionName)",
            Self::PolicyOnRoute => "AgentgatewayPolicy on the HTTPRoute",
            Self::PolicyOnListener => "AgentgatewayPolicy on the Gateway listener",
            Self::PolicyOnGateway => "AgentgatewayPolicy on the Gateway",
        })
    }
}

#[derive(Clone, Debug)]
pub struct PolicySource {
    pub resource: ResourceId,
    pub file: Arc<Path>,
    pub line: usize,
    /// The `cors` object's path inside the resource.
    pub field: String,
    pub created: Option<String>,
}

#[derive(Debug)]
pub struct AttachedPolicy {
    pub level: Level,
    pub source: PolicySource,
    pub policy: CorsPolicy,
}

impl AttachedPolicy {
    /// Most specific level first; at one level the older resource, then `namespace/name`.
    /// A resource without a creation timestamp counts as the newest.
    pub fn precedence_cmp(&self, other: &Self) -> Ordering {
        self.level
            .cmp(&other.level)
            .then_with(|| match (&self.source.created, &other.source.created) {
                (Some(a), Some(b)) => a.cmp(b),
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (None, None) => Ordering::Equal,
            })
            .then_with(|| {
                (&self.source.resource.namespace, &self.source.resource.name).cmp(&(
                    &other.source.resource.namespace,
                    &other.source.resource.name,
                ))
            })
    }

    /// Why `self` beat `loser`, in words.
    pub fn why_beats(&self, loser: &Self) -> String {
        if self.level != loser.level {
            return format!("more specific ({} beats {})", self.level, loser.level);
        }
        match (&self.source.created, &loser.source.created) {
            (Some(a), Some(b)) if a != b => format!("same level, older ({a} before {b})"),
            (Some(_), None) => {
                "same level, has a creationTimestamp (the other counts as newest)".into()
            }
            _ => "same level and age, first by namespace/name".into(),
        }
    }
}

pub(super) fn sort(policies: &mut [Arc<AttachedPolicy>]) {
    policies.sort_by(|a, b| a.precedence_cmp(b));
}
