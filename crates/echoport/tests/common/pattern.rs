//! Tagged byte streams: every byte a client sends says whose it is and where it belongs.
//!
//! Client `id` sends a stream of 16-byte records; record `r` is
//! `[id: u32 LE][r: u32 LE][mix(salt, id, r): u64 LE]`. The receiver checks every byte it
//! reads against the stream it sent. When bytes differ, [`identify`] looks for a whole record
//! in what arrived: if it finds one, the bytes came from another client's stream (cross-talk
//! between connections), and the message says whose and from which offset.

use super::rng::mix64;

/// The stream one client sends.
#[derive(Copy, Clone, Debug)]
pub struct Pattern {
    pub id: u32,
    salt: u64,
}

impl Pattern {
    pub fn new(id: u32, salt: u64) -> Pattern {
        Pattern { id, salt }
    }

    fn record(&self, r: u64) -> [u8; 16] {
        record(self.salt, self.id, r)
    }

    /// Writes the stream's bytes `pos..pos + buf.len()` into `buf`.
    pub fn fill(&self, pos: u64, buf: &mut [u8]) {
        let mut i = 0;
        while i < buf.len() {
            let p = pos + i as u64;
            let (r, off) = (p / 16, (p % 16) as usize);
            let rec = self.record(r);
            let n = (16 - off).min(buf.len() - i);
            buf[i..i + n].copy_from_slice(&rec[off..off + n]);
            i += n;
        }
    }

    /// The stream's bytes `pos..pos + len`.
    pub fn bytes(&self, pos: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.fill(pos, &mut v);
        v
    }

    /// Checks that `got` is exactly the stream's bytes from `pos` on.
    pub fn check(&self, pos: u64, got: &[u8]) -> Result<(), String> {
        let want = self.bytes(pos, got.len());
        let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) else {
            return Ok(());
        };
        // Look at a window around the first difference, whole records included.
        let from = i.saturating_sub(15);
        let to = (i + 48).min(got.len());
        let whose = match identify(self.salt, &got[from..to]) {
            // Stream offset, in the stream they came from, of the first differing byte.
            Some((id, off)) if id == self.id => format!(
                "they are this client's own bytes from stream offset {} (bytes lost, repeated \
                 or reordered)",
                off.wrapping_add((i - from) as u64)
            ),
            Some((id, off)) => format!(
                "CROSS-TALK: they are client {id}'s bytes (its stream offset {}), not ours",
                off.wrapping_add((i - from) as u64)
            ),
            None => "they match no client's stream".to_string(),
        };
        Err(format!(
            "client {}: echo differs at stream offset {}: want {:02x?}, got {:02x?}; {whose}",
            self.id,
            pos + i as u64,
            &want[i..(i + 16).min(got.len())],
            &got[i..(i + 16).min(got.len())],
        ))
    }
}

fn record(salt: u64, id: u32, r: u64) -> [u8; 16] {
    let mut rec = [0u8; 16];
    rec[..4].copy_from_slice(&id.to_le_bytes());
    rec[4..8].copy_from_slice(&(r as u32).to_le_bytes());
    let m = mix64(salt ^ mix64(((id as u64) << 32) ^ r));
    rec[8..].copy_from_slice(&m.to_le_bytes());
    rec
}

/// Finds a whole record in `data`: returns whose stream it is and the stream offset of
/// `data[0]` in it.
pub fn identify(salt: u64, data: &[u8]) -> Option<(u32, u64)> {
    for a in 0..data.len().saturating_sub(15) {
        let rec = &data[a..a + 16];
        let id = u32::from_le_bytes(rec[..4].try_into().unwrap());
        let r = u32::from_le_bytes(rec[4..8].try_into().unwrap()) as u64;
        if record(salt, id, r) == rec {
            return Some((id, (r * 16).wrapping_sub(a as u64)));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_talk_is_named() {
        let (a, b) = (Pattern::new(1, 99), Pattern::new(2, 99));
        assert!(a.check(5, &a.bytes(5, 100)).is_ok());
        let mut got = a.bytes(40, 64);
        got[20..].copy_from_slice(&b.bytes(1000, 44));
        let err = a.check(40, &got).unwrap_err();
        assert!(
            err.contains("CROSS-TALK") && err.contains("client 2"),
            "{err}"
        );
        assert!(err.contains("stream offset 1000"), "{err}");
    }
}
