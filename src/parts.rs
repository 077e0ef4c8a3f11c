//! How a NAR streamed as a multipart upload is cut into parts, so that a NAR of any
//! size stays within what S3 and GCS's XML API allow: at most 10,000 parts, each of
//! 5 MiB to 5 GiB (the last may be smaller). Azure's block blobs allow more.
//!
//! The part size comes from the size the NAR is expected to have at most (its NarSize:
//! compression never grows a NAR by more than a fraction of a percent), so that it
//! fills 9,000 parts; the other 1,000 are headroom for a NAR bigger than expected, or
//! one whose size is not known: from part 9,000 on the size doubles every 100 parts.
//! ```text
//! expected 200 GiB  → 23 MiB parts, 8,905 of them
//! expected ≤ 70 GiB → 8 MiB parts (9,000 hold 70.3 GiB; with the headroom: 869 GiB)
//! ```
//! Parts are held in memory while they are sent (a few per upload), so they are no
//! bigger than the expected size needs.

/// S3's (and GCS's) most parts per upload, and largest part.
pub const MAX_PARTS: u64 = 10_000;
pub const MAX_PART: u64 = 5 << 30;
/// Our smallest part (S3 and GCS want at least 5 MiB but for the last).
pub const MIN_PART: u64 = 8 << 20;
/// Parts planned for the expected size; the rest is headroom.
const PLANNED: u64 = 9_000;
/// Beyond the planned parts, the part size doubles every this many parts.
const GROWTH_EVERY: u64 = 100;
/// Part sizes are whole MiB.
const ROUND: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartSizes {
    base: u64,
}

impl PartSizes {
    /// Sizes for a NAR expected to be at most `expected` bytes (0: not known).
    pub fn for_expected(expected: u64) -> Self {
        let per_part = expected.div_ceil(PLANNED).div_ceil(ROUND) * ROUND;
        PartSizes {
            base: per_part.clamp(MIN_PART, MAX_PART),
        }
    }

    /// The size of part `index` (counted from 0); every part but the last has it.
    pub fn size(&self, index: u64) -> u64 {
        let doublings = index.saturating_sub(PLANNED) / GROWTH_EVERY;
        self.base
            .saturating_mul(1 << doublings.min(32))
            .min(MAX_PART)
    }

    /// How many parts `total` bytes take, None if more than [`MAX_PARTS`].
    pub fn parts_for(&self, total: u64) -> Option<u64> {
        let mut left = total;
        for index in 0..MAX_PARTS {
            left = left.saturating_sub(self.size(index));
            if left == 0 {
                return Some(index + 1);
            }
        }
        None
    }

    /// The most bytes [`MAX_PARTS`] parts hold.
    pub fn capacity(&self) -> u64 {
        (0..MAX_PARTS).map(|i| self.size(i)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn a_200_gib_nar_takes_23_mib_parts_and_fewer_than_10000_of_them() {
        // 200 GiB / 9,000 = 22.76 MiB, rounded up to whole MiB.
        let sizes = PartSizes::for_expected(200 * GIB);
        assert_eq!(sizes.size(0), 23 * MIB);
        // 200 × 1024 / 23 = 8,904.3: the last part is a partial one.
        assert_eq!(sizes.parts_for(200 * GIB), Some(8_905));
        // The same NAR 10% bigger than expected (it never is) still fits.
        assert!(sizes.parts_for(220 * GIB).unwrap() <= MAX_PARTS);
    }

    #[test]
    fn small_and_unknown_sizes_use_8_mib_parts_and_grow_past_9000() {
        for expected in [0, 1, 100 * MIB, 70 * GIB] {
            let sizes = PartSizes::for_expected(expected);
            assert_eq!(sizes.size(0), 8 * MIB, "{expected}");
            assert_eq!(sizes.size(8_999), 8 * MIB, "{expected}");
        }
        let unknown = PartSizes::for_expected(0);
        // 9,000 × 8 MiB = 70.3 GiB at the planned size, then doubling every 100 parts:
        // 16 MiB from part 9,100, 32 MiB from 9,200 … 4 GiB from 9,900.
        assert_eq!(unknown.size(9_099), 8 * MIB);
        assert_eq!(unknown.size(9_100), 16 * MIB);
        assert_eq!(unknown.size(9_999), 4 * GIB);
        // 72,000 MiB + 100 × 8 MiB × (1 + 2 + … + 512) = 72,000 + 818,400 MiB.
        assert_eq!(unknown.capacity(), (72_000 + 818_400) * MIB);
        // A 200 GiB NAR whose size nobody told us still fits: 70.3 GiB in the first
        // 9,000 parts, 99.2 GiB more in 700 parts of 8 MiB to 512 MiB, the last 30.5
        // GiB in 31 parts of 1 GiB.
        assert_eq!(unknown.parts_for(200 * GIB), Some(9_731));
    }

    #[test]
    fn parts_stay_within_s3_limits_for_any_expected_size() {
        // Up to S3's largest object (5 TiB) and beyond: 5 MiB ≤ part ≤ 5 GiB, and the
        // expected size always fits in the planned 9,000 parts.
        for expected in [
            8 * MIB,
            GIB,
            5 * GIB + 1,
            78 * GIB,
            200 * GIB,
            5 << 40,
            40 << 40,
        ] {
            let sizes = PartSizes::for_expected(expected);
            for index in [0, 8_999, 9_000, 9_500, 9_999] {
                let s = sizes.size(index);
                assert!(
                    (5 * MIB..=MAX_PART).contains(&s),
                    "{expected}: part {index} {s}"
                );
            }
            if expected <= PLANNED * MAX_PART {
                assert!(sizes.parts_for(expected).unwrap() <= PLANNED, "{expected}");
            }
        }
        // 5 TiB: 5 × 2^40 / 9,000 = 582.5 MiB → 583 MiB parts, 8,993 of them.
        let s3_max = PartSizes::for_expected(5 << 40);
        assert_eq!(s3_max.size(0), 583 * MIB);
        assert_eq!(s3_max.parts_for(5 << 40), Some(8_993));
        // Beyond what 10,000 parts of 5 GiB hold there is nothing to do.
        assert_eq!(PartSizes::for_expected(0).parts_for(u64::MAX), None);
    }
}
