//! Refusing io_uring the way containers do: a seccomp filter that makes the io_uring system
//! calls fail with a chosen error, as Docker's default profile (EPERM), a kernel built
//! without io_uring (ENOSYS) or a sandbox (EOPNOTSUPP, EINVAL) would.
//!
//! This exists to test the fallback to epoll for real, and to try it by hand; the server
//! itself never installs a filter. A filter applies to the thread that installs it and to
//! every thread and process started from it afterwards, and can never be removed.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// `AUDIT_ARCH_*` of the architecture this is built for (`linux/audit.h`).
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

/// Offsets into `struct seccomp_data`.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;

/// A compiled seccomp program (classic BPF).
#[derive(Clone, Debug)]
pub struct Filter {
    prog: Vec<libc::sock_filter>,
}

fn stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jeq(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    }
}

impl Filter {
    /// A filter under which `io_uring_setup`, `io_uring_enter` and `io_uring_register` fail
    /// with `errno` (a positive error code such as `libc::EPERM`); every other system call
    /// is allowed.
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    pub fn refuse_io_uring(errno: i32) -> Filter {
        let deny = libc::SECCOMP_RET_ERRNO | (errno as u32 & libc::SECCOMP_RET_DATA);
        let ld = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
        let ret = libc::BPF_RET | libc::BPF_K;
        let prog = vec![
            /* 0 */ stmt(ld, OFF_ARCH),
            // Another architecture's calls (a 32-bit process) are not ours to judge.
            /* 1 */
            jeq(AUDIT_ARCH, 0, 4),
            /* 2 */ stmt(ld, OFF_NR),
            /* 3 */ jeq(libc::SYS_io_uring_setup as u32, 3, 0),
            /* 4 */ jeq(libc::SYS_io_uring_enter as u32, 2, 0),
            /* 5 */ jeq(libc::SYS_io_uring_register as u32, 1, 0),
            /* 6 */ stmt(ret, libc::SECCOMP_RET_ALLOW),
            /* 7 */ stmt(ret, deny),
        ];
        Filter { prog }
    }

    /// Installs the filter in the calling thread (and what it starts from now on).
    ///
    /// Sets `no_new_privs` first, as an unprivileged process must.
    pub fn install(&self) -> io::Result<()> {
        install(&self.prog)
    }

    /// Makes `cmd`'s child install this filter between fork and exec, so the program it runs
    /// starts, and stays, under it. Spawning fails with the error if installing fails.
    pub fn apply_to(self, cmd: &mut Command) {
        let prog = self.prog;
        // SAFETY: the closure runs in the forked child, where only async-signal-safe work is
        // allowed: it allocates nothing (the program was built before the fork and is only
        // borrowed) and makes two prctl system calls.
        unsafe {
            cmd.pre_exec(move || install(&prog));
        }
    }
}

fn install(prog: &[libc::sock_filter]) -> io::Result<()> {
    let fprog = libc::sock_fprog {
        len: prog.len() as libc::c_ushort,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: PR_SET_NO_NEW_PRIVS takes only integers.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fprog` points at `prog.len()` instructions that live across the call; the
    // kernel copies the program and keeps no pointer to it.
    let rc = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER as libc::c_ulong,
            &fprog as *const libc::sock_fprog,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on a fresh thread with io_uring refused by `errno`; the filter dies with it.
    fn refused<T: Send + 'static>(errno: i32, f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(move || {
            Filter::refuse_io_uring(errno)
                .install()
                .expect("install seccomp filter");
            f()
        })
        .join()
        .expect("filtered thread panicked")
    }

    #[test]
    fn the_filter_refuses_io_uring_setup_with_the_chosen_error() {
        for errno in [libc::EPERM, libc::ENOSYS, libc::EOPNOTSUPP, libc::EINVAL] {
            let err = refused(errno, || {
                // SAFETY: a null params pointer makes the call fail; it is refused before the
                // kernel would even read it.
                unsafe {
                    libc::syscall(libc::SYS_io_uring_setup, 1u32, std::ptr::null_mut::<u8>())
                };
                io::Error::last_os_error()
            });
            assert_eq!(err.raw_os_error(), Some(errno), "{err}");
        }
    }

    #[test]
    fn the_probe_fails_and_names_the_reason_when_io_uring_is_refused() {
        for (errno, words) in [
            (libc::EPERM, "Operation not permitted"),
            (libc::ENOSYS, "Function not implemented"),
        ] {
            let why = refused(errno, crate::uring::probe).expect_err("probe must fail");
            assert!(
                why.contains("io_uring_setup") && why.contains(words),
                "{why}"
            );
        }
    }

    #[test]
    fn other_threads_keep_io_uring() {
        refused(libc::EPERM, || ());
        crate::uring::probe().expect("this thread was never filtered");
    }
}
