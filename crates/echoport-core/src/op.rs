//! Operations posted to a backend and the completions it reports back.
//!
//! The echo logic speaks only this vocabulary. A completion backend (io_uring, IOCP) maps an
//! [`Op`] to one submission; a readiness backend (epoll) performs it when the socket is ready
//! and reports the same [`Completion`]. Buffers belong to the backend: the state machine only
//! ever holds a [`BufId`] and hands it back with [`crate::Submit::release`] once the echo of
//! its bytes has been sent.

use std::fmt;

use crate::token::{OpKind, Token};

/// A socket as the backend names it (a file descriptor, an io_uring direct descriptor, a
/// Windows `SOCKET`). Opaque to the state machine, which never closes it itself.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Socket(pub u64);

/// A buffer owned by the backend, lent to the state machine between a receive completion and
/// [`crate::Submit::release`].
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct BufId(pub u32);

/// Most buffers one gathered send ([`Op::SendParts`]) carries.
pub const MAX_SEND_PARTS: usize = 8;

/// One piece of a gathered send: `len` bytes of buffer `buf`, starting at `off`.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct SendPart {
    /// The buffer holding the bytes.
    pub buf: BufId,
    /// Offset of the first byte to send.
    pub off: u32,
    /// Number of bytes to send.
    pub len: u32,
}

impl Default for BufId {
    fn default() -> Self {
        BufId(u32::MAX)
    }
}

/// A listening socket registered with a backend.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct ListenerId(pub u32);

/// An operation posted to a backend. Each one that names a connection produces completions
/// tagged with its token; cancellations, shutdowns and closes report nothing back.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Accept connections on a listener until an error or cancellation ends the operation
    /// (multishot where the backend can, otherwise one accept per post).
    Accept {
        /// The listener to accept on.
        listener: ListenerId,
    },
    /// Stop accepting and close the listener.
    CloseListener {
        /// The listener to close.
        listener: ListenerId,
    },
    /// Receive into backend buffers until an error, end of stream, cancellation or `max`
    /// bytes end the operation (multishot where the backend can, otherwise one receive per
    /// post).
    Recv {
        /// The connection.
        token: Token,
        /// Its socket.
        sock: Socket,
        /// The connection's budget: the operation ends (`more == false`) once it has
        /// delivered this many bytes, so a multishot receive cannot run past the
        /// connection's buffer budget while its cancellation is on the way. A backend may
        /// overshoot by at most one buffer (the kernel fills the buffer it picked).
        /// [`u32::MAX`] (or anything above `i32::MAX`): no limit.
        max: u32,
    },
    /// Send `len` bytes of buffer `buf`, starting at `off`. At most one per connection.
    Send {
        /// The connection.
        token: Token,
        /// Its socket.
        sock: Socket,
        /// The buffer holding the bytes (received earlier, or filled by a client).
        buf: BufId,
        /// Offset of the first byte to send.
        off: u32,
        /// Number of bytes to send.
        len: u32,
    },
    /// Send the first `count` of `parts`, in order, as one operation (a gathered send, as
    /// `sendmsg` with several buffers), completing with [`Completion::Send`] and the bytes
    /// sent in all. Posted only to a backend whose [`crate::Submit::max_send_parts`] is more
    /// than one; at most one send of either kind per connection.
    SendParts {
        /// The connection.
        token: Token,
        /// Its socket.
        sock: Socket,
        /// The pieces, in the order their bytes go out; only the first `count` count.
        parts: [SendPart; MAX_SEND_PARTS],
        /// How many of `parts` to send (2 to [`MAX_SEND_PARTS`]).
        count: u8,
    },
    /// Cancel the connection's pending receive; it completes with [`OpError::Canceled`] (or
    /// with whatever it completed with first).
    CancelRecv {
        /// The connection.
        token: Token,
        /// Its socket.
        sock: Socket,
    },
    /// Cancel the connection's pending send.
    CancelSend {
        /// The connection.
        token: Token,
        /// Its socket.
        sock: Socket,
    },
    /// Shut down the sending side of the connection (the peer reads end of stream).
    Shutdown {
        /// The connection.
        token: Token,
        /// Its socket.
        sock: Socket,
    },
    /// Close the socket. Posted only when no operation of the connection is pending.
    Close {
        /// The connection (or [`Token::NONE`] for a socket refused at accept).
        token: Token,
        /// The socket to close.
        sock: Socket,
    },
}

/// A backend's posting side: one method per kind of operation, each owning one step (as the
/// original flow's `PostAccept`, `PostRecv`, `PostSend`). [`Op::post_to`] is the one place an
/// [`Op`] is taken apart; a backend's [`crate::Submit::push`] is `op.post_to(self)`.
pub trait Post {
    /// [`Op::Accept`].
    fn post_accept(&mut self, listener: ListenerId);
    /// [`Op::CloseListener`].
    fn post_close_listener(&mut self, listener: ListenerId);
    /// [`Op::Recv`].
    fn post_recv(&mut self, token: Token, sock: Socket, max: u32);
    /// [`Op::Send`] (one part) and [`Op::SendParts`] (1 to [`MAX_SEND_PARTS`] parts).
    fn post_send(&mut self, token: Token, sock: Socket, parts: &[SendPart]);
    /// [`Op::CancelRecv`] (`kind` [`OpKind::Recv`]) and [`Op::CancelSend`] ([`OpKind::Send`]).
    fn post_cancel(&mut self, token: Token, sock: Socket, kind: OpKind);
    /// [`Op::Shutdown`].
    fn post_shutdown(&mut self, token: Token, sock: Socket);
    /// [`Op::Close`].
    fn post_close(&mut self, token: Token, sock: Socket);
}

impl Op {
    /// Hands the operation to the method of `p` that posts it.
    pub fn post_to<P: Post + ?Sized>(self, p: &mut P) {
        match self {
            Op::Accept { listener } => p.post_accept(listener),
            Op::CloseListener { listener } => p.post_close_listener(listener),
            Op::Recv { token, sock, max } => p.post_recv(token, sock, max),
            Op::Send {
                token,
                sock,
                buf,
                off,
                len,
            } => p.post_send(token, sock, &[SendPart { buf, off, len }]),
            Op::SendParts {
                token,
                sock,
                parts,
                count,
            } => p.post_send(
                token,
                sock,
                &parts[..(count as usize).clamp(1, MAX_SEND_PARTS)],
            ),
            Op::CancelRecv { token, sock } => p.post_cancel(token, sock, OpKind::Recv),
            Op::CancelSend { token, sock } => p.post_cancel(token, sock, OpKind::Send),
            Op::Shutdown { token, sock } => p.post_shutdown(token, sock),
            Op::Close { token, sock } => p.post_close(token, sock),
        }
    }
}

/// What a receive delivered.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Received {
    /// `len` bytes (at least one) at the start of buffer `buf`, now lent to the receiver.
    Data {
        /// The buffer.
        buf: BufId,
        /// Number of bytes received.
        len: u32,
    },
    /// The peer shut down its sending side: no more bytes will come.
    Eof,
}

/// Why an operation failed, in the few kinds the echo logic tells apart.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum OpError {
    /// The operation was cancelled on request.
    Canceled,
    /// No buffer was free to receive into (io_uring's `-ENOBUFS`); retry when buffers return.
    NoBuffers,
    /// The process or the ring ran out of descriptors (EMFILE, ENFILE, a full direct table).
    TooManyFiles,
    /// Any other error, as the operating system's error code.
    Os(i32),
}

impl fmt::Display for OpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpError::Canceled => f.write_str("operation cancelled"),
            OpError::NoBuffers => f.write_str("no receive buffer free"),
            OpError::TooManyFiles => f.write_str("too many open files"),
            OpError::Os(code) => write!(f, "{}", std::io::Error::from_raw_os_error(*code)),
        }
    }
}

impl std::error::Error for OpError {}

/// A finished (or progressing) operation, as reaped from the backend.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Completion {
    /// An accept finished. `more` says whether the accept stays posted.
    Accept {
        /// The listener.
        listener: ListenerId,
        /// The new connection's socket, or why none came.
        result: Result<Socket, OpError>,
        /// True while the operation stays posted (multishot). An error always ends it.
        more: bool,
    },
    /// A receive delivered data, end of stream or an error. `more` says whether it stays posted.
    Recv {
        /// The connection.
        token: Token,
        /// What was received.
        result: Result<Received, OpError>,
        /// True while the operation stays posted (multishot). End of stream and errors end it.
        more: bool,
    },
    /// A send finished, having sent `n` bytes (possibly fewer than asked: a short send).
    Send {
        /// The connection.
        token: Token,
        /// Bytes sent, or why the send failed.
        result: Result<u32, OpError>,
    },
    /// The loop was woken from outside (a signal, a stop request).
    Wake,
}
