//! Setting a ring up: the start-up probe, the ring with the best task-running mode the kernel
//! accepts, the ring's descriptor registered with itself, and what the kernel version allows.

use std::io;
use std::os::fd::AsRawFd;

use io_uring::{IoUring, opcode};

use super::{Config, TaskRun};

pub(super) const ENTER_GETEVENTS: u32 = 1 << 0;
pub(super) const ENTER_EXT_ARG: u32 = 1 << 3;
pub(super) const ENTER_REGISTERED_RING: u32 = 1 << 4;
const REGISTER_RING_FDS: u32 = 20;
const UNREGISTER_RING_FDS: u32 = 21;

/// Checks that io_uring works here with what this backend needs: a ring can be set up, every
/// opcode it uses is supported, and one no-op makes the round trip.
pub fn probe() -> Result<(), String> {
    let mut ring = IoUring::new(8).map_err(|e| format!("io_uring_setup failed: {e}"))?;
    let mut p = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut p)
        .map_err(|e| format!("opcode probe failed: {e}"))?;
    let needed = [
        (opcode::Accept::CODE, "accept"),
        (opcode::Recv::CODE, "recv"),
        (opcode::Send::CODE, "send"),
        (opcode::AsyncCancel::CODE, "async-cancel"),
        (opcode::Close::CODE, "close"),
        (opcode::Shutdown::CODE, "shutdown"),
        (opcode::Read::CODE, "read"),
    ];
    for (code, name) in needed {
        if !p.is_supported(code) {
            return Err(format!("the kernel lacks the io_uring {name} operation"));
        }
    }
    // SAFETY: a NOP references no memory.
    unsafe {
        ring.submission()
            .push(&opcode::Nop::new().build().user_data(1))
            .map_err(|_| "submission queue full".to_string())?;
    }
    ring.submit_and_wait(1)
        .map_err(|e| format!("io_uring_enter failed: {e}"))?;
    let first = ring
        .completion()
        .next()
        .map(|c| (c.user_data(), c.result()));
    match first {
        Some((1, res)) if res >= 0 => Ok(()),
        Some((_, res)) => Err(format!(
            "no-op failed: {}",
            io::Error::from_raw_os_error(-res)
        )),
        None => Err("no-op did not complete".into()),
    }
}

/// Builds a ring with the best task-running mode the kernel accepts, starting from the one
/// asked for.
pub(super) fn build_ring(cfg: &Config) -> io::Result<(IoUring, Vec<&'static str>)> {
    let mut b = IoUring::builder();
    b.setup_cqsize(cfg.cq_entries)
        .setup_clamp()
        .setup_submit_all();
    if cfg.taskrun == TaskRun::Defer {
        let mut deferred = b.clone();
        deferred.setup_single_issuer().setup_defer_taskrun();
        if let Ok(r) = deferred.build(cfg.sq_entries) {
            return Ok((r, vec!["single-issuer", "defer-taskrun"]));
        }
    }
    if cfg.taskrun != TaskRun::Interrupt {
        let mut coop = b.clone();
        coop.setup_coop_taskrun().setup_taskrun_flag();
        if let Ok(r) = coop.build(cfg.sq_entries) {
            return Ok((r, vec!["coop-taskrun"]));
        }
    }
    Ok((b.build(cfg.sq_entries)?, vec!["interrupt-taskrun"]))
}

#[repr(C)]
struct RsrcUpdate {
    offset: u32,
    resv: u32,
    data: u64,
}

/// One `io_uring_register` call with one resource update entry; returns what it returns.
fn rsrc_update(ring: &IoUring, opcode: u32, up: &mut RsrcUpdate) -> libc::c_long {
    // SAFETY: `up` is a valid `io_uring_rsrc_update` for one entry that lives across the
    // call; the kernel may write the chosen slot into `offset` and keeps no pointer to it.
    unsafe {
        libc::syscall(
            libc::SYS_io_uring_register,
            ring.as_raw_fd() as libc::c_long,
            opcode as libc::c_long,
            up as *mut RsrcUpdate as *mut libc::c_void,
            1 as libc::c_long,
        )
    }
}

/// Registers the ring's descriptor with itself (`IORING_REGISTER_RING_FDS`), giving the index
/// waits use instead of the descriptor; `None` on kernels before 5.18 (waits then pass the
/// descriptor, as before).
pub(super) fn register_ring_fd(ring: &IoUring) -> Option<u32> {
    let mut up = RsrcUpdate {
        offset: u32::MAX, // let the kernel pick a free slot
        resv: 0,
        data: ring.as_raw_fd() as u64,
    };
    let r = rsrc_update(ring, REGISTER_RING_FDS, &mut up);
    (r == 1).then_some(up.offset)
}

/// Gives back the registration made by [`register_ring_fd`] (on the thread that made it), so
/// the kernel drops its reference to the ring file now rather than at thread exit.
pub(super) fn unregister_ring_fd(ring: &IoUring, index: u32) {
    let mut up = RsrcUpdate {
        offset: index,
        resv: 0,
        data: 0,
    };
    rsrc_update(ring, UNREGISTER_RING_FDS, &mut up);
}

/// The running kernel's `major.minor`, from `/proc/sys/kernel/osrelease`.
pub(super) fn kernel_version() -> (u32, u32) {
    let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return (0, 0);
    };
    parse_release(&release)
}

fn parse_release(release: &str) -> (u32, u32) {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let ma: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let mi: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (ma, mi)
}

#[cfg(test)]
mod tests {
    use super::parse_release;

    #[test]
    fn kernel_releases_parse() {
        assert_eq!(parse_release("6.18.44-fc-v1045\n"), (6, 18));
        assert_eq!(parse_release("5.15.0-91-generic"), (5, 15));
        assert_eq!(parse_release("6.1"), (6, 1));
        assert_eq!(parse_release("garbage"), (0, 0));
    }
}
