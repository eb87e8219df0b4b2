//! Adopting connected streams as direct descriptors (`Config::direct_adopt`): how a client
//! holds more connections than `RLIMIT_NOFILE` in one process.
//!
//! A stream handed in is registered into a free slot of a ring's direct-descriptor table
//! (`IORING_REGISTER_FILES_UPDATE`, one system call) and its plain descriptor is closed at
//! once: the table's reference keeps the socket open. So the process's descriptor table only
//! ever holds the few streams still being connected. Slots are this file's to hand out (the
//! backend makes no accepts: `add_listener` is refused), the ring is the one with room
//! (`accept.rs`'s choice, a new ring when every table is full), and closing the connection
//! clears its slot the same way, so the slot is free again as soon as the call returns.
//! Operations still in flight on the socket hold their own reference to it; the state
//! machine closes only once none is left.

use std::io;
use std::net::TcpStream;
use std::os::fd::AsRawFd;

use echoport_core::Socket;

use super::{FIXED, Uring};

impl Uring {
    /// Registers `stream` in a free slot of a ring with room and closes its descriptor.
    pub(super) fn adopt_direct(&mut self, stream: TcpStream) -> io::Result<Socket> {
        let Some(r) = self.ring_with_room() else {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!(
                    "every direct-descriptor table of this thread is full ({} rings of {} slots)",
                    self.tables.rings(),
                    self.tables.size
                ),
            ));
        };
        let slot = self.tables.take_slot(r);
        if let Err(e) = self.set_slot(r, slot, stream.as_raw_fd()) {
            self.tables.give_slot(r, slot);
            return Err(e);
        }
        // The table holds the socket now; the plain descriptor is not needed.
        drop(stream);
        self.tables.used[r] += 1;
        Ok(Socket(FIXED | (r as u64) << 32 | slot as u64))
    }

    /// Closes an adopted connection: clears its slot (the socket closes with the table's
    /// reference, once no operation holds it), and the slot is free again.
    pub(super) fn close_adopted(&mut self, sock: Socket) {
        let (r, slot) = (Self::ring_of(sock), sock.0 as u32);
        if r > self.tables.extra.len() {
            return; // not a ring of this backend
        }
        match self.set_slot(r, slot, -1) {
            Ok(_) => {
                self.tables.used[r] = self.tables.used[r].saturating_sub(1);
                self.tables.give_slot(r, slot);
            }
            Err(e) => {
                tracing::warn!(ring = r, slot, error = %e, "clearing a direct descriptor failed")
            }
        }
    }

    /// Puts `fd` (-1: nothing) in slot `slot` of ring `r`'s table, in one system call.
    fn set_slot(&self, r: usize, slot: u32, fd: i32) -> io::Result<usize> {
        let ring = match r.checked_sub(1) {
            None => &self.ring,
            Some(i) => match self.tables.extra.get(i) {
                Some(t) => &t.ring,
                None => return Err(io::Error::from_raw_os_error(libc::EBADF)),
            },
        };
        ring.submitter().register_files_update(slot, &[fd])
    }
}
