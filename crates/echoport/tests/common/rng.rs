//! A small deterministic PRNG (SplitMix64) and the per-test seed.

use std::time::{SystemTime, UNIX_EPOCH};

/// SplitMix64: tiny, fast, good enough to pick sizes and fill payloads.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.0)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(lo <= hi);
        lo + self.below(hi - lo + 1)
    }

    /// In `lo..=hi`, with every power of two equally likely: many small values, some large.
    pub fn log_uniform(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(1 <= lo && lo <= hi);
        let (a, b) = (63 - lo.leading_zeros(), 63 - hi.leading_zeros());
        let bits = self.range(a as u64, b as u64) as u32;
        let from = (1u64 << bits).max(lo);
        let to = if bits >= 63 {
            hi
        } else {
            ((1u64 << (bits + 1)) - 1).min(hi)
        };
        self.range(from, to)
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// The SplitMix64 finaliser: a good 64-bit hash of one word.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The seed of one test: `ECHOPORT_TEST_SEED` when set, else fresh. Printed, so that a
/// failure (whose output the test harness shows) can be replayed.
pub fn seed(test: &str) -> u64 {
    let seed = match std::env::var("ECHOPORT_TEST_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .expect("ECHOPORT_TEST_SEED must be an unsigned integer"),
        Err(_) => {
            let t = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            mix64(t ^ (std::process::id() as u64) << 32)
        }
    };
    eprintln!("{test}: seed {seed} (ECHOPORT_TEST_SEED={seed} repeats it)");
    seed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_stay_in_bounds() {
        let mut r = Rng::new(1);
        for _ in 0..10_000 {
            let v = r.log_uniform(1, 16 << 20);
            assert!((1..=16 << 20).contains(&v));
            let w = r.range(5, 9);
            assert!((5..=9).contains(&w));
        }
    }
}
