//! Choosing and opening the I/O backend on Windows: I/O completion ports.
//!
//! The Windows counterpart of `backends.rs` (same names, so `echoport serve` reads the same on
//! every platform); Linux's io_uring and epoll are not available here.

use anyhow::bail;

use crate::serve::BackendChoice;

/// A backend that can be opened on this platform.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Windows I/O completion ports.
    Iocp,
}

/// Backend settings from the command line.
#[derive(Clone, Debug)]
pub struct Options {
    /// Receive buffer size.
    pub buf_size: u32,
    /// Receive buffers per thread.
    pub buffers: u32,
}

impl Options {
    /// From `echoport serve`'s flags.
    pub fn from_serve(a: &crate::serve::Args) -> Options {
        Options {
            buf_size: a.buf_size,
            buffers: a.buffers,
        }
    }

    fn iocp(&self) -> echoport_io::iocp::Config {
        echoport_io::iocp::Config {
            buf_size: self.buf_size,
            buffers: self.buffers,
            ..Default::default()
        }
    }
}

/// An opened backend of any kind.
pub enum AnyBackend {
    /// I/O completion port.
    Iocp(echoport_io::iocp::Iocp),
}

/// Decides the backend once, before the threads start.
pub fn choose(args: &crate::serve::Args) -> anyhow::Result<Kind> {
    match args.backend {
        BackendChoice::Auto | BackendChoice::Iocp => Ok(Kind::Iocp),
        BackendChoice::IoUring | BackendChoice::Epoll => {
            bail!(
                "the {:?} backend is Linux-only; on Windows use --backend iocp (or auto)",
                args.backend
            )
        }
    }
}

/// Opens a backend of the chosen kind on the calling thread.
pub fn open(kind: Kind, opts: &Options) -> anyhow::Result<AnyBackend> {
    match kind {
        Kind::Iocp => Ok(AnyBackend::Iocp(echoport_io::iocp::Iocp::new(
            &opts.iocp(),
        )?)),
    }
}
