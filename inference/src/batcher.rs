//! [`Batcher`]: groups requests for the pipeline's inference stage (max batch size, max wait).
//!
//! Invariant: no I/O and no clock; the caller passes the time in, so tests are exact and the
//! stage's task decides how to wait (`deadline` says until when).

use std::time::{Duration, Instant};

/// Collects items until `max_batch` are waiting or the oldest has waited `max_wait`.
#[derive(Debug)]
pub struct Batcher<T> {
    max_batch: usize,
    max_wait: Duration,
    pending: Vec<T>,
    oldest: Option<Instant>,
}

impl<T> Batcher<T> {
    /// `max_batch` of 0 is treated as 1 (no batching).
    pub fn new(max_batch: usize, max_wait: Duration) -> Batcher<T> {
        Batcher {
            max_batch: max_batch.max(1),
            max_wait,
            pending: Vec::new(),
            oldest: None,
        }
    }

    /// Adds an item; returns a full batch when this one completes it.
    pub fn push(&mut self, item: T, now: Instant) -> Option<Vec<T>> {
        if self.pending.is_empty() {
            self.oldest = Some(now);
        }
        self.pending.push(item);
        if self.pending.len() >= self.max_batch {
            return self.flush();
        }
        None
    }

    /// Returns the waiting items if the oldest has waited `max_wait` by `now`.
    pub fn poll(&mut self, now: Instant) -> Option<Vec<T>> {
        match self.deadline() {
            Some(d) if now >= d => self.flush(),
            _ => None,
        }
    }

    /// When the waiting items are due (`None` when nothing waits).
    pub fn deadline(&self) -> Option<Instant> {
        self.oldest.map(|t| t + self.max_wait)
    }

    /// Returns whatever waits (on shutdown, or to drain).
    pub fn flush(&mut self) -> Option<Vec<T>> {
        self.oldest = None;
        if self.pending.is_empty() {
            return None;
        }
        Some(std::mem::take(&mut self.pending))
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn full_batch_goes_at_once() {
        let t0 = Instant::now();
        let mut b = Batcher::new(3, 10 * MS);
        assert_eq!(b.push(1, t0), None);
        assert_eq!(b.push(2, t0 + MS), None);
        assert_eq!(b.push(3, t0 + 2 * MS), Some(vec![1, 2, 3]));
        assert!(b.is_empty());
        assert_eq!(b.deadline(), None);
    }

    #[test]
    fn partial_batch_goes_after_max_wait_of_the_oldest() {
        let t0 = Instant::now();
        let mut b = Batcher::new(8, 10 * MS);
        b.push("a", t0);
        b.push("b", t0 + 5 * MS);
        assert_eq!(b.deadline(), Some(t0 + 10 * MS));
        assert_eq!(b.poll(t0 + 9 * MS), None);
        assert_eq!(b.poll(t0 + 10 * MS), Some(vec!["a", "b"]));
        assert_eq!(b.poll(t0 + 30 * MS), None);
        // The next batch's clock starts at its own first item.
        b.push("c", t0 + 40 * MS);
        assert_eq!(b.deadline(), Some(t0 + 50 * MS));
    }

    #[test]
    fn batch_of_one_and_zero_wait() {
        let t0 = Instant::now();
        let mut b = Batcher::new(0, Duration::ZERO);
        assert_eq!(b.push(7, t0), Some(vec![7]));
        let mut b = Batcher::new(4, Duration::ZERO);
        b.push(1, t0);
        assert_eq!(b.poll(t0), Some(vec![1]));
    }

    #[test]
    fn flush_drains() {
        let t0 = Instant::now();
        let mut b = Batcher::new(4, 10 * MS);
        assert_eq!(b.flush(), None::<Vec<u8>>);
        b.push(1u8, t0);
        assert_eq!(b.flush(), Some(vec![1]));
        assert_eq!(b.len(), 0);
    }
}
