//! The connection budget shared by every worker of a server: how many connections may be
//! open at once, in all and from one source address. Workers take a place at accept and
//! give it back when the connection's slot is freed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The connection budget shared by every worker of a server: admission at accept.
#[derive(Debug)]
pub struct Admission {
    /// Most connections open at once, server-wide (can be lowered once the backends say
    /// what they hold).
    max: AtomicUsize,
    /// Connections admitted and not yet closed.
    live: AtomicUsize,
    /// A refusal at the limit was logged; cleared once a tenth of the places are free.
    refusal_logged: AtomicBool,
    /// What sets the budget and how to raise it, for the limit message.
    bound: std::sync::OnceLock<String>,
    /// `--max-connections-per-ip`: the limit, and the open connections of each address
    /// that has any (`None`: no per-address limit).
    per_ip: Option<(u32, Mutex<HashMap<IpAddr, u32>>)>,
}

impl Admission {
    /// A budget of `max` connections.
    pub fn new(max: usize) -> Arc<Admission> {
        Admission::with_per_ip(max, None)
    }

    /// A budget of `max` connections, and of `per_ip` from any one address.
    pub fn with_per_ip(max: usize, per_ip: Option<u32>) -> Arc<Admission> {
        Arc::new(Admission {
            max: AtomicUsize::new(max),
            live: AtomicUsize::new(0),
            refusal_logged: AtomicBool::new(false),
            bound: std::sync::OnceLock::new(),
            per_ip: per_ip.map(|n| (n, Mutex::new(HashMap::new()))),
        })
    }

    /// True when connections are also limited per source address.
    pub fn limits_per_ip(&self) -> bool {
        self.per_ip.is_some()
    }

    /// Takes one place for `ip` if its budget allows.
    pub fn try_acquire_ip(&self, ip: IpAddr) -> bool {
        let Some((max, map)) = &self.per_ip else {
            return true;
        };
        let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= *max {
            return false;
        }
        *n += 1;
        true
    }

    /// Gives `ip`'s place back.
    pub fn release_ip(&self, ip: IpAddr) {
        if let Some((_, map)) = &self.per_ip {
            let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = map.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&ip);
                }
            }
        }
    }

    /// Changes the budget (connections already admitted stay).
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// Says what sets the budget and how to raise it (once; for the limit message).
    pub fn set_bound(&self, bound: String) {
        let _ = self.bound.set(bound);
    }

    /// What sets the budget, as given to [`Admission::set_bound`].
    pub fn bound(&self) -> &str {
        self.bound.get().map_or("--max-connections", String::as_str)
    }

    /// The budget.
    pub fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }

    /// Connections admitted and not yet released.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Takes one place if one is free.
    pub fn try_acquire(&self) -> bool {
        let max = self.max.load(Ordering::Relaxed);
        self.live
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Gives a place back.
    pub fn release(&self) {
        let was = self.live.fetch_sub(1, Ordering::AcqRel);
        if self.refusal_logged.load(Ordering::Relaxed) {
            let max = self.max();
            if was <= max - max / 10 {
                self.refusal_logged.store(false, Ordering::Relaxed);
            }
        }
    }

    /// True for the first refusal at the limit since the budget last had room to spare (a
    /// tenth of it free): the caller logs that one, not every refused connection.
    pub fn first_refusal(&self) -> bool {
        !self.refusal_logged.swap(true, Ordering::Relaxed)
    }
}

/// A place taken by [`Admission::try_admit`]: the connection counts against the budget (and
/// against its address's, when `ip` is set) until it is released.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[must_use]
pub struct Admitted {
    /// The address whose per-address budget holds a place for it, if limited per address.
    pub ip: Option<IpAddr>,
}

impl Admission {
    /// Takes a place in the whole budget and, when `ip` is given and addresses are limited,
    /// in that address's; either both or neither. `None`: refused.
    pub fn try_admit(&self, ip: Option<IpAddr>) -> Option<Admitted> {
        if !self.try_acquire() {
            return None;
        }
        match ip {
            Some(ip) if self.limits_per_ip() => {
                if self.try_acquire_ip(ip) {
                    Some(Admitted { ip: Some(ip) })
                } else {
                    self.release();
                    None
                }
            }
            _ => Some(Admitted { ip: None }),
        }
    }

    /// Counts a connection that was not admitted through [`Admission::try_admit`] (one the
    /// caller established itself and adopts), whatever the budget.
    pub fn admit_unchecked(&self) {
        self.live.fetch_add(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_takes_both_places_or_neither() {
        let a = Admission::with_per_ip(3, Some(1));
        let ip: IpAddr = "127.0.0.2".parse().unwrap();
        let first = a.try_admit(Some(ip)).expect("room for it");
        assert_eq!(first.ip, Some(ip));
        assert!(
            a.try_admit(Some(ip)).is_none(),
            "its address is at its limit"
        );
        assert_eq!(
            a.live(),
            1,
            "the refused one gave its server-wide place back"
        );
        assert!(a.try_admit(Some("127.0.0.3".parse().unwrap())).is_some());
        assert!(a.try_admit(None).is_some());
        assert!(a.try_admit(None).is_none(), "the whole budget is spent");
        a.release();
        a.release_ip(ip);
        assert!(a.try_admit(Some(ip)).is_some(), "a freed place is reusable");
    }
}
