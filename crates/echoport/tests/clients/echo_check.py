#!/usr/bin/env python3
"""An echo check written with nothing but Python's standard library.

Usage: echo_check.py HOST PORT

Sends lines, binary messages and a 1 MiB payload (written by a second thread while the
echo is read), then half-closes and expects end-of-stream. Prints "all echoes matched"
and exits 0 only if every echo is byte-exact.
"""
import os
import socket
import sys
import threading


def read_exactly(sock, n):
    chunks = []
    got = 0
    while got < n:
        chunk = sock.recv(min(65536, n - got))
        if not chunk:
            raise SystemExit(f"connection ended after {got} of {n} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def main():
    host, port = sys.argv[1], int(sys.argv[2])
    with socket.create_connection((host, port), timeout=20) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Line by line, like the original client.
        for line in [b"hello\n", b"\n", "gr\u00fc\u00dfe \u2713\n".encode(), b"x" * 5000 + b"\n"]:
            sock.sendall(line)
            echo = read_exactly(sock, len(line))
            if echo != line:
                raise SystemExit(f"line echo differs: sent {line[:40]!r}, got {echo[:40]!r}")
        # Binary messages of awkward sizes.
        for size in [1, 2049, 8192, 8193, 65537]:
            msg = os.urandom(size)
            sock.sendall(msg)
            echo = read_exactly(sock, size)
            if echo != msg:
                raise SystemExit(f"{size}-byte binary echo differs")
        # A large payload, written concurrently with reading.
        big = os.urandom(1 << 20)
        errors = []

        def writer():
            try:
                sock.sendall(big)
                sock.shutdown(socket.SHUT_WR)
            except OSError as e:
                errors.append(e)

        t = threading.Thread(target=writer)
        t.start()
        echo = read_exactly(sock, len(big))
        t.join()
        if errors:
            raise SystemExit(f"writing failed: {errors[0]}")
        if echo != big:
            raise SystemExit("1 MiB echo differs")
        rest = sock.recv(1)
        if rest != b"":
            raise SystemExit(f"expected end of stream, got {rest!r}")
    print("all echoes matched")


if __name__ == "__main__":
    main()
