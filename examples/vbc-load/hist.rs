//! A log-linear latency histogram.
//!
//! Values (nanoseconds) below 128 get a bucket each; above that every power of
//! two is split into 64 equal buckets, so a reported percentile is within
//! 1/64 (about 1.6%) of the true value. Fixed size, no allocation per sample,
//! and histograms from several queues merge by adding counts.

/// Values below this get one bucket each.
const LINEAR: u64 = 128;
/// Sub-buckets per power of two (2^SUB_BITS).
const SUB_BITS: u32 = 6;
const SUB: usize = 1 << SUB_BITS;
/// Powers of two from 2^7 to 2^63.
const BUCKETS: usize = LINEAR as usize + (64 - 7) * SUB;

/// Latency samples in nanoseconds.
#[derive(Clone)]
pub struct Hist {
    counts: Vec<u64>,
    count: u64,
    sum_ns: u128,
    max_ns: u64,
}

fn index(v: u64) -> usize {
    if v < LINEAR {
        return v as usize;
    }
    // e >= 7 because v >= 128.
    let e = 63 - v.leading_zeros();
    let mantissa = ((v >> (e - SUB_BITS)) as usize) & (SUB - 1);
    LINEAR as usize + (e as usize - 7) * SUB + mantissa
}

/// The midpoint of bucket `i`, in nanoseconds.
fn value(i: usize) -> f64 {
    if i < LINEAR as usize {
        return i as f64;
    }
    let k = i - LINEAR as usize;
    let e = (k / SUB) as u32 + 7;
    let mantissa = (k % SUB) as u64;
    let width = 1u64 << (e - SUB_BITS);
    let low = (SUB as u64 + mantissa) * width;
    low as f64 + width as f64 / 2.0
}

impl Default for Hist {
    fn default() -> Self {
        Hist {
            counts: vec![0; BUCKETS],
            count: 0,
            sum_ns: 0,
            max_ns: 0,
        }
    }
}

impl Hist {
    pub fn record(&mut self, ns: u64) {
        self.counts[index(ns)] += 1;
        self.count += 1;
        self.sum_ns += u128::from(ns);
        self.max_ns = self.max_ns.max(ns);
    }

    pub fn merge(&mut self, other: &Hist) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.count += other.count;
        self.sum_ns += other.sum_ns;
        self.max_ns = self.max_ns.max(other.max_ns);
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// Mean in microseconds (0 when empty).
    pub fn mean_us(&self) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        self.sum_ns as f64 / self.count as f64 / 1000.0
    }

    pub fn max_us(&self) -> f64 {
        self.max_ns as f64 / 1000.0
    }

    /// The `p`-th percentile (0 < p <= 100) in microseconds: the smallest
    /// bucket at which at least p% of the samples are covered.
    pub fn percentile_us(&self, p: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let want = ((p / 100.0) * self.count as f64).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                // Never report more than the largest sample seen.
                return value(i).min(self.max_ns as f64) / 1000.0;
            }
        }
        self.max_us()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for v in [0u64, 1, 127, 128, 129, 1000, 4095, 4096, 1 << 40, u64::MAX] {
            let i = index(v);
            assert!(i >= last && i < BUCKETS, "v={v} i={i}");
            last = i;
            if v > 0 {
                let rel = (value(i) - v as f64).abs() / v as f64;
                assert!(
                    rel <= 1.0 / 64.0,
                    "v={v} bucket value {} rel {rel}",
                    value(i)
                );
            }
        }
    }

    #[test]
    fn percentiles_of_a_uniform_ramp() {
        let mut h = Hist::default();
        for us in 1..=1000u64 {
            h.record(us * 1000);
        }
        assert_eq!(h.count(), 1000);
        assert!((h.mean_us() - 500.5).abs() < 1e-9);
        let p50 = h.percentile_us(50.0);
        let p99 = h.percentile_us(99.0);
        assert!((p50 - 500.0).abs() / 500.0 < 0.02, "p50 {p50}");
        assert!((p99 - 990.0).abs() / 990.0 < 0.02, "p99 {p99}");
        assert!(h.percentile_us(100.0) <= 1000.0);
    }
}
