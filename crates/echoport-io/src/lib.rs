//! Completion backends for echoport, and the little OS glue they share.
//!
//! Each backend lives in its own module and implements [`echoport_core::Backend`]:
//! - [`uring`]: Linux io_uring, the completion port of Linux (multishot accept and receive,
//!   provided buffer rings, direct descriptors, deferred task running);
//! - [`epoll`]: Linux readiness, turned into completions, for where io_uring is refused;
//! - `iocp`: Windows I/O completion ports, the original's own (built on Windows only).
//!
//! `unsafe` code of the project lives here, and only here; every block says why it is sound.
#![warn(missing_docs)]

#[cfg(target_os = "linux")]
pub mod epoll;
#[cfg(windows)]
pub mod iocp;
#[cfg(any(target_os = "linux", windows))]
pub mod pool;
#[cfg(any(target_os = "linux", windows))]
mod region;
#[cfg(unix)]
pub mod sys;
#[cfg(windows)]
#[path = "sys_windows.rs"]
pub mod sys;
#[cfg(target_os = "linux")]
pub mod uring;
