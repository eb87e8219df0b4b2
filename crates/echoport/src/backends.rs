//! Choosing and opening the I/O backend: io_uring when the kernel allows it, epoll otherwise.

use anyhow::bail;

use crate::serve::BackendChoice;

/// A backend that can be opened on this platform.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Linux io_uring.
    Uring,
}

/// Backend settings from the command line.
#[derive(Clone, Debug)]
pub struct Options {
    /// Receive buffer size.
    pub buf_size: u32,
    /// Receive buffers per thread.
    pub buffers: u32,
    /// io_uring fast path (multishot, buffer ring, direct descriptors).
    pub fast_path: bool,
    /// io_uring completion queue size.
    pub cq_entries: u32,
    /// io_uring batched wait, in microseconds (0: off).
    pub batch_wait_us: u32,
    /// io_uring: accept into direct descriptors (off when peers' addresses are needed).
    pub direct_accept: bool,
    /// io_uring task-running mode.
    pub taskrun: echoport_io::uring::TaskRun,
}

impl Options {
    /// From `echoport serve`'s flags.
    pub fn from_serve(a: &crate::serve::Args) -> Options {
        Options {
            buf_size: a.buf_size,
            buffers: a.buffers,
            fast_path: !a.no_fast_path,
            cq_entries: a.cq_entries,
            batch_wait_us: a.batch_wait_us,
            direct_accept: a.max_connections_per_ip.is_none(),
            taskrun: match a.taskrun {
                crate::serve::TaskRunChoice::Defer => echoport_io::uring::TaskRun::Defer,
                crate::serve::TaskRunChoice::Coop => echoport_io::uring::TaskRun::Coop,
                crate::serve::TaskRunChoice::Interrupt => echoport_io::uring::TaskRun::Interrupt,
            },
        }
    }

    fn uring(&self) -> echoport_io::uring::Config {
        echoport_io::uring::Config {
            buf_size: self.buf_size,
            buffers: self.buffers,
            fast_path: self.fast_path,
            cq_entries: self.cq_entries.max(1),
            sq_entries: 4096.min(self.cq_entries.max(1)),
            batch_wait_us: self.batch_wait_us,
            direct_accept: self.direct_accept,
            taskrun: self.taskrun,
            ..Default::default()
        }
    }
}

/// An opened backend of any kind.
pub enum AnyBackend {
    /// io_uring.
    Uring(echoport_io::uring::Uring),
}

/// Decides the backend once, before the threads start, logging why when `auto` falls back.
pub fn choose(args: &crate::serve::Args) -> anyhow::Result<Kind> {
    match args.backend {
        BackendChoice::Auto | BackendChoice::IoUring => match echoport_io::uring::probe() {
            Ok(()) => Ok(Kind::Uring),
            Err(e) => bail!("io_uring is not usable here: {e}"),
        },
        BackendChoice::Epoll => bail!("the epoll backend is not built yet"),
    }
}

/// Opens a backend of the chosen kind on the calling thread.
pub fn open(kind: Kind, opts: &Options) -> anyhow::Result<AnyBackend> {
    match kind {
        Kind::Uring => Ok(AnyBackend::Uring(echoport_io::uring::Uring::new(
            &opts.uring(),
        )?)),
    }
}
