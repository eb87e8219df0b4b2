//! How the bench holds its connections: plain descriptors while they fit in this process's
//! descriptor table, io_uring direct descriptors beyond it.
//!
//! A process may open `RLIMIT_NOFILE` descriptors (raised here to the hard limit, as `serve`
//! does); 20,000 on many machines. More connections than that are held in io_uring rings'
//! direct-descriptor tables (`Config::direct_adopt`): the connector still connects each one
//! on a plain descriptor, the worker registers it in a table and closes the descriptor, and
//! the connector never has more than [`IN_HAND`] of them open at once. The ticked open loop
//! reads its kernel receive stamps from plain descriptors, so with direct ones it is off
//! (`--tick 0`: each echo is timed when its completion is reaped).

use anyhow::bail;

use super::args::Args;
use super::params::Params;
use crate::backends::{Chosen, Kind};

/// Descriptors kept for everything but connections: rings, eventfds, the listener of a
/// metrics client, files written (`--json`, `--hlog`, ...), the standard streams.
const RESERVE: u64 = 512;

/// Most connected plain descriptors the connector has handed out and the workers have not
/// yet adopted: what a client holding direct descriptors keeps open at once.
pub const IN_HAND: usize = 1024;

/// Raises the descriptor limit and decides whether the connections are held as direct
/// descriptors; errors name what to change when neither way can hold them.
pub fn plan(p: &mut Params, a: &Args, kind: &Chosen) -> anyhow::Result<()> {
    let limit = raise_limit();
    let fit = limit.saturating_sub(RESERVE) as usize;
    if p.connections <= fit {
        return Ok(());
    }
    let n = p.connections;
    if p.udp {
        bail!(
            "--udp: {n} flows need {n} sockets and this process may open {limit} descriptors \
             (RLIMIT_NOFILE); raise the hard limit (ulimit -Hn, LimitNOFILE=) or split the flows \
             over several bench processes (and `bench merge` their --json)"
        );
    }
    if kind.kind != Kind::Uring {
        bail!(
            "{n} connections need more descriptors than this process may open ({limit}, \
             RLIMIT_NOFILE): use the io_uring backend (it holds them as direct descriptors), \
             raise the hard limit (ulimit -Hn, LimitNOFILE=), or split them over several bench \
             processes (and `bench merge` their --json)"
        );
    }
    if a.tick.is_some_and(|t| !t.is_zero()) {
        bail!(
            "--tick reads kernel receive stamps from plain descriptors, and {n} connections are \
             more than this process may open ({limit}, RLIMIT_NOFILE): use --tick 0, or fewer \
             connections per process (several bench processes, then `bench merge`)"
        );
    }
    if !p.tick.is_zero() {
        tracing::info!(
            connections = n,
            nofile = limit,
            "more connections than descriptors: held as io_uring direct descriptors; the ticked \
             loop needs plain ones, so it is off (--tick 0: echoes timed when reaped)"
        );
    }
    p.tick = std::time::Duration::ZERO;
    p.direct = true;
    Ok(())
}

/// The descriptor limit, raised to the hard limit when allowed.
fn raise_limit() -> u64 {
    match echoport_io::sys::raise_nofile_limit() {
        Ok((_, now)) => now,
        Err(_) => echoport_io::sys::nofile_limit(),
    }
}
