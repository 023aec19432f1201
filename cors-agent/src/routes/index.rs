//! Candidate lists for route lookup, keyed by the request's host and first path segment, so a
//! request is compared only with the entries that could match it. Each list keeps the table's
//! precedence order, so the first entry that matches still wins.

use std::collections::{HashMap, HashSet};

use super::matching::{Entry, HostMatch, PathMatch};
use crate::cors::origin::{MAX_HOST_LEN, lowercase};

#[derive(Debug, Default)]
pub(super) struct EntryIndex {
    /// For each exact hostname (lower case) of any route.
    by_host: HashMap<Box<str>, SegmentLists>,
    /// For every other host.
    other_hosts: SegmentLists,
}

#[derive(Debug, Default)]
struct SegmentLists {
    by_segment: HashMap<Box<str>, Vec<u32>>,
    /// For a first segment no entry names.
    rest: Vec<u32>,
}

impl SegmentLists {
    fn build(entries: &[Entry], for_host: &[u32]) -> Self {
        let segments: HashSet<&str> = for_host
            .iter()
            .filter_map(|&i| entry_segment(&entries[i as usize]))
            .collect();
        let list = |seg: Option<&str>| -> Vec<u32> {
            for_host
                .iter()
                .copied()
                .filter(|&i| entry_segment(&entries[i as usize]).is_none_or(|s| Some(s) == seg))
                .collect()
        };
        Self {
            by_segment: segments
                .iter()
                .map(|&s| (Box::from(s), list(Some(s))))
                .collect(),
            rest: list(None),
        }
    }

    fn get(&self, path: &str) -> &[u32] {
        first_segment(path)
            .and_then(|s| self.by_segment.get(s))
            .unwrap_or(&self.rest)
    }
}

/// The first path segment an entry needs (`/api/v1` prefix: `api`); `None` when it can match
/// any (prefix `/`, regular expressions).
fn entry_segment(e: &Entry) -> Option<&str> {
    let path = match &e.path {
        PathMatch::Exact(p) | PathMatch::Prefix(p) => p.as_str(),
        PathMatch::Regex(_) => return None,
    };
    first_segment(path)
}

fn first_segment(path: &str) -> Option<&str> {
    let rest = path.strip_prefix('/')?;
    let seg = rest.split('/').next().unwrap_or("");
    (!seg.is_empty()).then_some(seg)
}

fn entry_host(e: &Entry) -> Option<&str> {
    match &e.host {
        HostMatch::Exact(h) => Some(h),
        _ => None,
    }
}

impl EntryIndex {
    /// `entries` must already be sorted by precedence.
    pub fn build(entries: &[Entry]) -> Self {
        // An entry can match a request to a host if its hostname is that one or not exact.
        let for_host = |host: Option<&str>| -> Vec<u32> {
            (0..entries.len() as u32)
                .filter(|&i| entry_host(&entries[i as usize]).is_none_or(|h| Some(h) == host))
                .collect()
        };
        let hosts: HashSet<&str> = entries.iter().filter_map(entry_host).collect();
        Self {
            by_host: hosts
                .into_iter()
                .map(|h| {
                    (
                        Box::from(h),
                        SegmentLists::build(entries, &for_host(Some(h))),
                    )
                })
                .collect(),
            other_hosts: SegmentLists::build(entries, &for_host(None)),
        }
    }

    pub fn candidates(&self, host: &str, path: &str) -> &[u32] {
        let mut buf = [0u8; MAX_HOST_LEN];
        lowercase(host, &mut buf)
            .and_then(|h| self.by_host.get(h))
            .unwrap_or(&self.other_hosts)
            .get(path)
    }
}
