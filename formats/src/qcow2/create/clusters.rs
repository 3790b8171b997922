//! A set of host clusters kept as runs: which clusters of a new image are in use.

use std::collections::BTreeMap;

/// A set of host clusters, as sorted disjoint runs `start -> end` (exclusive).
#[derive(Debug, Default, Clone)]
pub(super) struct ClusterSet {
    runs: BTreeMap<u64, u64>,
}

impl ClusterSet {
    /// Whether cluster `c` is in the set.
    pub(super) fn contains(&self, c: u64) -> bool {
        self.runs
            .range(..=c)
            .next_back()
            .is_some_and(|(_, &e)| e > c)
    }

    /// Add `[a, b)`; false if any of it was present already.
    pub(super) fn insert(&mut self, a: u64, b: u64) -> bool {
        if a >= b {
            return true;
        }
        if self.contains(a) || self.runs.range(a..b).next().is_some() {
            return false;
        }
        let (mut start, mut end) = (a, b);
        if let Some((&s, &e)) = self.runs.range(..a).next_back() {
            if e == a {
                start = s;
                self.runs.remove(&s);
            }
        }
        if let Some(&e) = self.runs.get(&b) {
            end = e;
            self.runs.remove(&b);
        }
        self.runs.insert(start, end);
        true
    }

    /// Remove `[a, b)` (parts not present are ignored).
    pub(super) fn remove(&mut self, a: u64, b: u64) {
        if a >= b {
            return;
        }
        let hit: Vec<(u64, u64)> = self
            .runs
            .range(..b)
            .rev()
            .take_while(|(_, &e)| e > a)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in hit {
            self.runs.remove(&s);
            if s < a {
                self.runs.insert(s, a);
            }
            if e > b {
                self.runs.insert(b, e);
            }
        }
    }

    /// First cluster `p >= from` with `[p, p + n)` all absent.
    pub(super) fn first_gap(&self, from: u64, n: u64) -> u64 {
        let mut p = from;
        loop {
            if let Some((_, &e)) = self.runs.range(..=p).next_back() {
                if e > p {
                    p = e;
                    continue;
                }
            }
            match self.runs.range(p + 1..).next() {
                Some((&s, &e)) if s - p < n => p = e,
                _ => return p,
            }
        }
    }

    /// How many clusters from `c` on (at most `n`) are absent.
    pub(super) fn gap_len(&self, c: u64, n: u64) -> u64 {
        if self.contains(c) {
            return 0;
        }
        match self.runs.range(c..).next() {
            Some((&s, _)) => (s - c).min(n),
            None => n,
        }
    }

    /// The highest present cluster below `limit`.
    pub(super) fn last_below(&self, limit: u64) -> Option<u64> {
        let (&s, &e) = self.runs.range(..limit).next_back()?;
        Some(e.min(limit).max(s + 1) - 1)
    }

    /// Present runs clipped to `[a, b)`.
    pub(super) fn runs_in(&self, a: u64, b: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let first = self
            .runs
            .range(..=a)
            .next_back()
            .map(|(&s, _)| s)
            .unwrap_or(a);
        self.runs
            .range(first..b)
            .map(move |(&s, &e)| (s.max(a), e.min(b)))
            .filter(|(s, e)| s < e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_set_runs() {
        let mut s = ClusterSet::default();
        assert!(s.insert(0, 3));
        assert!(s.insert(5, 7));
        assert!(s.insert(3, 4));
        assert!(!s.insert(6, 8));
        assert_eq!(s.runs.len(), 2);
        assert_eq!(s.first_gap(0, 1), 4);
        assert_eq!(s.first_gap(0, 2), 7);
        assert_eq!(s.first_gap(4, 1), 4);
        assert_eq!(s.gap_len(4, 10), 1);
        assert_eq!(s.gap_len(7, 10), 10);
        assert_eq!(s.last_below(100), Some(6));
        assert_eq!(s.last_below(5), Some(3));
        s.remove(1, 6);
        assert!(s.contains(0) && !s.contains(1) && !s.contains(5) && s.contains(6));
        assert_eq!(s.runs_in(0, 10).collect::<Vec<_>>(), vec![(0, 1), (6, 7)]);
    }
}
