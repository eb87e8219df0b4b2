//! Choosing and opening the I/O backend: io_uring when the kernel allows it, epoll otherwise.
//!
//! `--backend auto` probes io_uring once at start-up, with everything the server will use
//! (ring set-up with its flags, the opcodes, one no-op round trip, then a trial ring with the
//! real settings: direct descriptor table and buffer ring). **Any** failure, whatever its
//! error code (EPERM from a seccomp profile, ENOSYS from a kernel without io_uring,
//! EOPNOTSUPP, EINVAL from a sandbox, ENOMEM from a locked-memory limit...), falls back to
//! epoll and says why. Naming a backend is strict: it is used or the start fails.

use anyhow::{Context, anyhow};
use echoport_io::pool::PoolConfig;

use crate::serve::BackendChoice;

/// A backend that can be opened on this platform.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Linux io_uring.
    Uring,
    /// Linux epoll.
    Epoll,
}

/// The decision taken at start-up, shared by every thread.
#[derive(Clone, Debug)]
pub struct Chosen {
    /// The backend to open.
    pub kind: Kind,
    /// True when `auto` chose it: a thread whose io_uring fails to open falls back to epoll.
    pub auto: bool,
    /// Why `auto` did not choose io_uring.
    pub fallback: Option<String>,
}

/// Backend settings from the command line.
#[derive(Clone, Debug)]
pub struct Options {
    /// Each thread's buffer pool.
    pub pool: PoolConfig,
    /// io_uring fast path (multishot, buffer ring, direct descriptors).
    pub fast_path: bool,
    /// io_uring completion queue size.
    pub cq_entries: u32,
    /// io_uring batched wait, in microseconds (0: off).
    pub batch_wait_us: u32,
    /// io_uring adaptive moderation bound, in microseconds (0: off).
    pub max_added_latency_us: u32,
    /// io_uring: accept into direct descriptors (off when peers' addresses are needed).
    pub direct_accept: bool,
    /// io_uring: adopted streams become direct descriptors (a client holding more
    /// connections than `RLIMIT_NOFILE`; such a backend makes no accepts).
    pub direct_adopt: bool,
    /// io_uring task-running mode.
    pub taskrun: echoport_io::uring::TaskRun,
    /// io_uring: slots per direct-descriptor table (0: the descriptor limit).
    pub direct_files: u32,
    /// io_uring: most rings per worker (more direct-descriptor tables as they fill).
    pub max_rings: u32,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            pool: PoolConfig::default(),
            fast_path: true,
            cq_entries: 65536,
            batch_wait_us: 0,
            max_added_latency_us: 0,
            direct_accept: true,
            direct_adopt: false,
            taskrun: echoport_io::uring::TaskRun::Defer,
            direct_files: 0,
            max_rings: 1,
        }
    }
}

impl Options {
    /// From `echoport serve`'s flags.
    pub fn from_serve(a: &crate::serve::Args) -> Options {
        Options {
            pool: PoolConfig {
                buf_size: a.buf_size,
                buffers: a.buffers,
                ..PoolConfig::default()
            },
            fast_path: !a.no_fast_path,
            cq_entries: a.cq_entries,
            batch_wait_us: a.batch_wait_us,
            max_added_latency_us: a.max_added_latency_us,
            // Peers' addresses are needed (plain descriptors) to limit per IP and to check
            // --proxy-from.
            direct_accept: a.max_connections_per_ip.is_none() && !a.proxy_protocol,
            direct_adopt: false,
            taskrun: match a.taskrun {
                crate::serve::TaskRunChoice::Defer => echoport_io::uring::TaskRun::Defer,
                crate::serve::TaskRunChoice::Coop => echoport_io::uring::TaskRun::Coop,
                crate::serve::TaskRunChoice::Interrupt => echoport_io::uring::TaskRun::Interrupt,
            },
            direct_files: 0,
            max_rings: 1,
        }
    }

    fn uring(&self) -> echoport_io::uring::Config {
        echoport_io::uring::Config {
            pool: self.pool,
            fast_path: self.fast_path,
            cq_entries: self.cq_entries.max(1),
            sq_entries: 4096.min(self.cq_entries.max(1)),
            batch_wait_us: self.batch_wait_us,
            max_added_latency_us: self.max_added_latency_us,
            direct_accept: self.direct_accept,
            direct_adopt: self.direct_adopt,
            taskrun: self.taskrun,
            direct_files: self.direct_files,
            max_rings: self.max_rings,
            ..Default::default()
        }
    }

    fn epoll(&self) -> echoport_io::epoll::Config {
        echoport_io::epoll::Config {
            pool: self.pool,
            ..Default::default()
        }
    }
}

/// An opened backend of any kind (boxed: moved once, into its worker).
pub enum AnyBackend {
    /// io_uring.
    Uring(Box<echoport_io::uring::Uring>),
    /// epoll.
    Epoll(Box<echoport_io::epoll::Epoll>),
}

/// Checks that io_uring works here with everything a worker will use: the probe (set-up,
/// opcodes, a no-op round trip), then one ring built with the real settings and dropped.
pub fn probe_uring(opts: &Options) -> Result<(), String> {
    echoport_io::uring::probe().map_err(|why| match io_uring_disabled() {
        Some(v) => format!("{why}; the kernel.io_uring_disabled sysctl is {v}"),
        None => why,
    })?;
    let trial = echoport_io::uring::Config {
        // The buffer count does not change what the kernel is asked; keep the trial small.
        pool: PoolConfig {
            buffers: 8,
            send_buffers: 1,
            ..opts.pool
        },
        ..opts.uring()
    };
    echoport_io::uring::Uring::new(&trial)
        .map(drop)
        .map_err(|e| format!("setting up a ring failed: {e}"))
}

/// The `kernel.io_uring_disabled` sysctl when it is set (1: only a privileged group may use
/// io_uring, 2: nobody may), the first thing to look at when set-up is refused.
fn io_uring_disabled() -> Option<String> {
    let v = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").ok()?;
    let v = v.trim();
    (v != "0").then(|| v.to_string())
}

/// Decides the backend once, before the threads start, logging why when `auto` falls back.
pub fn choose(choice: BackendChoice, opts: &Options) -> anyhow::Result<Chosen> {
    choose_with(choice, || probe_uring(opts))
}

fn choose_with(
    choice: BackendChoice,
    probe: impl FnOnce() -> Result<(), String>,
) -> anyhow::Result<Chosen> {
    Ok(match choice {
        BackendChoice::Auto => match probe() {
            Ok(()) => Chosen {
                kind: Kind::Uring,
                auto: true,
                fallback: None,
            },
            Err(why) => {
                tracing::warn!("io_uring is not available ({why}); falling back to epoll");
                Chosen {
                    kind: Kind::Epoll,
                    auto: true,
                    fallback: Some(why),
                }
            }
        },
        BackendChoice::IoUring => {
            probe().map_err(|why| {
                anyhow!(
                    "--backend io-uring: io_uring is not usable here: {why} \
                     (use --backend auto to fall back to epoll, or --backend epoll)"
                )
            })?;
            Chosen {
                kind: Kind::Uring,
                auto: false,
                fallback: None,
            }
        }
        BackendChoice::Epoll => Chosen {
            kind: Kind::Epoll,
            auto: false,
            fallback: None,
        },
    })
}

/// Opens a backend of the chosen kind on the calling thread. Under `auto`, a ring that fails
/// to open after the probe passed (a locked-memory limit reached by the Nth ring, say) gives
/// this thread an epoll loop instead, with a warning.
pub fn open(chosen: &Chosen, opts: &Options) -> anyhow::Result<AnyBackend> {
    let epoll = || -> anyhow::Result<AnyBackend> {
        Ok(AnyBackend::Epoll(Box::new(
            echoport_io::epoll::Epoll::new(&opts.epoll()).context("setting up epoll")?,
        )))
    };
    match chosen.kind {
        Kind::Uring => match echoport_io::uring::Uring::new(&opts.uring()) {
            Ok(u) => Ok(AnyBackend::Uring(Box::new(u))),
            Err(e) if chosen.auto => {
                tracing::warn!(
                    "io_uring ring set-up failed ({e}); this thread falls back to epoll"
                );
                epoll()
            }
            Err(e) => Err(anyhow::Error::new(e).context("setting up io_uring")),
        },
        Kind::Epoll => epoll(),
    }
}

/// Code that runs over whichever backend was opened, monomorphised for each kind (the
/// load generator's event loop). Adding a backend adds an arm to [`AnyBackend::run`] only.
pub trait WithBackend {
    /// What the code returns.
    type Output;
    /// Runs with the opened backend.
    fn run<B: echoport_core::Backend>(self, backend: B) -> Self::Output;
}

impl AnyBackend {
    /// Hands the backend, whatever its kind, to `f`.
    pub fn run<F: WithBackend>(self, f: F) -> F::Output {
        match self {
            AnyBackend::Uring(b) => f.run(*b),
            AnyBackend::Epoll(b) => f.run(*b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_falls_back_on_any_probe_failure() {
        for why in ["io_uring_setup failed: EPERM", "opcode probe failed", "x"] {
            let c = choose_with(BackendChoice::Auto, || Err(why.to_string())).unwrap();
            assert_eq!(c.kind, Kind::Epoll);
            assert_eq!(c.fallback.as_deref(), Some(why));
        }
        let c = choose_with(BackendChoice::Auto, || Ok(())).unwrap();
        assert_eq!((c.kind, c.fallback), (Kind::Uring, None));
    }

    #[test]
    fn an_explicit_choice_is_strict() {
        let err = choose_with(BackendChoice::IoUring, || {
            Err("io_uring_setup failed".into())
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("io_uring is not usable here: io_uring_setup failed"),
            "{err}"
        );
        let c = choose_with(BackendChoice::Epoll, || panic!("epoll must not probe")).unwrap();
        assert_eq!(c.kind, Kind::Epoll);
    }

    #[test]
    fn a_real_refusal_falls_back_to_a_working_epoll() {
        // The filter applies to this one thread only.
        std::thread::spawn(|| {
            echoport_io::sys::seccomp::Filter::refuse_io_uring(libc::ENOSYS)
                .install()
                .unwrap();
            let opts = Options {
                pool: PoolConfig {
                    buf_size: 4096,
                    buffers: 16,
                    send_buffers: 16,
                },
                fast_path: true,
                cq_entries: 4096,
                batch_wait_us: 0,
                max_added_latency_us: 0,
                direct_accept: true,
                taskrun: echoport_io::uring::TaskRun::Defer,
                ..Options::default()
            };
            let c = choose(BackendChoice::Auto, &opts).unwrap();
            assert_eq!(c.kind, Kind::Epoll);
            assert!(
                c.fallback
                    .as_deref()
                    .unwrap()
                    .contains("Function not implemented")
            );
            assert!(matches!(open(&c, &opts).unwrap(), AnyBackend::Epoll(_)));
            assert!(choose(BackendChoice::IoUring, &opts).is_err());
        })
        .join()
        .unwrap();
    }
}
