//! The hot path's system calls, made directly.
//!
//! The three calls of the hot path go to the kernel through `syscall(2)` rather than glibc's
//! wrappers. Those wrappers are thread-cancellation points: in a multi-threaded process (the
//! server has a signal thread) each call switches asynchronous cancellation on and off around
//! the system call, two atomic updates that measured as a third of this backend's user time
//! per echo. echoport never cancels a thread, so it has no use for them. Errors come back as
//! -1 with errno set, as from the wrappers.

use std::io;
use std::os::fd::RawFd;

/// `send(fd, bytes, MSG_NOSIGNAL)`.
pub(super) fn sys_send(fd: RawFd, bytes: &[u8]) -> isize {
    // SAFETY: `bytes` is a live slice valid for `bytes.len()` bytes for the whole synchronous
    // call; the kernel only copies out of it. Null address arguments are allowed for sendto.
    unsafe {
        libc::syscall(
            libc::SYS_sendto,
            fd,
            bytes.as_ptr(),
            bytes.len(),
            libc::MSG_NOSIGNAL,
            std::ptr::null::<libc::sockaddr>(),
            0 as libc::socklen_t,
        ) as isize
    }
}

/// `sendmsg(fd, {iov}, MSG_NOSIGNAL)`: the gathered send.
///
/// # Safety
/// Every iovec must describe memory readable for its length for the whole call.
pub(super) unsafe fn sys_sendmsg(fd: RawFd, iov: &[libc::iovec]) -> isize {
    // SAFETY: the iovecs describe readable memory (the caller's promise) and `iov` lives for
    // the whole synchronous call; the kernel only reads the header, the vector and the
    // bytes. A zeroed msghdr is valid (no address, no control data).
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = iov.len();
        libc::syscall(
            libc::SYS_sendmsg,
            fd,
            &msg as *const libc::msghdr,
            libc::MSG_NOSIGNAL,
        ) as isize
    }
}

/// `recv(fd, dst, len, 0)`.
///
/// # Safety
/// `dst..dst + len` must be writable, and neither read nor written by anything else, for the
/// whole call.
pub(super) unsafe fn sys_recv(fd: RawFd, dst: *mut u8, len: usize) -> isize {
    // SAFETY: the caller's promise; the kernel writes at most `len` bytes there. Null address
    // arguments are allowed for recvfrom.
    unsafe {
        libc::syscall(
            libc::SYS_recvfrom,
            fd,
            dst,
            len,
            0,
            std::ptr::null_mut::<libc::sockaddr>(),
            std::ptr::null_mut::<libc::socklen_t>(),
        ) as isize
    }
}

/// `epoll_wait(epfd, events, timeout_ms)` (as `epoll_pwait` with no signal mask, which every
/// architecture has).
pub(super) fn sys_epoll_wait(epfd: RawFd, events: &mut [libc::epoll_event], ms: i32) -> i32 {
    // SAFETY: the kernel writes at most `events.len()` entries into the slice, which lives
    // across the call; a null signal mask means "leave the mask alone".
    unsafe {
        libc::syscall(
            libc::SYS_epoll_pwait,
            epfd,
            events.as_mut_ptr(),
            events.len() as libc::c_int,
            ms,
            std::ptr::null::<libc::sigset_t>(),
            0 as libc::size_t,
        ) as i32
    }
}

/// The calling thread's last error code.
pub(super) fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}
