//! How many connections the server holds, and what bounds that number.
//!
//! Without `--max-connections` the server plans for what the machine allows: every
//! connection needs a kernel `struct file` (so `fs.file-max` less the files already open) and
//! a few KiB of kernel memory (so `MemAvailable`). With io_uring each worker then owns as many
//! rings as its share needs, each with a direct-descriptor table of `RLIMIT_NOFILE` slots
//! (the kernel's ceiling for one table), added only as tables fill: planning a million costs
//! nothing until they come. The start-up line states the result and every bound.

use super::Args;

/// Kernel memory one connection costs at least, for the memory bound: a TCP socket, its
/// file, dentry and inode, and the smallest socket buffers (measured per connection by
/// `bench/scale`'s slab figure; see docs/BENCHMARKS.md).
const KERNEL_BYTES_PER_CONN: u64 = 4096;
/// Files left to the rest of the machine under the `fs.file-max` bound.
const FILE_RESERVE: u64 = 4096;
/// Process descriptors kept for listeners, logs and the metrics endpoint, when deciding how
/// many rings (two descriptors each) a worker may add.
const FD_RESERVE: u64 = 1024;

/// What the machine allows, and which limit says so.
#[derive(Clone, Debug)]
pub(super) struct MachineBound {
    pub max: usize,
    pub from: String,
}

/// The rings each worker may own and the table size of each (io_uring only).
#[derive(Clone, Debug)]
pub(super) struct Plan {
    /// Slots per direct-descriptor table.
    pub table: u32,
    /// Rings per worker, at most.
    pub rings: u32,
    /// The machine's bound.
    pub machine: MachineBound,
}

impl Plan {
    /// The plan for `threads` workers in a process allowed `nofile` descriptors.
    pub fn new(args: &Args, threads: usize, nofile: u64) -> Plan {
        let limit = nofile.clamp(16, 1 << 20) as u32;
        let table = args.ring_table_size.map_or(limit, |t| t.clamp(4, limit));
        let machine = machine_bound();
        let target = args.max_connections.unwrap_or(machine.max);
        // Each extra ring takes two descriptors of the process (the ring, its eventfd).
        let by_fds = (nofile.saturating_sub(FD_RESERVE) / 2 / threads.max(1) as u64).max(1) as u32;
        #[cfg(target_os = "linux")]
        let rings =
            echoport_io::uring::rings_for(target.div_ceil(threads.max(1)), table).min(by_fds);
        #[cfg(not(target_os = "linux"))]
        let rings = {
            let _ = (target, by_fds);
            1
        };
        Plan {
            table,
            rings,
            machine,
        }
    }
}

/// The tighter of `fs.file-max` (less the files open now and a reserve) and memory
/// (`MemAvailable` over [`KERNEL_BYTES_PER_CONN`]); unbounded where neither can be read.
pub(super) fn machine_bound() -> MachineBound {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let files = read("/proc/sys/fs/file-nr").and_then(|s| {
        let v: Vec<u64> = s
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        (v.len() == 3).then(|| (v[2], v[0]))
    });
    let mem = read("/proc/meminfo").and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("MemAvailable:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
    });
    let mut best = MachineBound {
        max: usize::MAX,
        from: "no machine limit known".into(),
    };
    if let Some((max, open)) = files {
        let n = max.saturating_sub(open).saturating_sub(FILE_RESERVE) as usize;
        best = MachineBound {
            max: n,
            from: format!(
                "fs.file-max {max} less {open} files open and {FILE_RESERVE} spare (raise fs.file-max)"
            ),
        };
    }
    if let Some(kib) = mem {
        let n = (kib * 1024 / KERNEL_BYTES_PER_CONN) as usize;
        if n < best.max {
            best = MachineBound {
                max: n,
                from: format!(
                    "memory: MemAvailable {} MiB at {KERNEL_BYTES_PER_CONN} B of kernel memory each (add memory)",
                    kib / 1024
                ),
            };
        }
    }
    best.max = best.max.max(1);
    best
}

/// How many connections the server holds, and what that number came from.
pub(super) struct Capacity {
    pub max: usize,
    pub from: String,
    /// The rings planned and the machine's bound, for the start-up line.
    pub plan: Plan,
}

impl Capacity {
    /// From the flags, what the backends hold (`tables`: io_uring's rings, summed over the
    /// workers; `None` when connections take process descriptors) and the plan.
    pub fn derive(
        args: &Args,
        tables: Option<usize>,
        nofile: u64,
        plan: &Plan,
        threads: usize,
    ) -> Capacity {
        // Listeners, rings, eventfds, logs and the UDP sockets need a few descriptors, and
        // the metrics endpoint its connections.
        let metrics = if args.metrics.is_some() {
            crate::metrics::MAX_CONNS as u64
        } else {
            0
        };
        let reserve = 64 + metrics;
        if let Some(n) = args.max_connections {
            return Capacity {
                max: n,
                from: "--max-connections (raise it)".into(),
                plan: plan.clone(),
            };
        }
        match tables {
            Some(t) if t > plan.machine.max => Capacity {
                max: plan.machine.max,
                from: plan.machine.from.clone(),
                plan: plan.clone(),
            },
            Some(t) => Capacity {
                max: t.max(1),
                from: format!(
                    "io_uring direct-descriptor tables: {threads} threads x up to {} rings x {} \
                     slots (raise the descriptor limit, ulimit -n / LimitNOFILE, or --threads)",
                    plan.rings, plan.table
                ),
                plan: plan.clone(),
            },
            None => Capacity {
                max: (nofile.saturating_sub(reserve) as usize).max(1),
                from: format!(
                    "descriptor limit {nofile} less {reserve} in reserve (raise ulimit -n / LimitNOFILE)"
                ),
                plan: plan.clone(),
            },
        }
    }
}
