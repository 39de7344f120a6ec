//! Sliding windows of request outcomes, in bounded memory.
//!
//! A ring of per-second slots per backend (count, errors, a log-scale latency histogram) plus a
//! ring of shadow comparisons. Reading merges the slots younger than the window. The clock is an
//! argument (`tokio::time::Instant`), so guard and status tests run on a paused clock.
//! Memory is fixed by the window length: nothing grows with traffic.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::vocab::Backend;

/// Latency histogram resolution: bucket `i` holds latencies up to `MIN_US * GROWTH^i`.
const BUCKETS: usize = 120;
const MIN_US: f64 = 50.0;
const GROWTH: f64 = 1.12;

fn bucket_of(latency: Duration) -> usize {
    let us = latency.as_secs_f64() * 1e6;
    if us <= MIN_US {
        return 0;
    }
    let i = ((us / MIN_US).ln() / GROWTH.ln()).ceil();
    // Saturating: anything slower than the last bound lands in the last bucket.
    (i as usize).min(BUCKETS - 1)
}

fn bucket_upper_ms(i: usize) -> f64 {
    MIN_US * GROWTH.powi(i as i32) / 1000.0
}

#[derive(Clone)]
struct Slot {
    /// Seconds since the window's epoch this slot holds; stale slots are reset on write.
    second: u64,
    count: u64,
    errors: u64,
    hist: Box<[u32; BUCKETS]>,
    /// Time to the answer's first byte: the head's time for an answer of known length, the
    /// first body byte's for a stream (an inference's first token).
    ttfb: Box<[u32; BUCKETS]>,
    ttfb_count: u64,
    shadow_compared: u64,
    shadow_mismatched: u64,
}

impl Slot {
    fn empty() -> Slot {
        Slot {
            second: u64::MAX,
            count: 0,
            errors: 0,
            hist: Box::new([0; BUCKETS]),
            ttfb: Box::new([0; BUCKETS]),
            ttfb_count: 0,
            shadow_compared: 0,
            shadow_mismatched: 0,
        }
    }
    fn reset(&mut self, second: u64) {
        self.second = second;
        self.count = 0;
        self.errors = 0;
        self.hist.fill(0);
        self.ttfb.fill(0);
        self.ttfb_count = 0;
        self.shadow_compared = 0;
        self.shadow_mismatched = 0;
    }
}

struct Ring {
    slots: Vec<Slot>,
}

impl Ring {
    fn new(len: usize) -> Ring {
        Ring {
            slots: vec![Slot::empty(); len.max(1)],
        }
    }

    fn slot(&mut self, second: u64) -> &mut Slot {
        let len = self.slots.len() as u64;
        let s = &mut self.slots[(second % len) as usize];
        if s.second != second {
            s.reset(second);
        }
        s
    }

    fn live(&self, now_second: u64) -> impl Iterator<Item = &Slot> {
        let len = self.slots.len() as u64;
        self.slots.iter().filter(move |s| {
            s.second != u64::MAX && s.second <= now_second && now_second - s.second < len
        })
    }
}

/// Figures of one backend over the window.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct BackendStats {
    pub requests: u64,
    pub errors: u64,
    pub error_rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// p99 time to the first byte (`guard.max_ttfb_p99_ms`).
    pub ttfb_p99_ms: f64,
}

/// Shadow comparisons over the window.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ShadowStats {
    pub compared: u64,
    pub mismatched: u64,
}

/// Per-backend rings sharing one epoch.
pub struct Windows {
    epoch: Instant,
    window: Duration,
    rings: [Mutex<Ring>; 2],
    last_p99: [AtomicU64; 2],
}

impl Windows {
    pub fn new(window: Duration) -> Windows {
        let len = window.as_secs().max(1) as usize;
        Windows {
            epoch: Instant::now(),
            window,
            rings: [Mutex::new(Ring::new(len)), Mutex::new(Ring::new(len))],
            last_p99: [AtomicU64::new(0), AtomicU64::new(0)],
        }
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_secs()
    }

    /// One finished request; `error` is a 5xx or a transport failure.
    pub fn record(&self, backend: Backend, now: Instant, latency: Duration, error: bool) {
        self.record_head(backend, now, latency, error, true);
    }

    /// One request at its head. `first_byte`: the head is the answer's first byte too; a
    /// stream's first byte is recorded when it comes instead ([`Self::record_ttfb`]).
    pub fn record_head(
        &self,
        backend: Backend,
        now: Instant,
        latency: Duration,
        error: bool,
        first_byte: bool,
    ) {
        let sec = self.second(now);
        let Ok(mut ring) = self.rings[backend.index()].lock() else {
            return;
        };
        let slot = ring.slot(sec);
        let b = bucket_of(latency);
        slot.count += 1;
        slot.errors += u64::from(error);
        slot.hist[b] += 1;
        if first_byte {
            slot.ttfb[b] += 1;
            slot.ttfb_count += 1;
        }
    }

    /// A stream's first body byte, `ttfb` after its request began.
    pub fn record_ttfb(&self, backend: Backend, now: Instant, ttfb: Duration) {
        let sec = self.second(now);
        let Ok(mut ring) = self.rings[backend.index()].lock() else {
            return;
        };
        let slot = ring.slot(sec);
        slot.ttfb[bucket_of(ttfb)] += 1;
        slot.ttfb_count += 1;
    }

    /// A request recorded as answered whose answer was then cut by the upstream (a stream that
    /// failed, or ended without its end marker): one more error, no more requests.
    pub fn record_abort(&self, backend: Backend, now: Instant) {
        let sec = self.second(now);
        let Ok(mut ring) = self.rings[backend.index()].lock() else {
            return;
        };
        ring.slot(sec).errors += 1;
    }

    /// One shadow comparison (kept in the vastai ring: mismatches are vastai's to answer for).
    pub fn record_shadow(&self, now: Instant, mismatch: bool) {
        let sec = self.second(now);
        let Ok(mut ring) = self.rings[1].lock() else {
            return;
        };
        let slot = ring.slot(sec);
        slot.shadow_compared += 1;
        slot.shadow_mismatched += u64::from(mismatch);
    }

    /// Forgets everything recorded for `backend` (and, for vastai, the shadow comparisons).
    pub fn reset(&self, backend: Backend) {
        if let Ok(mut ring) = self.rings[backend.index()].lock() {
            for s in ring.slots.iter_mut() {
                *s = Slot::empty();
            }
        }
    }

    /// The last p99 seen for `backend` in a window that had requests: the performance baseline
    /// once a backend no longer gets traffic (legacy after a full cutover).
    pub fn last_p99_ms(&self, backend: Backend) -> Option<f64> {
        let bits = self.last_p99[backend.index()].load(Ordering::Relaxed);
        (bits != 0).then(|| f64::from_bits(bits))
    }

    pub fn stats(&self, backend: Backend, now: Instant) -> BackendStats {
        let sec = self.second(now);
        let Ok(ring) = self.rings[backend.index()].lock() else {
            return BackendStats::default();
        };
        let mut hist = [0u64; BUCKETS];
        let mut ttfb = [0u64; BUCKETS];
        let (mut count, mut errors, mut firsts) = (0u64, 0u64, 0u64);
        for s in ring.live(sec) {
            count += s.count;
            errors += s.errors;
            firsts += s.ttfb_count;
            for (h, v) in hist.iter_mut().zip(s.hist.iter()) {
                *h += u64::from(*v);
            }
            for (h, v) in ttfb.iter_mut().zip(s.ttfb.iter()) {
                *h += u64::from(*v);
            }
        }
        let p99_ms = quantile(&hist, count, 0.99);
        if count > 0 {
            self.last_p99[backend.index()].store(p99_ms.to_bits(), Ordering::Relaxed);
        }
        BackendStats {
            requests: count,
            errors,
            error_rate: if count == 0 {
                0.0
            } else {
                errors as f64 / count as f64
            },
            p50_ms: quantile(&hist, count, 0.50),
            p99_ms,
            ttfb_p99_ms: quantile(&ttfb, firsts, 0.99),
        }
    }

    pub fn shadow(&self, now: Instant) -> ShadowStats {
        let sec = self.second(now);
        let Ok(ring) = self.rings[1].lock() else {
            return ShadowStats::default();
        };
        ring.live(sec)
            .fold(ShadowStats::default(), |acc, s| ShadowStats {
                compared: acc.compared + s.shadow_compared,
                mismatched: acc.mismatched + s.shadow_mismatched,
            })
    }
}

/// The upper bound of the bucket holding the q-quantile (within 12 % of the true value).
fn quantile(hist: &[u64; BUCKETS], count: u64, q: f64) -> f64 {
    if count == 0 {
        return 0.0;
    }
    let rank = ((count as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, n) in hist.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return (bucket_upper_ms(i) * 1000.0).round() / 1000.0;
        }
    }
    bucket_upper_ms(BUCKETS - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn counts_rates_and_quantiles_slide() {
        let w = Windows::new(Duration::from_secs(10));
        let t0 = Instant::now();
        for i in 0..100u64 {
            let lat = Duration::from_millis(if i < 98 { 10 } else { 500 });
            w.record(Backend::Vastai, t0, lat, i % 10 == 0);
        }
        let s = w.stats(Backend::Vastai, t0);
        assert_eq!((s.requests, s.errors), (100, 10));
        assert!((s.error_rate - 0.1).abs() < 1e-9);
        assert!(s.p50_ms >= 10.0 && s.p50_ms < 11.3, "p50 {}", s.p50_ms);
        assert!(s.p99_ms >= 500.0 && s.p99_ms < 560.0, "p99 {}", s.p99_ms);
        assert_eq!(w.stats(Backend::Legacy, t0).requests, 0);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(w.stats(Backend::Vastai, Instant::now()).requests, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn shadow_counts() {
        let w = Windows::new(Duration::from_secs(5));
        let now = Instant::now();
        w.record_shadow(now, false);
        w.record_shadow(now, true);
        assert_eq!(
            w.shadow(now),
            ShadowStats {
                compared: 2,
                mismatched: 1
            }
        );
    }
}
