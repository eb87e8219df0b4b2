//! Utilities for echoport's tests and benchmark scripts: clients that do one hard thing each
//! (hold very many connections, ...). Nothing here ships in the `echoport` binary.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod child;
pub mod proxy;

pub use echoport_core::sources::parse_sources;
