//! Choosing and opening the I/O backend on Windows: I/O completion ports.
//!
//! The Windows counterpart of `backends.rs`, with the same names so that `echoport serve`
//! reads the same on every platform; Linux's io_uring and epoll do not exist here.

use anyhow::{Context, bail};

use crate::serve::BackendChoice;

/// A backend that can be opened on this platform.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Windows I/O completion ports.
    Iocp,
}

/// The decision taken at start-up, shared by every thread.
#[derive(Clone, Debug)]
pub struct Chosen {
    /// The backend to open.
    pub kind: Kind,
    /// Why `auto` did not choose io_uring (always: there is none on Windows; not logged).
    pub fallback: Option<String>,
}

/// Backend settings from the command line.
#[derive(Clone, Debug)]
pub struct Options {
    /// Each thread's buffer pool.
    pub pool: echoport_io::pool::PoolConfig,
}

impl Options {
    /// From `echoport serve`'s flags (the io_uring-only ones mean nothing here).
    pub fn from_serve(a: &crate::serve::Args) -> Options {
        Options {
            pool: echoport_io::pool::PoolConfig {
                buf_size: a.buf_size,
                buffers: a.buffers,
                ..Default::default()
            },
        }
    }

    fn iocp(&self) -> echoport_io::iocp::Config {
        echoport_io::iocp::Config {
            pool: self.pool,
            ..Default::default()
        }
    }
}

/// An opened backend of any kind (boxed: moved once, into its worker).
pub enum AnyBackend {
    /// I/O completion port.
    Iocp(Box<echoport_io::iocp::Iocp>),
}

/// Decides the backend once, before the threads start: `auto` is IOCP on Windows.
pub fn choose(choice: BackendChoice, _opts: &Options) -> anyhow::Result<Chosen> {
    match choice {
        BackendChoice::Auto | BackendChoice::Iocp => Ok(Chosen {
            kind: Kind::Iocp,
            fallback: None,
        }),
        BackendChoice::IoUring | BackendChoice::Epoll => {
            bail!("--backend {choice:?} is Linux-only; on Windows use --backend iocp (or auto)")
        }
    }
}

/// Opens a backend of the chosen kind on the calling thread.
pub fn open(chosen: &Chosen, opts: &Options) -> anyhow::Result<AnyBackend> {
    match chosen.kind {
        Kind::Iocp => Ok(AnyBackend::Iocp(Box::new(
            echoport_io::iocp::Iocp::new(&opts.iocp()).context("setting up a completion port")?,
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_means_iocp_and_linux_backends_are_refused() {
        let opts = Options {
            pool: echoport_io::pool::PoolConfig {
                buf_size: 4096,
                buffers: 16,
                send_buffers: 16,
            },
        };
        assert_eq!(choose(BackendChoice::Auto, &opts).unwrap().kind, Kind::Iocp);
        assert_eq!(choose(BackendChoice::Iocp, &opts).unwrap().kind, Kind::Iocp);
        let err = choose(BackendChoice::Epoll, &opts).unwrap_err().to_string();
        assert!(err.contains("Linux-only"), "{err}");
        assert!(choose(BackendChoice::IoUring, &opts).is_err());
        let c = choose(BackendChoice::Auto, &opts).unwrap();
        assert!(matches!(open(&c, &opts).unwrap(), AnyBackend::Iocp(_)));
    }
}
