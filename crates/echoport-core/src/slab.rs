//! A slab of connection slots with generations, so that ids can be reused safely.

use crate::token::{GEN_MASK, Token};

enum Entry<T> {
    Occupied { generation: u32, value: T },
    Vacant { generation: u32, next: u32 },
}

const NIL: u32 = u32::MAX;

/// Fixed-cost storage for connection state, addressed by [`Token`].
///
/// Inserting returns a token whose generation differs from every earlier tenant of the same
/// slot (until the 24-bit generation wraps), so stale completions miss.
pub struct Slab<T> {
    /// Every slot, occupied or vacant, each with its current generation.
    entries: Vec<Entry<T>>,
    /// The first vacant slot (a list through `Entry::Vacant::next`; `NIL`: none).
    free: u32,
    /// Occupied slots.
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab::new()
    }
}

impl<T> Slab<T> {
    /// An empty slab.
    pub fn new() -> Slab<T> {
        Slab {
            entries: Vec::new(),
            free: NIL,
            len: 0,
        }
    }

    /// An empty slab with room for `n` entries before it reallocates.
    pub fn with_capacity(n: usize) -> Slab<T> {
        Slab {
            entries: Vec::with_capacity(n),
            free: NIL,
            len: 0,
        }
    }

    /// Number of occupied slots.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no slot is occupied.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Stores a value built from its own token and returns that token.
    pub fn insert_with(&mut self, make: impl FnOnce(Token) -> T) -> Token {
        self.len += 1;
        if self.free != NIL {
            let id = self.free;
            let slot = &mut self.entries[id as usize];
            let Entry::Vacant { generation, next } = *slot else {
                unreachable!("free list points at an occupied slot")
            };
            let token = Token::new(id, generation);
            self.free = next;
            *slot = Entry::Occupied {
                generation,
                value: make(token),
            };
            token
        } else {
            let id = self.entries.len() as u32;
            assert!(id != NIL, "slab full");
            let token = Token::new(id, 0);
            self.entries.push(Entry::Occupied {
                generation: 0,
                value: make(token),
            });
            token
        }
    }

    /// The value for `token`, if that incarnation is still alive.
    pub fn get_mut(&mut self, token: Token) -> Option<&mut T> {
        match self.entries.get_mut(token.id as usize) {
            Some(Entry::Occupied { generation, value }) if *generation == token.generation => {
                Some(value)
            }
            _ => None,
        }
    }

    /// Removes and returns the value for `token`; the slot's generation moves on.
    pub fn remove(&mut self, token: Token) -> Option<T> {
        let slot = self.entries.get_mut(token.id as usize)?;
        match slot {
            Entry::Occupied { generation, .. } if *generation == token.generation => {
                let next_generation = (*generation + 1) & GEN_MASK;
                let old = std::mem::replace(
                    slot,
                    Entry::Vacant {
                        generation: next_generation,
                        next: self.free,
                    },
                );
                self.free = token.id;
                self.len -= 1;
                match old {
                    Entry::Occupied { value, .. } => Some(value),
                    Entry::Vacant { .. } => unreachable!(),
                }
            }
            _ => None,
        }
    }

    /// Tokens of every live value (a snapshot, for shutdown sweeps and timers).
    pub fn tokens(&self) -> Vec<Token> {
        self.entries
            .iter()
            .enumerate()
            .filter_map(|(id, e)| match e {
                Entry::Occupied { generation, .. } => Some(Token::new(id as u32, *generation)),
                Entry::Vacant { .. } => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reused_slot_gets_new_generation_and_old_token_misses() {
        let mut s = Slab::new();
        let a = s.insert_with(|_| "a");
        assert_eq!(s.remove(a), Some("a"));
        let b = s.insert_with(|_| "b");
        assert_eq!(a.id, b.id, "slot is reused");
        assert_ne!(a.generation, b.generation, "generation moved on");
        assert!(s.get_mut(a).is_none());
        assert!(
            s.remove(a).is_none(),
            "a stale token cannot free the new tenant"
        );
        assert_eq!(s.get_mut(b), Some(&mut "b"));
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn tokens_lists_live_entries() {
        let mut s = Slab::new();
        let t: Vec<_> = (0..5).map(|i| s.insert_with(|_| i)).collect();
        s.remove(t[2]);
        assert_eq!(s.tokens(), vec![t[0], t[1], t[3], t[4]]);
    }
}
