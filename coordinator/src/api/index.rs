//! The device list's index: every listed device's id in sorted sets by group, enrollment
//! state, agent version and online flag, each set with its counts (online, needing attention,
//! versions) kept as devices change. The view updates it in the same write as the records, so
//! a page of an unfiltered or one-filter list costs O(page) and its counts O(versions), not a
//! pass over the fleet; several filters scan the smallest of their sets.
//!
//! The one time-dependent attention reason ("no telemetry for 5 min" of an online device) is
//! counted at query time from each set's map of last-telemetry times of the online devices
//! with no other reason, so the counts equal what a full pass would find at that instant.
//!
//! Invariant: pure (no I/O, no clock; `now_ms` is passed in); a device is in exactly the sets
//! its current [`Entry`] names. Boundary: [`super::view`] only.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::devices::STALE_TELEMETRY_MS;

/// What the index knows of one listed device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub state: &'static str,
    pub groups: Vec<String>,
    pub version: String,
    pub online: bool,
    /// Needs attention for a reason that does not depend on the time.
    pub static_attention: bool,
    /// When it has no such reason but is online with telemetry: when that telemetry arrived
    /// (it needs attention once older than [`STALE_TELEMETRY_MS`]).
    pub fresh_ms: Option<u64>,
}

/// One filter's devices, sorted by id, with their counts.
#[derive(Debug, Default)]
pub struct Set {
    ids: Vec<Arc<str>>,
    online: usize,
    static_attention: usize,
    versions: BTreeMap<String, usize>,
    fresh: BTreeMap<u64, usize>,
}

/// A set's counts at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counts {
    pub total: usize,
    pub online: usize,
    pub attention: usize,
    pub versions: BTreeMap<String, usize>,
}

impl Set {
    fn add(&mut self, id: &Arc<str>, e: &Entry) {
        if let Err(at) = self.ids.binary_search(id) {
            self.ids.insert(at, id.clone());
        }
        self.online += usize::from(e.online);
        self.static_attention += usize::from(e.static_attention);
        *self.versions.entry(e.version.clone()).or_insert(0) += 1;
        if let Some(t) = e.fresh_ms {
            *self.fresh.entry(t).or_insert(0) += 1;
        }
    }

    fn remove(&mut self, id: &Arc<str>, e: &Entry) {
        if let Ok(at) = self.ids.binary_search(id) {
            self.ids.remove(at);
        }
        self.online -= usize::from(e.online);
        self.static_attention -= usize::from(e.static_attention);
        decrement(&mut self.versions, &e.version);
        if let Some(t) = e.fresh_ms {
            decrement(&mut self.fresh, &t);
        }
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Ids `offset..offset + limit`, in id order.
    pub fn page(&self, offset: usize, limit: usize) -> &[Arc<str>] {
        let start = offset.min(self.ids.len());
        let end = start.saturating_add(limit).min(self.ids.len());
        &self.ids[start..end]
    }

    pub fn ids(&self) -> &[Arc<str>] {
        &self.ids
    }

    pub fn counts(&self, now_ms: u64) -> Counts {
        let stale = self
            .fresh
            .range(..now_ms.saturating_sub(STALE_TELEMETRY_MS))
            .map(|(_, n)| n)
            .sum::<usize>();
        Counts {
            total: self.ids.len(),
            online: self.online,
            attention: self.static_attention + stale,
            versions: self.versions.clone(),
        }
    }
}

fn decrement<K: Ord + Clone>(map: &mut BTreeMap<K, usize>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            map.remove(key);
        }
    }
}

/// Every set.
#[derive(Debug, Default)]
pub struct Index {
    entries: HashMap<Arc<str>, Entry>,
    all: Set,
    by_group: HashMap<String, Set>,
    by_state: HashMap<&'static str, Set>,
    by_version: HashMap<String, Set>,
    /// Offline, online.
    by_online: [Set; 2],
}

/// The indexed filters of a query; `None` matches everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct Filter<'a> {
    pub group: Option<&'a str>,
    pub state: Option<&'a str>,
    pub version: Option<&'a str>,
    pub online: Option<bool>,
}

static EMPTY: std::sync::LazyLock<Set> = std::sync::LazyLock::new(Set::default);

impl Index {
    /// Puts `id` in the sets `entry` names (`None`: no longer listed), if that changed.
    pub fn set(&mut self, id: &str, entry: Option<Entry>) {
        let old = self.entries.get(id);
        if old == entry.as_ref() {
            return;
        }
        let key: Arc<str> = match self.entries.get_key_value(id) {
            Some((k, _)) => k.clone(),
            None => Arc::from(id),
        };
        if let Some(old) = self.entries.remove(id) {
            for set in self.sets_mut(&old) {
                set.remove(&key, &old);
            }
            self.prune(&old);
        }
        if let Some(new) = entry {
            for set in self.sets_mut(&new) {
                set.add(&key, &new);
            }
            self.entries.insert(key, new);
        }
    }

    fn sets_mut(&mut self, e: &Entry) -> Vec<&mut Set> {
        // Distinct maps, so the borrows do not overlap; groups are distinct keys of one map.
        let mut out: Vec<&mut Set> = vec![&mut self.all];
        out.push(self.by_state.entry(e.state).or_default());
        out.push(self.by_version.entry(e.version.clone()).or_default());
        let [offline, online] = &mut self.by_online;
        out.push(if e.online { online } else { offline });
        let mut groups: Vec<&String> = e.groups.iter().collect();
        groups.sort();
        groups.dedup();
        for g in groups {
            if !self.by_group.contains_key(g) {
                self.by_group.insert(g.clone(), Set::default());
            }
        }
        out.extend(
            self.by_group
                .iter_mut()
                .filter(|(g, _)| e.groups.contains(g))
                .map(|(_, s)| s),
        );
        out
    }

    /// Drops the emptied sets of a removed entry (the key space stays bounded by what exists).
    fn prune(&mut self, e: &Entry) {
        self.by_version
            .retain(|v, s| v != &e.version || !s.is_empty());
        self.by_group
            .retain(|g, s| !e.groups.contains(g) || !s.is_empty());
    }

    /// The sets a filter names, smallest first (the whole fleet when it names none).
    pub fn candidates(&self, f: &Filter<'_>) -> Vec<&Set> {
        let mut sets = Vec::new();
        if let Some(g) = f.group {
            sets.push(self.by_group.get(g).unwrap_or(&EMPTY));
        }
        if let Some(s) = f.state {
            sets.push(self.by_state.get(s).unwrap_or(&EMPTY));
        }
        if let Some(v) = f.version {
            sets.push(self.by_version.get(v).unwrap_or(&EMPTY));
        }
        if let Some(o) = f.online {
            sets.push(&self.by_online[usize::from(o)]);
        }
        if sets.is_empty() {
            sets.push(&self.all);
        }
        sets.sort_by_key(|s| s.len());
        sets
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(state: &'static str, group: &str, version: &str, online: bool) -> Entry {
        Entry {
            state,
            groups: vec![group.to_owned()],
            version: version.to_owned(),
            online,
            static_attention: !online && state == "accepted",
            fresh_ms: online.then_some(1_000),
        }
    }

    #[test]
    fn sets_follow_changes_and_counts_match() {
        let mut ix = Index::default();
        ix.set("d2", Some(entry("accepted", "lab", "1.0", true)));
        ix.set("d1", Some(entry("accepted", "lab", "1.0", false)));
        ix.set("d3", Some(entry("pending", "site", "0.9", true)));
        let all = ix.candidates(&Filter::default())[0];
        let ids: Vec<&str> = all.ids().iter().map(|s| &**s).collect();
        assert_eq!(ids, ["d1", "d2", "d3"]);
        let c = all.counts(2_000);
        assert_eq!((c.total, c.online, c.attention), (3, 2, 1));
        assert_eq!(c.versions.get("1.0"), Some(&2));
        // Telemetry goes stale for the two online devices: both need attention then.
        let later = 1_001 + STALE_TELEMETRY_MS + 1;
        assert_eq!(all.counts(later).attention, 3);

        let lab = Filter {
            group: Some("lab"),
            ..Filter::default()
        };
        assert_eq!(ix.candidates(&lab)[0].len(), 2);
        // d1 moves to version 2.0 and comes online; its old sets forget it.
        ix.set("d1", Some(entry("accepted", "lab", "2.0", true)));
        let v1 = Filter {
            version: Some("1.0"),
            ..Filter::default()
        };
        assert_eq!(ix.candidates(&v1)[0].len(), 1);
        let both = Filter {
            version: Some("2.0"),
            online: Some(true),
            ..Filter::default()
        };
        let sets = ix.candidates(&both);
        assert_eq!((sets.len(), sets[0].len()), (2, 1));
        ix.set("d1", None);
        assert_eq!(ix.len(), 2);
        let gone = Filter {
            version: Some("2.0"),
            ..Filter::default()
        };
        assert!(ix.candidates(&gone)[0].is_empty());
        assert!(!ix.by_version.contains_key("2.0"), "empty sets are dropped");
        assert_eq!(ix.candidates(&Filter::default())[0].page(1, 5).len(), 1);
    }
}
