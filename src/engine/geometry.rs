//! Cache geometry: block size, number of cache blocks and associativity, and
//! where a source block may live.

/// Smallest and largest cache block size.
pub const MIN_BLOCK_SIZE: u32 = 4096;
pub const MAX_BLOCK_SIZE: u32 = 1 << 20;
/// Largest number of cache blocks (frame indices are u32).
pub const MAX_CACHE_BLOCKS: u64 = u32::MAX as u64;
/// Largest source block number that fits an in-RAM entry.
pub const MAX_SOURCE_BLOCKS: u64 = 1 << 48;
/// Neighbouring source blocks grouped into one set, at most.
const MAX_RUN: u32 = 16;
/// Neighbouring runs placed in neighbouring sets, at most.
pub const MAX_SPAN: u32 = 16;

/// What the user asked for. `None` means "choose the default".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GeometryRequest {
    /// Cache block size in bytes (default 64 KiB).
    pub block_size: Option<u32>,
    pub cache_blocks: Option<u64>,
    pub assoc: Option<u32>,
}

/// Default cache block size: 64 KiB.
pub const DEFAULT_BLOCK_SIZE: u32 = 64 * 1024;
/// Default associativity.
pub const DEFAULT_ASSOC: u32 = 64;

/// A geometry error. Messages name the parameter and the sizes involved.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GeometryError {
    #[error("block size {0} is not a power of two between 4096 (4K) and 1048576 (1M)")]
    BlockSize(u32),
    #[error("associativity {0} is not a power of two of at least 1")]
    AssocNotPowerOfTwo(u32),
    #[error("associativity {assoc} is larger than the number of cache blocks ({blocks})")]
    AssocTooLarge { assoc: u32, blocks: u64 },
    #[error("number of cache blocks {blocks} is not a multiple of the associativity {assoc}")]
    BlocksNotMultiple { blocks: u64, assoc: u32 },
    #[error("number of cache blocks must be at least 1")]
    NoBlocks,
    #[error("{blocks} cache blocks is more than the maximum of {max}")]
    TooManyBlocks { blocks: u64, max: u64 },
    #[error("cache of {blocks} blocks of {block_size} bytes needs {needed} bytes on the cache device (with {meta} bytes of metadata), but the device has {available} bytes")]
    CacheTooSmall {
        blocks: u64,
        block_size: u32,
        needed: u64,
        meta: u64,
        available: u64,
    },
    #[error("source of {source_size} bytes has more than 2^48 blocks of {block_size} bytes")]
    SourceTooLarge { source_size: u64, block_size: u32 },
}

/// The order of the frames in the data area of the cache device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FrameOrder {
    /// Set after set: frame `f` is slot `f` (format version 1).
    BySet,
    /// Row after row (format version 2). A set's ways form `assoc / run`
    /// rows of `run` frames; row `r` of every set comes before row `r + 1`
    /// of any set, set after set. So runs that the same row of neighbouring
    /// sets hold lie side by side on the device, and a guest reading in order
    /// reads the cache device in order too (see [`Geometry::set_of`]).
    ByRow,
}

/// A validated geometry.
///
/// Invariants: `block_size` is a power of two in [4K, 1M]; `assoc` is a power
/// of two dividing `cache_blocks`; `sets = cache_blocks / assoc >= 1`; `run`
/// is a power of two dividing `assoc`; `span` is a power of two dividing
/// `sets`, and is 1 with [`FrameOrder::BySet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Geometry {
    pub block_size: u32,
    pub cache_blocks: u64,
    pub assoc: u32,
    /// Neighbouring source blocks that share a set (in different frames).
    pub run: u32,
    /// Neighbouring runs that go to neighbouring sets.
    pub span: u32,
    /// The order of the frames on the device.
    pub order: FrameOrder,
}

impl Geometry {
    /// Validates the parts of a request that do not depend on device sizes.
    pub fn check_request(req: &GeometryRequest) -> Result<(), GeometryError> {
        let bs = req.block_size.unwrap_or(DEFAULT_BLOCK_SIZE);
        if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
            return Err(GeometryError::BlockSize(bs));
        }
        if let Some(a) = req.assoc {
            if !a.is_power_of_two() {
                return Err(GeometryError::AssocNotPowerOfTwo(a));
            }
        }
        if let Some(b) = req.cache_blocks {
            if b == 0 {
                return Err(GeometryError::NoBlocks);
            }
            if b > MAX_CACHE_BLOCKS {
                return Err(GeometryError::TooManyBlocks {
                    blocks: b,
                    max: MAX_CACHE_BLOCKS,
                });
            }
            if let Some(a) = req.assoc {
                if u64::from(a) > b {
                    return Err(GeometryError::AssocTooLarge {
                        assoc: a,
                        blocks: b,
                    });
                }
                if b % u64::from(a) != 0 {
                    return Err(GeometryError::BlocksNotMultiple {
                        blocks: b,
                        assoc: a,
                    });
                }
            }
        }
        Ok(())
    }

    /// Builds the geometry for `blocks` frames, choosing the associativity when
    /// the request leaves it open (the default, or the largest power of two
    /// that divides `blocks` and is not above it).
    pub fn resolve(req: &GeometryRequest, blocks: u64) -> Result<Geometry, GeometryError> {
        Self::check_request(&GeometryRequest {
            cache_blocks: Some(blocks),
            ..*req
        })?;
        let assoc = match req.assoc {
            Some(a) => a,
            None => {
                let mut a = DEFAULT_ASSOC;
                while a > 1 && (u64::from(a) > blocks || blocks % u64::from(a) != 0) {
                    a /= 2;
                }
                a
            }
        };
        Ok(Geometry {
            block_size: req.block_size.unwrap_or(DEFAULT_BLOCK_SIZE),
            cache_blocks: blocks,
            assoc,
            run: assoc.min(MAX_RUN),
            span: span_for(blocks / u64::from(assoc)),
            order: FrameOrder::ByRow,
        })
    }

    /// The same geometry as format version 1 mapped it: no span, frames
    /// set after set.
    pub fn version1(self) -> Geometry {
        Geometry {
            span: 1,
            order: FrameOrder::BySet,
            ..self
        }
    }

    /// The on-disk format version of this geometry's mapping and layout.
    pub fn format_version(&self) -> u32 {
        match self.order {
            FrameOrder::BySet => 1,
            FrameOrder::ByRow => 2,
        }
    }

    /// Number of sets (assoc is a power of two: a shift, not a division).
    #[inline]
    pub fn sets(&self) -> u64 {
        self.cache_blocks >> self.assoc.trailing_zeros()
    }

    /// The set that source block `block` maps to.
    ///
    /// `run` neighbouring blocks share a set, so a sequential run lands in one
    /// set (in different frames). `span` neighbouring runs go to `span`
    /// neighbouring sets (an aligned group of them), and the groups are
    /// spread over the sets by a multiplicative hash so strided access does
    /// not pile into one set.
    #[inline]
    pub fn set_of(&self, block: u64) -> u64 {
        // run and span are powers of two: shifts, not divisions (this runs
        // for every block of every request, and 16 M times at start-up).
        let run = block >> self.run.trailing_zeros();
        let span_shift = self.span.trailing_zeros();
        let h = (run >> span_shift).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        // Map the hash onto [0, sets / span) without division (Lemire's range
        // reduction); span divides sets.
        let groups = self.sets() >> span_shift;
        (((u128::from(h) * u128::from(groups)) >> 64) as u64) << span_shift
            | (run & (u64::from(self.span) - 1))
    }

    /// The set that frame `frame` (`set * assoc + way`) belongs to.
    #[inline]
    pub fn set_of_frame(&self, frame: u64) -> u64 {
        frame >> self.assoc.trailing_zeros()
    }

    /// The position of frame `frame` (`set * assoc + way`) in the data area,
    /// in frames. A bijection of `[0, cache_blocks)`. Runs for every cache
    /// I/O, so assoc and run (powers of two) are shifts and masks.
    #[inline]
    pub fn slot_of(&self, frame: u64) -> u64 {
        match self.order {
            FrameOrder::BySet => frame,
            FrameOrder::ByRow => {
                let r_shift = self.run.trailing_zeros();
                let way = frame & (u64::from(self.assoc) - 1);
                let row = way >> r_shift;
                ((row * self.sets() + self.set_of_frame(frame)) << r_shift)
                    | (way & (u64::from(self.run) - 1))
            }
        }
    }

    /// The frame at position `slot` of the data area: the inverse of
    /// [`Geometry::slot_of`].
    pub fn frame_at(&self, slot: u64) -> u64 {
        match self.order {
            FrameOrder::BySet => slot,
            FrameOrder::ByRow => {
                let (a, r) = (u64::from(self.assoc), u64::from(self.run));
                let row_len = self.sets() * r;
                let (row, rest) = (slot / row_len, slot % row_len);
                rest / r * a + row * r + rest % r
            }
        }
    }
}

/// The largest span worth using with `sets` sets: [`MAX_SPAN`], but at most
/// `sets / 16`, so runs at the same place in their groups still have at
/// least 16 sets to spread over (a power of two, at least 1).
pub fn max_span(sets: u64) -> u32 {
    round_down_pow2((sets / 16).max(1)).min(u64::from(MAX_SPAN)) as u32
}

/// The span for `sets` sets: the largest power of two, at most
/// [`max_span`], that divides it.
pub fn span_for(sets: u64) -> u32 {
    1 << sets.trailing_zeros().min(max_span(sets).trailing_zeros())
}

/// Largest power of two `<= n` (n > 0).
pub fn round_down_pow2(n: u64) -> u64 {
    if n == 0 {
        0
    } else {
        1u64 << (63 - n.leading_zeros())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(bs: u32, blocks: Option<u64>, assoc: Option<u32>) -> GeometryRequest {
        GeometryRequest {
            block_size: Some(bs),
            cache_blocks: blocks,
            assoc,
        }
    }

    #[test]
    fn block_size_errors_name_the_value() {
        for bs in [0, 512, 4095, 6000, 2 << 20] {
            let e = Geometry::check_request(&req(bs, None, None)).unwrap_err();
            assert_eq!(e, GeometryError::BlockSize(bs));
            assert!(e.to_string().contains(&bs.to_string()));
        }
        assert!(Geometry::check_request(&req(4096, None, None)).is_ok());
        assert!(Geometry::check_request(&req(1 << 20, None, None)).is_ok());
    }

    #[test]
    fn assoc_errors() {
        assert_eq!(
            Geometry::check_request(&req(4096, Some(64), Some(3))),
            Err(GeometryError::AssocNotPowerOfTwo(3))
        );
        assert_eq!(
            Geometry::check_request(&req(4096, Some(64), Some(128))),
            Err(GeometryError::AssocTooLarge {
                assoc: 128,
                blocks: 64
            })
        );
        assert_eq!(
            Geometry::check_request(&req(4096, Some(100), Some(8))),
            Err(GeometryError::BlocksNotMultiple {
                blocks: 100,
                assoc: 8
            })
        );
        assert_eq!(
            Geometry::check_request(&req(4096, Some(0), None)),
            Err(GeometryError::NoBlocks)
        );
    }

    #[test]
    fn runs_share_a_set_and_sets_are_used() {
        let g = Geometry::resolve(&req(4096, None, Some(8)), 1024).unwrap();
        assert_eq!(g.run, 8);
        assert_eq!(g.sets(), 128);
        for b in 0..8 {
            assert_eq!(g.set_of(b), g.set_of(0));
        }
        let mut used = std::collections::HashSet::new();
        for b in 0..(1024 * 8) {
            used.insert(g.set_of(b));
        }
        assert_eq!(used.len(), 128);
        // Fully associative and direct-mapped both resolve.
        let full = Geometry::resolve(&req(4096, None, Some(64)), 64).unwrap();
        assert_eq!(full.sets(), 1);
        assert_eq!(full.set_of(12345), 0);
        let direct = Geometry::resolve(&req(4096, None, Some(1)), 64).unwrap();
        assert_eq!(direct.run, 1);
    }

    #[test]
    fn slots_are_a_bijection_and_inverse() {
        for (blocks, assoc) in [(1024u64, 64u32), (96 * 64, 64), (64, 4), (48, 16), (8, 1)] {
            let g = Geometry::resolve(&req(4096, None, Some(assoc)), blocks).unwrap();
            for h in [g, g.version1()] {
                let mut seen = vec![false; blocks as usize];
                for f in 0..blocks {
                    let s = h.slot_of(f);
                    assert!(s < blocks && !seen[s as usize], "{h:?} frame {f}");
                    seen[s as usize] = true;
                    assert_eq!(h.frame_at(s), f);
                }
            }
        }
    }

    #[test]
    fn neighbouring_runs_sit_side_by_side() {
        // 256 sets of 64 ways: span 16, runs of 16 blocks, 4 rows.
        let g = Geometry::resolve(&req(65536, None, Some(64)), 256 * 64).unwrap();
        assert_eq!((g.run, g.span, g.order), (16, 16, FrameOrder::ByRow));
        // Place blocks in order, each run into the first free row of its set
        // (what a sequential fill of an empty cache does): a whole aligned
        // group of 16 runs is then one stretch of the device.
        let mut rows = vec![0u64; 256];
        let mut slots = Vec::new();
        for run in 0..(16 * 40) {
            let set = g.set_of(run * 16);
            for b in 0..16 {
                assert_eq!(g.set_of(run * 16 + b), set);
                slots.push(g.slot_of(set * 64 + rows[set as usize] * 16 + b));
            }
            rows[set as usize] += 1;
            assert!(rows[set as usize] <= 4, "set {set} is full");
        }
        for group in slots.chunks(16 * 16) {
            for w in group.windows(2) {
                assert_eq!(w[1], w[0] + 1);
            }
        }
        // Version 1 spreads each run on its own and keeps set order.
        let v1 = g.version1();
        assert_eq!(v1.slot_of(12345), 12345);
        assert_eq!(v1.set_of(16), {
            let h = 1u64.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            ((u128::from(h) * 256) >> 64) as u64
        });
    }

    #[test]
    fn span_is_the_largest_dividing_power_of_two() {
        assert_eq!(span_for(1), 1);
        assert_eq!(span_for(6), 1);
        assert_eq!(span_for(64), 4);
        assert_eq!(span_for(96), 4);
        assert_eq!(span_for(256), 16);
        assert_eq!(span_for(368), 16);
        assert_eq!(span_for(1 << 20), 16);
        assert_eq!(span_for(383), 1);
        assert_eq!(span_for(36), 2);
    }
}
