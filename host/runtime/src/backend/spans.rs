//! Sets of byte ranges: where a storage's bytes are stale on one side.

use std::ops::Range;

/// A set of bytes as sorted, disjoint, non-adjacent, non-empty ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Spans(Vec<Range<usize>>);

impl Spans {
    /// Every byte of `0..len`.
    pub fn all(len: usize) -> Spans {
        let mut s = Spans::default();
        s.insert(0..len);
        s
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn clear(&mut self) {
        self.0.clear();
    }

    pub fn insert(&mut self, r: Range<usize>) {
        if r.is_empty() {
            return;
        }
        // Ranges that overlap or touch `r` merge with it.
        let first = self.0.partition_point(|x| x.end < r.start);
        let last = self.0.partition_point(|x| x.start <= r.end);
        let mut merged = r;
        if first < last {
            merged.start = merged.start.min(self.0[first].start);
            merged.end = merged.end.max(self.0[last - 1].end);
        }
        self.0.splice(first..last, [merged]);
    }

    pub fn remove(&mut self, r: Range<usize>) {
        if r.is_empty() {
            return;
        }
        let first = self.0.partition_point(|x| x.end <= r.start);
        let last = self.0.partition_point(|x| x.start < r.end);
        if first >= last {
            return;
        }
        let mut keep = Vec::with_capacity(2);
        if self.0[first].start < r.start {
            keep.push(self.0[first].start..r.start);
        }
        if self.0[last - 1].end > r.end {
            keep.push(r.end..self.0[last - 1].end);
        }
        self.0.splice(first..last, keep);
    }

    /// The parts of `r` in the set, in order.
    pub fn overlapping(&self, r: &Range<usize>) -> Vec<Range<usize>> {
        let first = self.0.partition_point(|x| x.end <= r.start);
        self.0[first..]
            .iter()
            .take_while(|x| x.start < r.end)
            .map(|x| x.start.max(r.start)..x.end.min(r.end))
            .collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Range<usize>> {
        self.0.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The set as a bitmap, the obvious way.
    fn bits(s: &Spans, len: usize) -> Vec<bool> {
        (0..len).map(|i| s.iter().any(|r| r.contains(&i))).collect()
    }

    #[test]
    fn inserts_and_removes_agree_with_a_bitmap() {
        let mut rng = fastrand::Rng::with_seed(7);
        const N: usize = 64;
        for _ in 0..200 {
            let mut s = Spans::default();
            let mut want = [false; N];
            for _ in 0..12 {
                let a = rng.usize(0..N);
                let b = rng.usize(a..=N);
                let add = rng.bool();
                if add {
                    s.insert(a..b);
                } else {
                    s.remove(a..b);
                }
                want[a..b].iter_mut().for_each(|w| *w = add);
                assert_eq!(bits(&s, N), want);
                // The invariant: sorted, disjoint, non-adjacent, non-empty.
                for w in s.0.windows(2) {
                    assert!(w[0].end < w[1].start, "{s:?}");
                }
                assert!(s.iter().all(|r| !r.is_empty()));
                let q = rng.usize(0..N)..rng.usize(0..=N);
                let parts = s.overlapping(&q);
                let inside: usize = parts.iter().map(|r| r.len()).sum();
                let expect = q.clone().filter(|&i| want[i]).count();
                assert_eq!(inside, expect, "{s:?} ∩ {q:?} = {parts:?}");
            }
        }
    }
}
