"""Counting modes of bench/profile: events per echo, and the client-cost A/B.

Events are counts, not times: they do not depend on how busy the machine is, so a design
can be judged on a shared machine. Per process (perf stat on the server's pid and on the
load client): context switches, system calls, io_uring_enter / epoll_wait calls, timer
arms, clock_nanosleep calls, io_uring completions. Per CPU (/proc/interrupts, the server on
CPU 0 and the client on CPU 1, whole machine): local timer interrupts, rescheduling and
function-call IPIs. Whole machine (/proc/stat, both CPUs): CPU per echo, next to each
process's own (getrusage of the client, /proc/PID/stat of the server).
"""

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import harness

EVENTS = [
    ("ctxsw", "context-switches"),
    ("syscalls", "raw_syscalls:sys_enter"),
    ("uring_enter", "syscalls:sys_enter_io_uring_enter"),
    ("epoll_wait", "syscalls:sys_enter_epoll_wait"),
    ("epoll_pwait", "syscalls:sys_enter_epoll_pwait"),
    ("epoll_pwait2", "syscalls:sys_enter_epoll_pwait2"),
    ("nanosleep", "syscalls:sys_enter_clock_nanosleep"),
    ("timer_arms", "timer:hrtimer_start"),
    ("completions", "io_uring:io_uring_complete"),
]
IRQS = {"LOC": "timer_irq", "RES": "resched_ipi", "CAL": "call_ipi"}
CLK = os.sysconf("SC_CLK_TCK")
# On a shared machine, ECHOPORT_PROFILE_PRIO="chrt -f 10" (or "nice -n -10"; as root) keeps other
# jobs from preempting the measured pair, so the counts are those of an unloaded machine; the
# server gets the same priority (bench/profile's start_server).
NICE = os.environ.get("ECHOPORT_PROFILE_PRIO", "").split()


def interrupts():
    """{(row, cpu): count} for the rows in IRQS."""
    out = {}
    with open("/proc/interrupts") as f:
        lines = f.read().splitlines()
    ncpu = len(lines[0].split())
    for line in lines[1:]:
        parts = line.split()
        row = parts[0].rstrip(":")
        if row in IRQS:
            for cpu in range(ncpu):
                out[(row, cpu)] = int(parts[1 + cpu])
    return out


def machine_busy_s():
    """Non-idle CPU seconds of the whole machine so far (every CPU)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return (sum(v[:8]) - idle) / CLK


def proc_cpu_s(pid):
    return sum(harness.cpu_ticks(pid)) / CLK


def proc_vol_ctxsw(pid):
    return harness.status_field(pid, "voluntary_ctxt_switches")


def parse_perf(path):
    got = {}
    names = {ev: key for key, ev in EVENTS}
    with open(path) as f:
        for line in f:
            parts = line.strip().split(",")
            if len(parts) < 3 or parts[2] not in names:
                continue
            try:
                got[names[parts[2]]] = float(parts[0])
            except ValueError:
                got[names[parts[2]]] = None
    return got


def perf_argv(out, target):
    evs = ",".join(ev for _, ev in EVENTS)
    return ["perf", "stat", "-x", ",", "-o", out, "-e", evs] + target


def client_argv(ep, client, addr, rate, conns, size, duration, server_pid):
    """`bench[+flag=value...]` (echoport bench) or `loadgen` (bench/peers/c/loadgen.c)."""
    base, _, extra = client.partition("+")
    port = addr.rsplit(":", 1)[1]
    if base == "loadgen":
        return [loadgen_bin(ep), port, str(conns), str(size), str(duration), str(rate)]
    if base != "bench":
        sys.exit(f"unknown client {client!r}: bench[+flag=value...] or loadgen")
    argv = [ep, "bench", addr, "--threads", "1", "--cpus", "1", "-q", "--json", "-c", str(conns),
            "-s", str(size), "-d", f"{duration:g}s", "--warmup", "0", "--server-pid", str(server_pid)]
    if rate:
        argv += ["-r", str(rate)]
    return argv + [f for kv in extra.split("+") if kv for f in ("--" + kv).split("=", 1)]


def loadgen_bin(ep):
    return harness.c_program("loadgen")


def echoes_of(client, stdout):
    """Echoes the client completed, from its own report."""
    if client.startswith("loadgen"):
        kv = dict(p.split("=", 1) for p in stdout.split() if "=" in p)
        return int(kv.get("received", 0)), kv
    run = (json.loads(stdout).get("runs") or [{}])[-1]
    return int(run.get("messages", 0)), run


def one(start_server, ep, server, client, rate, conns, size, duration, counts):
    """One run: the server on CPU 0, the client on CPU 1. Returns a dict of per-echo figures."""
    srv, addr = start_server(server)
    tmp = tempfile.mkdtemp(prefix="echoport-counts-")
    try:
        argv = NICE + ["taskset", "-c", "1"] + client_argv(ep, client, addr, rate, conns, size, duration, srv.pid)
        if counts:
            argv = perf_argv(os.path.join(tmp, "client"), argv)
            sperf = subprocess.Popen(perf_argv(os.path.join(tmp, "server"), ["-p", str(srv.pid)]),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.3)
        irq0, busy0, scpu0, svol0 = interrupts(), machine_busy_s(), proc_cpu_s(srv.pid), proc_vol_ctxsw(srv.pid)
        t0 = time.time()
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.time() - t0
        irq1, busy1, scpu1, svol1 = interrupts(), machine_busy_s(), proc_cpu_s(srv.pid), proc_vol_ctxsw(srv.pid)
        stdout = p.stdout.read()
        p.stdout.close()
        p.stderr.close()
        if counts:
            sperf.send_signal(signal.SIGINT)
            sperf.wait(timeout=30)
    finally:
        srv.terminate()
        srv.wait(timeout=15)
    echoes, report = echoes_of(client, stdout)
    if not echoes:
        sys.exit(f"{client} against {server} completed no echo (exit {status >> 8})")
    per = lambda v: None if v is None else v / echoes
    r = {"server": server, "client": client, "rate": rate, "echoes": echoes, "wall_s": wall,
         "client_cpu_us": per(ru.ru_utime + ru.ru_stime) * 1e6,
         "server_cpu_us": per(scpu1 - scpu0) * 1e6,
         "machine_cpu_us": per(busy1 - busy0) * 1e6,
         "server_vol_ctxsw": per(svol1 - svol0),
         "p50_us": lat(client, report, "p50"), "p99_us": lat(client, report, "p99"),
         "ok": status == 0}
    for (row, cpu), v in irq1.items():
        if cpu in (0, 1):
            r[f"{IRQS[row]}_cpu{cpu}"] = per(v - irq0.get((row, cpu), 0))
    if counts:
        for side in ("server", "client"):
            for k, v in parse_perf(os.path.join(tmp, side)).items():
                r[f"{side}_{k}"] = per(v)
    return r


def lat(client, report, q):
    if client.startswith("loadgen"):
        v = report.get(f"{q}_us")
        return float(v) if v is not None else None
    return (report.get("latency_us") or {}).get(q)


def waits(r, side):
    vals = [r.get(f"{side}_{k}") for k in ("uring_enter", "epoll_wait", "epoll_pwait", "epoll_pwait2")]
    return sum(v for v in vals if v) or None


def f(v, d=2):
    return "-" if v is None else f"{v:.{d}f}"


def print_counts(rows):
    print("Events per echo (counts; per process unless marked). server = CPU 0, client = CPU 1.")
    print()
    print("| server | client | msgs/s | side | ctx switches | syscalls | waits (enter/epoll) | "
          "echoes per wait | completions per enter | timer arms | nanosleeps | timer IRQs (CPU) | "
          "resched IPIs (CPU) | CPU µs/echo (process) |")
    print("|" + "---|" * 14)
    for r in rows:
        for side, cpu in (("server", 0), ("client", 1)):
            w = waits(r, side)
            comp, enter = r.get(f"{side}_completions"), r.get(f"{side}_uring_enter")
            print(f"| {r['server']} | {r['client']} | {r['rate']:,} | {side} | {f(r.get(side + '_ctxsw'), 3)} | "
                  f"{f(r.get(side + '_syscalls'))} | {f(w, 3)} | {f(1 / w if w else None, 1)} | "
                  f"{f(comp / enter if comp and enter else None, 1)} | {f(r.get(side + '_timer_arms'), 3)} | "
                  f"{f(r.get(side + '_nanosleep'), 3)} | {f(r.get(f'timer_irq_cpu{cpu}'), 3)} | "
                  f"{f(r.get(f'resched_ipi_cpu{cpu}'), 3)} | {f(r.get(side + '_cpu_us'))} |")
    print()
    print("| server | client | msgs/s | whole machine CPU µs/echo | server + client µs/echo | p50 / p99 µs |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        both = r["server_cpu_us"] + r["client_cpu_us"]
        print(f"| {r['server']} | {r['client']} | {r['rate']:,} | {f(r['machine_cpu_us'])} | {f(both)} | "
              f"{f(r['p50_us'], 0)} / {f(r['p99_us'], 0)} |")


def print_ab(rows, clients):
    print("Client cost A/B (CPU µs per echo, whole process incl. connect; median [min-max] of the reps).")
    print()
    print("| client | reps | client CPU µs/echo | server CPU µs/echo | client / server | p50 µs | p99 µs | ok |")
    print("|---|---|---|---|---|---|---|---|")
    for c in clients:
        rs = [r for r in rows if r["client"] == c]
        med = lambda k: spread([r[k] for r in rs if r.get(k) is not None])
        ratio = spread([r["client_cpu_us"] / r["server_cpu_us"] for r in rs if r["server_cpu_us"]])
        print(f"| {c} | {len(rs)} | {med('client_cpu_us')} | {med('server_cpu_us')} | {ratio} | "
              f"{med('p50_us')} | {med('p99_us')} | {all(r['ok'] for r in rs)} |")


def spread(xs):
    if not xs:
        return "-"
    return f"{statistics.median(xs):.2f} [{min(xs):.2f}-{max(xs):.2f}]"
