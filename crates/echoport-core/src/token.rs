//! Tokens: which connection, and which incarnation of it, a completion belongs to.
//!
//! A connection slot is reused after its connection closes, so a completion that arrives late
//! (a cancelled receive, a close racing a reset) must not be applied to the slot's next tenant.
//! A [`Token`] therefore carries the slot id *and* a generation that changes on every reuse.
//! Backends pack a token and an [`OpKind`] into the 64-bit `user_data` of an io_uring entry or
//! the completion key of an IOCP packet; never a bare file descriptor.

/// Identifies one connection: its slot in the slab and the generation of that slot.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Token {
    /// Index of the connection's slot.
    pub id: u32,
    /// Generation of the slot when the connection was created (24 bits are significant).
    pub generation: u32,
}

/// Mask of the generation bits that survive packing into `user_data`.
pub const GEN_MASK: u32 = 0x00ff_ffff;

impl Token {
    /// A token that names no connection; completions carrying it are dropped.
    pub const NONE: Token = Token {
        id: u32::MAX,
        generation: GEN_MASK,
    };

    /// Creates a token; the generation is reduced to its significant bits.
    pub const fn new(id: u32, generation: u32) -> Token {
        Token {
            id,
            generation: generation & GEN_MASK,
        }
    }

    /// Packs the token and the kind of operation into one `user_data` word.
    pub const fn pack(self, kind: OpKind) -> u64 {
        ((kind as u64) << 56) | (((self.generation & GEN_MASK) as u64) << 32) | self.id as u64
    }

    /// Unpacks a `user_data` word made by [`Token::pack`]. Unknown kinds give `None`.
    pub fn unpack(user_data: u64) -> Option<(OpKind, Token)> {
        let kind = OpKind::from_u8((user_data >> 56) as u8)?;
        let generation = ((user_data >> 32) as u32) & GEN_MASK;
        Some((kind, Token::new(user_data as u32, generation)))
    }
}

/// The kind of a posted operation, as recorded in its `user_data`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum OpKind {
    /// Accept on a listener (the token's id is the listener id).
    Accept = 1,
    /// Receive on a connection.
    Recv = 2,
    /// Send on a connection.
    Send = 3,
    /// A cancellation request (its own completion carries no news for the state machine).
    Cancel = 4,
    /// Close of a socket.
    Close = 5,
    /// Shutdown of a socket's write side.
    Shutdown = 6,
    /// The loop's wake-up source (signals, other threads).
    Wake = 7,
}

impl OpKind {
    fn from_u8(v: u8) -> Option<OpKind> {
        Some(match v {
            1 => OpKind::Accept,
            2 => OpKind::Recv,
            3 => OpKind::Send,
            4 => OpKind::Cancel,
            5 => OpKind::Close,
            6 => OpKind::Shutdown,
            7 => OpKind::Wake,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_roundtrip_keeps_kind_id_and_generation() {
        let t = Token::new(123_456, 0x00ab_cdef);
        for kind in [OpKind::Accept, OpKind::Recv, OpKind::Send, OpKind::Wake] {
            assert_eq!(Token::unpack(t.pack(kind)), Some((kind, t)));
        }
        assert_eq!(
            Token::unpack(Token::NONE.pack(OpKind::Close)),
            Some((OpKind::Close, Token::NONE))
        );
    }

    #[test]
    fn generation_wraps_within_24_bits() {
        let t = Token::new(1, 0x0100_0001);
        assert_eq!(t.generation, 1);
        assert_eq!(Token::unpack(0), None);
    }
}
