//! Accept groups: the threads that serve one listening address on Windows, where a socket
//! belongs to one completion port only and there is no `SO_REUSEPORT`.
//!
//! The first backend to register a listener for an address founds the group and posts its
//! accepts; each accepted socket is dealt round-robin over the members, tied to the chosen
//! member's port and handed over with a `KEY_HANDOFF` packet. Later backends register a clone
//! of the listener, which only says which group they join.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use windows_sys::Win32::Networking::WinSock::SOCKET;

use super::port::{KEY_HANDOFF, KEY_SOCKET, Port};

/// Groups whose acceptor is still accepting, found by address.
static GROUPS: Mutex<Vec<Weak<Group>>> = Mutex::new(Vec::new());
/// The next backend's id (a member's name in its groups).
static NEXT_BACKEND: AtomicU64 = AtomicU64::new(1);

/// A new backend's id, unique in the process.
pub(super) fn next_backend_id() -> u64 {
    NEXT_BACKEND.fetch_add(1, Ordering::Relaxed)
}

/// Locks a mutex, taking over a poisoned one (its data stays consistent: every critical
/// section here is a few plain assignments).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One backend's membership of an accept group.
pub(super) struct Member {
    /// The backend's id ([`next_backend_id`]).
    pub(super) backend: u64,
    /// Its completion port, which dealt sockets are tied to.
    pub(super) port: Arc<Port>,
    /// The listener's index in that backend (the byte count of its handoff packets).
    pub(super) listener: u32,
}

/// The members of a group and whose turn it is.
struct GroupState {
    /// Backends still taking connections, the acceptor first.
    members: Vec<Member>,
    /// Round-robin position of the next accepted socket.
    next: usize,
    /// Newcomers may join (until the acceptor leaves).
    open: bool,
}

/// The threads that serve one listening address (see the module documentation).
pub(super) struct Group {
    /// The address the group serves.
    addr: SocketAddr,
    /// Its members, under a lock: members join and leave from their own threads.
    state: Mutex<GroupState>,
}

/// Where an accepted socket went.
pub(super) enum Dealt {
    /// To the acceptor itself.
    Here,
    /// Handed to another member's port.
    There,
}

impl Group {
    /// Joins the open group for `addr`, or founds it. Returns the group and whether the
    /// caller is its acceptor.
    pub(super) fn join(addr: SocketAddr, member: Member) -> (Arc<Group>, bool) {
        let mut groups = lock(&GROUPS);
        groups.retain(|g| g.strong_count() > 0);
        for g in groups.iter().filter_map(Weak::upgrade) {
            if g.addr == addr {
                let mut st = lock(&g.state);
                if st.open {
                    st.members.push(member);
                    drop(st);
                    return (g, false);
                }
            }
        }
        let g = Arc::new(Group {
            addr,
            state: Mutex::new(GroupState {
                members: vec![member],
                next: 0,
                open: true,
            }),
        });
        groups.push(Arc::downgrade(&g));
        (g, true)
    }

    /// Stops handing sockets to `backend` (after this returns, no more packets are posted to
    /// its port); the acceptor also closes the group to newcomers.
    pub(super) fn leave(&self, backend: u64, acceptor: bool) {
        let mut st = lock(&self.state);
        st.members.retain(|m| m.backend != backend);
        if acceptor {
            st.open = false;
        }
    }

    /// Picks the next member round-robin for an accepted socket; hands it over when that is
    /// not `me`.
    pub(super) fn deal(&self, me: u64, s: SOCKET) -> io::Result<Dealt> {
        let mut st = lock(&self.state);
        let n = st.members.len();
        if n <= 1 {
            return Ok(Dealt::Here);
        }
        let i = st.next % n;
        st.next = st.next.wrapping_add(1);
        let m = &st.members[i];
        if m.backend == me {
            return Ok(Dealt::Here);
        }
        // Posted under the lock: a member that leaves cannot miss a packet it must clean up.
        m.port.associate(s, KEY_SOCKET)?;
        m.port.post(m.listener, KEY_HANDOFF, s)?;
        Ok(Dealt::There)
    }
}
