//! Completion backends for echoport, and the little OS glue they share.
//!
//! Each backend lives in its own module and implements [`echoport_core::Backend`]:
//! - [`uring`]: Linux io_uring, the completion port of Linux (multishot accept and receive,
//!   provided buffer rings, direct descriptors, deferred task running);
//! - [`epoll`]: Linux readiness, turned into completions, for where io_uring is refused;
//! - `iocp`: Windows I/O completion ports, the original's own (built on Windows only).
//!
//! Beside them, for the load generator's ticked loop: [`clock`] (a precise plain-timer
//! sleep) and [`rxstamp`] (receiving with the kernel's arrival time).
//!
//! `unsafe` code of the project lives here, and only here, in the modules that talk to the
//! kernel or own memory the kernel touches (each allowed below by name; the rest of the
//! crate denies it); every block says why it is sound, and the workspace lints enforce that.
#![warn(missing_docs)]
#![deny(unsafe_code)]

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub mod clock;
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub mod epoll;
#[cfg(windows)]
#[allow(unsafe_code)]
pub mod iocp;
#[cfg(any(target_os = "linux", windows))]
#[allow(unsafe_code)]
pub mod pool;
#[cfg(any(target_os = "linux", windows))]
#[allow(unsafe_code)]
mod region;
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub mod rxstamp;
#[cfg(unix)]
#[allow(unsafe_code)]
pub mod sys;
#[cfg(windows)]
#[path = "sys_windows.rs"]
#[allow(unsafe_code)]
pub mod sys;
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub mod uring;
