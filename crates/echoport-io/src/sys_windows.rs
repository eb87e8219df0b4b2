//! Windows glue shared by the backends, with the same names as the Unix `sys` module so that
//! `echoport serve` calls one API: error mapping, Ctrl-C handling, CPU pinning,
//! `SO_EXCLUSIVEADDRUSE` for listeners, and the descriptor limit (which Windows does not
//! have).
//!
//! The waker of the IOCP backend is a `PostQueuedCompletionStatus` on its port and lives in
//! [`crate::iocp`] (`iocp/port.rs`).

use std::io;
use std::os::windows::io::AsRawSocket;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

use echoport_core::{OpError, Waker};
use windows_sys::Win32::Foundation::{ERROR_OPERATION_ABORTED, ERROR_TOO_MANY_OPEN_FILES};
use windows_sys::Win32::Networking::WinSock::{
    SO_EXCLUSIVEADDRUSE, SOCKET, SOL_SOCKET, WSAEMFILE, WSAENOBUFS, WSAGetLastError, setsockopt,
};
use windows_sys::Win32::System::Console::{
    CTRL_BREAK_EVENT, CTRL_C_EVENT, CTRL_CLOSE_EVENT, SetConsoleCtrlHandler,
};
use windows_sys::Win32::System::Threading::{GetCurrentThread, SetThreadAffinityMask};
use windows_sys::core::BOOL;

/// Maps a Win32 or Winsock error code to the kinds the echo logic tells apart.
pub fn op_error(code: i32) -> OpError {
    match code {
        c if c == ERROR_OPERATION_ABORTED as i32 => OpError::Canceled,
        WSAENOBUFS => OpError::NoBuffers,
        c if c == WSAEMFILE || c == ERROR_TOO_MANY_OPEN_FILES as i32 => OpError::TooManyFiles,
        c => OpError::Os(c),
    }
}

/// Nothing to do on Windows: console control events are delivered on a thread of their own,
/// never to the workers. Kept so that `echoport serve` reads the same on every platform.
pub fn block_stop_signals() -> io::Result<()> {
    Ok(())
}

struct StopState {
    stop: Arc<AtomicBool>,
    wakers: Vec<Arc<dyn Waker>>,
}

static STOP: OnceLock<StopState> = OnceLock::new();
static PRESSES: AtomicU32 = AtomicU32::new(0);

/// The console control handler: the first Ctrl-C (or Ctrl-Break, or closing the console) sets
/// the stop flag and wakes every loop; the second exits at once with status 130, as a second
/// SIGINT does on Unix.
///
/// # Safety
///
/// `unsafe` only because `SetConsoleCtrlHandler` takes a `PHANDLER_ROUTINE`, an
/// `unsafe extern "system" fn(u32) -> BOOL`: the body does nothing unsafe, and any caller
/// may call it with any `kind`. Windows calls it on a thread of its own, concurrently with the
/// workers; it only reads `STOP` (set once before the handler is installed) and uses atomics
/// and `Waker`s, which are `Sync`.
unsafe extern "system" fn on_console_ctrl(kind: u32) -> BOOL {
    if !matches!(kind, CTRL_C_EVENT | CTRL_BREAK_EVENT | CTRL_CLOSE_EVENT) {
        return 0;
    }
    let Some(state) = STOP.get() else {
        return 0;
    };
    if PRESSES.fetch_add(1, Ordering::AcqRel) == 0 {
        tracing::info!(
            event = kind,
            "stopping: no new connections, finishing echoes (Ctrl-C again to exit at once)"
        );
        state.stop.store(true, Ordering::Release);
        for w in &state.wakers {
            w.wake();
        }
    } else {
        tracing::warn!(event = kind, "second stop request: exiting now");
        std::process::exit(130);
    }
    1
}

/// Installs the console control handler: Ctrl-C, Ctrl-Break or closing the console set `stop`
/// and wake every loop; a second one exits the process at once with status 130.
///
/// Under wine, a SIGINT sent to the wine process is delivered as a Ctrl-C event, so
/// `kill -INT` stops the server as it does on Linux. May be called once per process.
pub fn handle_stop_signals(stop: Arc<AtomicBool>, wakers: Vec<Arc<dyn Waker>>) -> io::Result<()> {
    if STOP.set(StopState { stop, wakers }).is_err() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the stop handler is already installed",
        ));
    }
    // SAFETY: `on_console_ctrl` is a `extern "system"` function with the HandlerRoutine
    // signature that lives as long as the process; it only touches `STOP`, set just above and
    // never changed again.
    if unsafe { SetConsoleCtrlHandler(Some(on_console_ctrl), 1) } == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Pins the calling thread to one CPU (of the first 64: the thread's processor group).
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    if cpu >= usize::BITS as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "CPU number too large (Windows pins within one group of 64)",
        ));
    }
    // SAFETY: GetCurrentThread returns a pseudo-handle that needs no closing; the mask is a
    // plain integer.
    if unsafe { SetThreadAffinityMask(GetCurrentThread(), 1usize << cpu) } == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets `SO_EXCLUSIVEADDRUSE` on a socket before it is bound, so that no other socket can
/// bind the same address and port (Windows would otherwise let one with `SO_REUSEADDR` steal
/// the port).
pub fn exclusive_addr_use(sock: &impl AsRawSocket) -> io::Result<()> {
    let one: i32 = 1;
    // SAFETY: the option value is a live local i32 of the size passed; the socket is borrowed
    // for the call.
    let rc = unsafe {
        setsockopt(
            sock.as_raw_socket() as SOCKET,
            SOL_SOCKET,
            SO_EXCLUSIVEADDRUSE,
            &one as *const i32 as *const u8,
            std::mem::size_of::<i32>() as i32,
        )
    };
    if rc != 0 {
        // SAFETY: reads the calling thread's last Winsock error.
        return Err(io::Error::from_raw_os_error(unsafe { WSAGetLastError() }));
    }
    Ok(())
}

/// How many sockets the process may hold: Windows sets no per-process descriptor limit (the
/// real bound is memory), so this is only a large sane number for default caps.
pub fn nofile_limit() -> u64 {
    1 << 20
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_map_to_the_kinds_the_state_machine_knows() {
        assert_eq!(op_error(ERROR_OPERATION_ABORTED as i32), OpError::Canceled);
        assert_eq!(op_error(WSAENOBUFS), OpError::NoBuffers);
        assert_eq!(op_error(WSAEMFILE), OpError::TooManyFiles);
        assert_eq!(op_error(10054), OpError::Os(10054));
    }

    #[test]
    fn pinning_to_cpu_zero_works_and_absurd_cpus_fail() {
        pin_to_cpu(0).unwrap();
        assert!(pin_to_cpu(1000).is_err());
    }
}
