//! The backend-neutral heart of echoport.
//!
//! This crate owns everything that does not touch the operating system: the vocabulary of
//! posted [`Op`]erations and reaped [`Completion`]s (the io_uring SQE/CQE, or IOCP's posted
//! `OVERLAPPED` and `GetQueuedCompletionStatus`), the [`Token`] that ties a completion back to
//! one incarnation of one connection, the per-connection echo state machine ([`conn::Conn`]),
//! and the event loop that drives it over any [`Backend`] ([`worker::Worker`]).
//!
//! Nothing here is `unsafe`, and everything here can be tested with a scripted fake backend.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[macro_use]
mod counters;

pub mod admission;
pub mod backend;
pub mod conn;
pub mod live;
pub mod moderation;
pub mod op;
pub mod proxy;
pub mod slab;
pub mod sources;
pub mod stats;
pub mod testing;
pub mod token;
pub mod udp;
pub mod wheel;
pub mod worker;

pub use backend::{Backend, Submit, Waker};
pub use op::{
    BufId, Completion, ListenerId, MAX_SEND_PARTS, Op, OpError, Post, Received, SendPart, Socket,
};
pub use token::{OpKind, Token};
