//! Message content: every message has its own bytes, and any byte of it can be regenerated
//! from (key, offset) alone, so the sender keeps no copy and the receiver checks each echoed
//! byte wherever the stream happens to be cut.
//!
//! Message `seq` of connection `gid` has key `mix(gid << 40 | seq)` (a bijection, so keys
//! never repeat within a run), and its bytes are the little-endian 64-bit words
//! `key + i * STEP`, `i = 0, 1, ...`. A flipped byte, a dropped or repeated byte, or bytes of
//! another message all miss the expected word.

/// Odd step between consecutive words (2^64 / golden ratio).
const STEP: u64 = 0x9E37_79B9_7F4A_7C15;

/// The content key of message `seq` of connection `gid`.
pub fn key(gid: u32, seq: u64) -> u64 {
    mix(((gid as u64) << 40) ^ (seq & ((1 << 40) - 1)))
}

/// The (connection, sequence number) of a content key: the inverse of [`key`]. A message
/// carries its key in its first 8 bytes, so a datagram says which message it is.
pub fn unkey(key: u64) -> (u32, u64) {
    let v = unmix(key);
    ((v >> 40) as u32, v & ((1 << 40) - 1))
}

const M1: u64 = 0xBF58_476D_1CE4_E5B9;
const M2: u64 = 0x94D0_49BB_1331_11EB;

/// The inverse of an odd number modulo 2^64 (Newton's iteration doubles the correct bits).
const fn inverse(a: u64) -> u64 {
    let mut x = a; // correct to 3 bits for odd a
    let mut i = 0;
    while i < 5 {
        x = x.wrapping_mul(2u64.wrapping_sub(a.wrapping_mul(x)));
        i += 1;
    }
    x
}

/// The inverse of `z ^ (z >> s)`.
fn unshift(y: u64, s: u32) -> u64 {
    let mut z = y;
    let mut k = s;
    while k < 64 {
        z = y ^ (z >> s);
        k += s;
    }
    z
}

fn unmix(mut z: u64) -> u64 {
    z = unshift(z, 31);
    z = z.wrapping_mul(inverse(M2));
    z = unshift(z, 27);
    z = z.wrapping_mul(inverse(M1));
    z = unshift(z, 30);
    z.wrapping_sub(STEP)
}

/// splitmix64's finaliser: a bijection of u64 with good avalanche.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(STEP);
    z = (z ^ (z >> 30)).wrapping_mul(M1);
    z = (z ^ (z >> 27)).wrapping_mul(M2);
    z ^ (z >> 31)
}

#[inline(always)]
fn word(key: u64, i: u64) -> u64 {
    key.wrapping_add(i.wrapping_mul(STEP))
}

#[inline(always)]
fn byte_at(key: u64, off: u64) -> u8 {
    (word(key, off / 8) >> ((off % 8) * 8)) as u8
}

/// Writes bytes `off .. off + dst.len()` of message `key` into `dst`.
pub fn fill(key: u64, off: u32, dst: &mut [u8]) {
    let mut off = off as u64;
    let mut i = 0;
    while i < dst.len() && !off.is_multiple_of(8) {
        dst[i] = byte_at(key, off);
        i += 1;
        off += 1;
    }
    let mut w = off / 8;
    let mut chunks = dst[i..].chunks_exact_mut(8);
    for c in &mut chunks {
        c.copy_from_slice(&word(key, w).to_le_bytes());
        w += 1;
    }
    let rest = chunks.into_remainder();
    let base = w * 8;
    for (j, b) in rest.iter_mut().enumerate() {
        *b = byte_at(key, base + j as u64);
    }
}

/// True when `src` equals bytes `off .. off + src.len()` of message `key`.
pub fn verify(key: u64, off: u32, src: &[u8]) -> bool {
    let mut off = off as u64;
    let mut i = 0;
    while i < src.len() && !off.is_multiple_of(8) {
        if src[i] != byte_at(key, off) {
            return false;
        }
        i += 1;
        off += 1;
    }
    let mut w = off / 8;
    let mut chunks = src[i..].chunks_exact(8);
    let mut diff = 0u64;
    for c in &mut chunks {
        let got = u64::from_le_bytes(c.try_into().expect("chunk of 8"));
        diff |= got ^ word(key, w);
        w += 1;
    }
    if diff != 0 {
        return false;
    }
    let base = w * 8;
    chunks
        .remainder()
        .iter()
        .enumerate()
        .all(|(j, &b)| b == byte_at(key, base + j as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(key: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        fill(key, 0, &mut v);
        v
    }

    #[test]
    fn pieces_match_the_whole_at_any_cut() {
        let k = key(7, 42);
        let all = whole(k, 131);
        for a in 0..all.len() {
            for b in a..=all.len() {
                let mut part = vec![0; b - a];
                fill(k, a as u32, &mut part);
                assert_eq!(part, all[a..b], "fill {a}..{b}");
                assert!(verify(k, a as u32, &all[a..b]), "verify {a}..{b}");
            }
        }
    }

    #[test]
    fn every_single_flip_is_caught() {
        let k = key(1, 1);
        let all = whole(k, 77);
        for i in 0..all.len() {
            for bit in 0..8 {
                let mut bad = all.clone();
                bad[i] ^= 1 << bit;
                assert!(!verify(k, 0, &bad), "flip of bit {bit} at {i}");
                if i >= 3 {
                    assert!(!verify(k, 3, &bad[3..]), "flip at {i} seen from offset 3");
                }
            }
        }
    }

    #[test]
    fn shifted_or_foreign_bytes_are_caught() {
        let k = key(3, 9);
        let all = whole(k, 64);
        assert!(!verify(k, 0, &all[1..]), "a dropped first byte");
        assert!(!verify(k, 1, &all[..63]), "a repeated byte");
        assert!(!verify(key(3, 10), 0, &all), "the previous message's bytes");
        assert!(!verify(key(4, 9), 0, &all), "another connection's bytes");
    }

    #[test]
    fn a_key_tells_its_connection_and_sequence_number() {
        for (g, s) in [
            (0, 0),
            (1, 0),
            (0, 1),
            (77, 123_456),
            ((1 << 24) - 1, (1 << 40) - 1),
        ] {
            assert_eq!(unkey(key(g, s)), (g, s));
        }
        let mut m = whole(key(5, 9), 8);
        assert_eq!(
            unkey(u64::from_le_bytes(m[..8].try_into().unwrap())),
            (5, 9)
        );
        m[0] ^= 1;
        assert_ne!(
            unkey(u64::from_le_bytes(m[..8].try_into().unwrap())),
            (5, 9)
        );
    }

    #[test]
    fn keys_are_distinct_across_connections_and_sequences() {
        let mut seen = std::collections::HashSet::new();
        for g in 0..64 {
            for s in 0..1000 {
                assert!(seen.insert(key(g, s)), "key repeated at {g}/{s}");
            }
        }
    }
}
