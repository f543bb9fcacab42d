//! Workload generation: a small PRNG, offset distributions and the choice of
//! operation for each request.
//!
//! Offsets are always whole multiples of the block size inside the region
//! `[0, blocks * bs)`, so every request the generator makes is valid for the
//! device; bounds are established once when the distribution is built.

use std::sync::Arc;

/// xorshift64*: fast, tiny and good enough to spread offsets. Not for crypto.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // A zero state would stay zero forever.
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15 | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[0, n)` (n > 0), by multiply-shift (bias below 2^-32 for
    /// any n we use).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Largest number of blocks a Zipf distribution is built over: its constant
/// is a sum over every block, computed once at start.
pub const ZIPF_MAX_BLOCKS: u64 = 1 << 26;

/// Zipf-distributed block ranks (Gray et al., "Quickly generating
/// billion-record synthetic databases", SIGMOD 1994), for 0 < theta < 1.
/// Rank r is then scattered over the region by a bijection so that the hot
/// blocks are not all at the start of the disk.
#[derive(Debug)]
pub struct Zipf {
    n: u64,
    theta: f64,
    alpha: f64,
    zetan: f64,
    eta: f64,
}

/// A prime larger than any block count, so `r * P mod n` permutes `[0, n)`.
const SCATTER_PRIME: u128 = (1 << 61) - 1;

impl Zipf {
    pub fn new(n: u64, theta: f64) -> Result<Zipf, String> {
        if !(theta > 0.0 && theta < 1.0) {
            return Err(format!(
                "zipf theta {theta} must be strictly between 0 and 1"
            ));
        }
        if !(2..=ZIPF_MAX_BLOCKS).contains(&n) {
            return Err(format!(
                "zipf needs between 2 and {ZIPF_MAX_BLOCKS} blocks in the region, got {n}"
            ));
        }
        let zeta = |k: u64| (1..=k).map(|i| 1.0 / (i as f64).powf(theta)).sum::<f64>();
        let zetan = zeta(n);
        let zeta2 = zeta(2);
        let eta = (1.0 - (2.0 / n as f64).powf(1.0 - theta)) / (1.0 - zeta2 / zetan);
        Ok(Zipf {
            n,
            theta,
            alpha: 1.0 / (1.0 - theta),
            zetan,
            eta,
        })
    }

    /// A rank in `[0, n)`; rank 0 is the most popular.
    pub fn rank(&self, rng: &mut Rng) -> u64 {
        let u = rng.unit();
        let uz = u * self.zetan;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) {
            return 1;
        }
        let r = (self.n as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64;
        r.min(self.n - 1)
    }

    /// The block that holds rank `r`.
    pub fn scatter(&self, r: u64) -> u64 {
        ((u128::from(r) * SCATTER_PRIME) % u128::from(self.n)) as u64
    }
}

/// How offsets are chosen.
#[derive(Clone, Debug)]
pub enum Dist {
    Uniform,
    Zipf(Arc<Zipf>),
}

/// One queue's offset source. Random patterns draw over the whole region;
/// sequential patterns walk this queue's own stripe of it and wrap around.
pub struct Offsets {
    bs: u64,
    blocks: u64,
    dist: Dist,
    sequential: bool,
    /// Random draws stay inside this queue's stripe (used by --verify so no
    /// two queues ever touch the same block).
    confine: bool,
    stripe_start: u64,
    stripe_len: u64,
    next: u64,
    /// Blocks handed out so far in sequential mode.
    issued: u64,
}

impl Offsets {
    /// `blocks` >= 1 blocks of `bs` bytes; queue `q` of `queues`.
    pub fn new(
        bs: u64,
        blocks: u64,
        dist: Dist,
        sequential: bool,
        confine: bool,
        q: u64,
        queues: u64,
    ) -> Self {
        let per = blocks / queues;
        let extra = blocks % queues;
        // The first `extra` stripes get one more block.
        let stripe_start = q * per + q.min(extra);
        let stripe_len = per + u64::from(q < extra);
        Offsets {
            bs,
            blocks,
            dist,
            sequential,
            confine,
            stripe_start,
            stripe_len,
            next: 0,
            issued: 0,
        }
    }

    /// Blocks in this queue's stripe (what a single sequential pass covers).
    pub fn stripe_blocks(&self) -> u64 {
        self.stripe_len
    }

    /// Sequential blocks handed out so far.
    pub fn issued(&self) -> u64 {
        self.issued
    }

    /// The next byte offset.
    pub fn next(&mut self, rng: &mut Rng) -> u64 {
        let block = if self.sequential {
            let b = self.stripe_start + self.next;
            self.next += 1;
            if self.next >= self.stripe_len {
                self.next = 0;
            }
            self.issued += 1;
            b
        } else {
            let b = match &self.dist {
                Dist::Uniform => rng.below(self.blocks),
                Dist::Zipf(z) => z.scatter(z.rank(rng)),
            };
            if self.confine {
                self.stripe_start + b % self.stripe_len
            } else {
                b
            }
        };
        block * self.bs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_is_skewed_and_in_range() {
        let n = 10_000;
        let z = Zipf::new(n, 0.9).unwrap();
        let mut rng = Rng::new(7);
        let mut hits = vec![0u32; n as usize];
        for _ in 0..200_000 {
            let r = z.rank(&mut rng);
            assert!(r < n);
            hits[r as usize] += 1;
        }
        // The top 1% of ranks take far more than 1% of the draws.
        let top: u32 = hits[..(n as usize / 100)].iter().sum();
        assert!(top > 200_000 / 5, "top 1% got {top}");
        assert!(hits[0] > hits[50]);
    }

    #[test]
    fn scatter_is_a_permutation() {
        let z = Zipf::new(1000, 0.5).unwrap();
        let mut seen = vec![false; 1000];
        for r in 0..1000 {
            let b = z.scatter(r) as usize;
            assert!(!seen[b]);
            seen[b] = true;
        }
    }

    #[test]
    fn sequential_stripes_cover_the_region_once() {
        let (blocks, queues) = (103u64, 4u64);
        let mut covered = vec![0u8; blocks as usize];
        let mut rng = Rng::new(1);
        for q in 0..queues {
            let mut o = Offsets::new(4096, blocks, Dist::Uniform, true, false, q, queues);
            for _ in 0..o.stripe_blocks() {
                covered[(o.next(&mut rng) / 4096) as usize] += 1;
            }
        }
        assert!(covered.iter().all(|&c| c == 1));
    }

    #[test]
    fn bad_zipf_parameters_are_refused() {
        assert!(Zipf::new(100, 1.0).is_err());
        assert!(Zipf::new(100, 0.0).is_err());
        assert!(Zipf::new(1, 0.5).is_err());
    }
}
