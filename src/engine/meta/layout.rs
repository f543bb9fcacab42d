//! Where things are on the cache device.

use super::table::ENTRIES_PER_PAGE;
use crate::engine::geometry::{FrameOrder, Geometry};

/// Size of a superblock slot and of a table page.
pub const META_PAGE: u64 = 4096;
/// Largest commit journal (smaller caches get a journal twice their table,
/// but at least [`MIN_JOURNAL_LEN`]).
pub const JOURNAL_LEN: u64 = 4 << 20;
pub const MIN_JOURNAL_LEN: u64 = 64 << 10;
const JOURNAL_OFFSET: u64 = 2 * META_PAGE;

/// Offsets of the metadata regions and the data area for one geometry.
///
/// Invariant: regions do not overlap and appear in the order superblocks,
/// journal, table, data; `data_offset` is a multiple of the block size (or of
/// 4 KiB when the block size is smaller), so frames are aligned for O_DIRECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// The geometry the layout was made for.
    pub geometry: Geometry,
    pub journal_offset: u64,
    pub journal_len: u64,
    pub table_offset: u64,
    pub data_offset: u64,
}

impl Layout {
    pub fn new(g: &Geometry) -> Layout {
        let table_len = g.cache_blocks.div_ceil(ENTRIES_PER_PAGE) * META_PAGE;
        let journal_len = (2 * table_len).clamp(MIN_JOURNAL_LEN, JOURNAL_LEN);
        let table_offset = JOURNAL_OFFSET + journal_len;
        let align = u64::from(g.block_size).max(META_PAGE);
        // Two copies of the table: a checkpoint writes the inactive one and
        // then switches the superblock over, so a torn table write never
        // damages the table recovery relies on.
        let data_offset = (table_offset + 2 * table_len).div_ceil(align) * align;
        Layout {
            geometry: *g,
            journal_offset: JOURNAL_OFFSET,
            journal_len,
            table_offset,
            data_offset,
        }
    }

    pub fn table_pages(&self) -> u64 {
        self.geometry.cache_blocks.div_ceil(ENTRIES_PER_PAGE)
    }

    /// Byte offset of table copy `copy` (0 or 1).
    pub fn table_copy_offset(&self, copy: u8) -> u64 {
        self.table_offset + u64::from(copy & 1) * self.table_pages() * META_PAGE
    }

    /// Bytes of metadata in front of the data area.
    pub fn meta_len(&self) -> u64 {
        self.data_offset
    }

    /// Total bytes the layout needs on the cache device.
    pub fn device_len(&self) -> u64 {
        self.data_offset.saturating_add(
            self.geometry
                .cache_blocks
                .saturating_mul(u64::from(self.geometry.block_size)),
        )
    }

    /// Byte offset of frame `frame` on the cache device (where
    /// [`Geometry::slot_of`] puts it).
    #[inline]
    pub fn frame_offset(&self, frame: u64) -> u64 {
        self.data_offset + self.geometry.slot_of(frame) * u64::from(self.geometry.block_size)
    }

    /// The frame at byte offset `offset + n * block_size` of the data area
    /// for `n` in `0..cache_blocks`, in device order.
    pub fn frames_in_device_order(&self) -> impl Iterator<Item = u64> {
        let g = self.geometry;
        (0..self.geometry.cache_blocks).map(move |s| g.frame_at(s))
    }

    /// The largest number of blocks of `block_size` that fit on a device of
    /// `dev_size` bytes together with their metadata, rounded down to a
    /// multiple of `multiple`.
    pub fn fit_blocks(dev_size: u64, block_size: u32, multiple: u32) -> u64 {
        let m = u64::from(multiple.max(1));
        let fits = |units: u64| {
            let g = Geometry {
                block_size,
                cache_blocks: units * m,
                assoc: 1,
                run: 1,
                span: 1,
                order: FrameOrder::ByRow,
            };
            Layout::new(&g).device_len() <= dev_size
        };
        // Binary search for the largest number of units (of `m` blocks) that fits.
        let (mut lo, mut hi) = (0u64, dev_size / u64::from(block_size) / m + 1);
        while lo + 1 < hi {
            let mid = lo + (hi - lo) / 2;
            if fits(mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        lo * m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_uses_the_device_and_aligns_data() {
        for (dev, bs, m) in [
            (64u64 << 20, 4096u32, 1u32),
            (1 << 30, 65536, 256),
            (100 << 20, 1 << 20, 4),
        ] {
            let n = Layout::fit_blocks(dev, bs, m);
            assert!(n > 0 && n % u64::from(m) == 0);
            let g = Geometry {
                block_size: bs,
                cache_blocks: n,
                assoc: 1,
                run: 1,
                span: 1,
                order: FrameOrder::ByRow,
            };
            let l = Layout::new(&g);
            assert!(l.device_len() <= dev);
            assert_eq!(l.data_offset % u64::from(bs).max(4096), 0);
            // One more multiple would not fit.
            let g2 = Geometry {
                cache_blocks: n + u64::from(m),
                ..g
            };
            assert!(Layout::new(&g2).device_len() > dev);
        }
        assert_eq!(Layout::fit_blocks(64 << 10, 4096, 1), 0);
    }
}
