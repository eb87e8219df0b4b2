//! Starting an event-loop thread, the one way `serve` and `bench` both do it: named, pinned
//! when asked, its backend opened on the thread that will drive it (an io_uring ring belongs
//! to the thread that made it), and a failure to pin or open told to whoever waits for the
//! thread to be ready.

use std::thread::JoinHandle;

use anyhow::Context;

use crate::backends::{AnyBackend, Chosen, Options};

/// Spawns thread `name`: pins it to `cpu` (when given), opens a backend of `chosen` with
/// `opts`, and hands it to `run`. If pinning or opening fails, `failed` gets the error's
/// text (so the caller's ready channel hears of it) and the thread returns the error.
pub fn spawn_loop<T: Send + 'static>(
    name: String,
    cpu: Option<usize>,
    chosen: Chosen,
    opts: Options,
    failed: impl FnOnce(String) + Send + 'static,
    run: impl FnOnce(AnyBackend) -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<JoinHandle<anyhow::Result<T>>> {
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            let pinned = cpu.map_or(Ok(()), |c| {
                echoport_io::sys::pin_to_cpu(c).with_context(|| format!("pinning to CPU {c}"))
            });
            match pinned.and_then(|()| crate::backends::open(&chosen, &opts)) {
                Ok(backend) => run(backend),
                Err(e) => {
                    failed(format!("{e:#}"));
                    Err(e)
                }
            }
        })
        .with_context(|| format!("spawning thread {name}"))
}
