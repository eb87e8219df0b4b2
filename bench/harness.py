"""bench/harness.py: what every benchmark script shares (imported by compare, profile,
listener): where the binaries are, how to build them, how to start a server and know it
listens, and how to read a process's CPU time and memory.

Servers are named one way everywhere: `echoport` (io_uring), `echoport-epoll`, an echoport
variant with extra serve flags after `+` (`echoport+taskrun=coop+batch-wait-us=50`), or a
peer: `tokio-st`, `tokio-mt`, `monoio`, `epoll-loop` (bench/peers, Rust) and `c-epoll`
(bench/peers/c/echo-epoll.c, the plain C readiness floor). The independent C load client,
bench/peers/c/loadgen.c, is `bench/compare --client loadgen`.
"""

import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
PEERS_TARGET = os.environ.get("PEERS_TARGET_DIR", os.path.join(ROOT, "bench", "peers", "target"))
C_PEERS = os.path.join(ROOT, "bench", "peers", "c")
C_TARGET = os.path.join(PEERS_TARGET, "c")
EP = os.path.join(TARGET, "release", "echoport")
TICK = os.sysconf("SC_CLK_TCK")
# Rust peers: name -> binary in bench/peers.
RUST_PEERS = {"tokio-st": "peer-tokio-st", "tokio-mt": "peer-tokio-mt", "monoio": "peer-monoio",
              "epoll-loop": "peer-epoll"}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_ticks(pid):
    """(utime, stime) of a process, in clock ticks (TICK a second), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def status_field(pid, name):
    """The first number of field `name` in /proc/PID/status (0 when absent)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return 0


def rss_kib(pid):
    return status_field(pid, "VmRSS")


def serve_flags(extra):
    """`taskrun=coop+batch-wait-us=50` -> ["--taskrun", "coop", "--batch-wait-us", "50"]."""
    return [f for kv in extra.split("+") if kv for f in ("--" + kv).split("=", 1)]


def server_commands():
    """name -> argv, with ADDR (or PORT, for the C peer) substituted at start."""
    peer = lambda n: os.path.join(PEERS_TARGET, "release", n)
    base = [EP, "serve", "--listen", "ADDR", "--threads", "1"]
    cmds = {
        "echoport": base + ["--backend", "io-uring"],
        "echoport-epoll": base + ["--backend", "epoll"],
        "c-epoll": [os.path.join(C_TARGET, "echo-epoll"), "PORT"],
    }
    cmds.update({name: [peer(b), "ADDR"] for name, b in RUST_PEERS.items()})
    return cmds


def server_argv(name, cmds=None):
    """The command of a server name (with `+flag=value` variants); exits on an unknown one."""
    cmds = cmds or server_commands()
    base, _, extra = name.partition("+")
    if base not in cmds:
        sys.exit(f"unknown server {base!r}; known: {', '.join(cmds)} (echoport[-epoll] take +flag=value)")
    if extra and "serve" not in cmds[base]:
        sys.exit(f"{name!r}: only echoport servers take extra flags")
    return cmds[base] + serve_flags(extra)


def build(servers=(), testkit=False, loadgen=False):
    """Builds echoport (release) and whatever peers `servers` name."""
    log("building echoport (release) ...")
    pkgs = ["-p", "echoport"] + (["-p", "echoport-testkit"] if testkit else [])
    subprocess.run(["cargo", "build", "--quiet", "--release"] + pkgs, cwd=ROOT, check=True)
    bases = {s.partition("+")[0] for s in servers}
    if bases & set(RUST_PEERS):
        log("building the peers (release) ...")
        subprocess.run(["cargo", "build", "--quiet", "--release"], cwd=os.path.join(ROOT, "bench", "peers"),
                       env=dict(os.environ, CARGO_TARGET_DIR=PEERS_TARGET), check=True)
    for prog, wanted in (("echo-epoll", "c-epoll" in bases), ("loadgen", loadgen)):
        if wanted:
            c_program(prog)


def c_program(name):
    """bench/peers/c/NAME.c compiled (again if the source is newer); returns its path."""
    src, out = os.path.join(C_PEERS, name + ".c"), os.path.join(C_TARGET, name)
    if not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(src):
        os.makedirs(C_TARGET, exist_ok=True)
        subprocess.run(["gcc", "-O2", "-Wall", "-o", out, src], check=True)
    return out


def at(cmd, addr):
    """A server command with its ADDR (host:port) or PORT placeholder filled in."""
    port = addr.rsplit(":", 1)[1]
    return [addr if a == "ADDR" else port if a == "PORT" else a for a in cmd]


class Server:
    """A server started pinned to `cpus` (taskset), ready once it says "listening on"."""

    def __init__(self, name, cmd, cpus="0", stdout=subprocess.DEVNULL):
        self.name = name
        self.addr = f"127.0.0.1:{free_port()}"
        argv = ["taskset", "-c", cpus] + at(cmd, self.addr)
        self.proc = subprocess.Popen(argv, stdout=stdout, stderr=subprocess.PIPE, text=True)
        self.head = []
        deadline = time.time() + 10
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            self.head.append(line)
            if "listening on" in line:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited at start: {''.join(self.head)}")
        raise RuntimeError(f"{name} did not start")

    @property
    def port(self):
        return int(self.addr.rsplit(":", 1)[1])

    def stop(self):
        """SIGTERM, then SIGKILL after 15 s; returns the rest of its stderr."""
        self.proc.terminate()
        try:
            rest = self.proc.communicate(timeout=15)[1]
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rest = self.proc.communicate()[1]
        return "".join(self.head) + (rest or "")
