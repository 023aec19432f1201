//! Candidate lists for route lookup, keyed by the request's host and first path segment, so a
//! request is compared only with the entries that could match it. Every entry sits in exactly
//! one list (memory stays linear in the number of entries); a lookup merges at most four
//! lists in precedence order, so the first entry that matches still wins.

use std::collections::HashMap;

use super::matching::{Entry, HostMatch, PathMatch};
use crate::cors::origin::{MAX_HOST_LEN, lowercase};

#[derive(Debug, Default)]
pub(super) struct EntryIndex {
    /// Entries for one exact hostname (lower case).
    by_host: HashMap<Box<str>, SegmentLists>,
    /// Entries whose hostname is a wildcard, or whose route names none.
    other_hosts: SegmentLists,
}

#[derive(Debug, Default)]
struct SegmentLists {
    /// Entries whose path needs this first segment (`/api/v1` prefix: `api`).
    by_segment: HashMap<Box<str>, Vec<u32>>,
    /// Entries that can match any path (prefix `/`, regular expressions).
    any_segment: Vec<u32>,
}

impl SegmentLists {
    fn push(&mut self, segment: Option<&str>, entry: u32) {
        match segment {
            Some(s) => self.by_segment.entry(s.into()).or_default().push(entry),
            None => self.any_segment.push(entry),
        }
    }

    fn lists(&self, segment: Option<&str>) -> [&[u32]; 2] {
        let specific = segment
            .and_then(|s| self.by_segment.get(s))
            .map_or(&[][..], Vec::as_slice);
        [specific, &self.any_segment]
    }
}

/// The first path segment an entry needs; `None` when it can match any.
fn entry_segment(e: &Entry) -> Option<&str> {
    match &e.path {
        PathMatch::Exact(p) | PathMatch::Prefix(p) => first_segment(p),
        PathMatch::Regex(_) => None,
    }
}

fn first_segment(path: &str) -> Option<&str> {
    let rest = path.strip_prefix('/')?;
    let seg = rest.split('/').next().unwrap_or("");
    (!seg.is_empty()).then_some(seg)
}

impl EntryIndex {
    /// `entries` must already be sorted by precedence.
    pub fn build(entries: &[Entry]) -> Self {
        let mut index = Self::default();
        for (i, e) in entries.iter().enumerate() {
            let lists = match &e.host {
                HostMatch::Exact(h) => index.by_host.entry(h.as_str().into()).or_default(),
                _ => &mut index.other_hosts,
            };
            lists.push(entry_segment(e), i as u32);
        }
        index
    }

    /// The first entry, in precedence order, for which `matches` holds.
    pub fn find(
        &self,
        host: &str,
        path: &str,
        mut matches: impl FnMut(u32) -> bool,
    ) -> Option<u32> {
        let mut buf = [0u8; MAX_HOST_LEN];
        let segment = first_segment(path);
        let [a, b] = lowercase(host, &mut buf)
            .and_then(|h| self.by_host.get(h))
            .map_or([&[][..], &[][..]], |l| l.lists(segment));
        let [c, d] = self.other_hosts.lists(segment);
        let mut lists = [a, b, c, d];
        // Each list is in ascending (precedence) order: repeatedly take the smallest head.
        loop {
            let (which, &next) = lists
                .iter()
                .enumerate()
                .filter_map(|(i, l)| l.first().map(|v| (i, v)))
                .min_by_key(|(_, v)| **v)?;
            lists[which] = &lists[which][1..];
            if matches(next) {
                return Some(next);
            }
        }
    }
}
