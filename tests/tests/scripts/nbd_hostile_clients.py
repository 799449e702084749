"""Hostile NBD clients for tests/tests/nbd_limits.rs.

usage: nbd_hostile_clients.py MODE N BOUND HOST PORT

Opens N TCP connections to HOST:PORT at once (non-blocking, so the burst
really is simultaneous) and keeps each open until the server drops it, or
until BOUND seconds have passed. MODE:
  silent     sends nothing (a connect burst);
  slowloris  trickles one byte a second of a handshake that never ends in
             time (fixed newstyle flags, then NBD_OPT_GO for an export with
             a 4000-byte name).
Prints "dropped=D failed=F open=O" (failed: never connected), then a line
with details: the errors of the failed ones, how many of those still open
had connected.
"""

import errno
import select
import socket
import struct
import sys
import time

mode, n, bound, host, port = (
    sys.argv[1],
    int(sys.argv[2]),
    float(sys.argv[3]),
    sys.argv[4],
    int(sys.argv[5]),
)
assert mode in ("silent", "slowloris"), mode
name = b"x" * 4000
trickle = (
    struct.pack(">I", 3)
    + b"IHAVEOPT"
    + struct.pack(">II", 7, 4 + len(name) + 2)
    + struct.pack(">I", len(name))
    + name
    + struct.pack(">H", 0)
)

socks = {}
for i in range(n):
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex((host, port))
    socks[s] = 0  # bytes of `trickle` sent
dropped = failed = 0
errors = {}


def drop(s):
    global dropped
    del socks[s]
    s.close()
    dropped += 1


start = time.monotonic()
next_byte = start
while socks and time.monotonic() - start < bound:
    select.select(list(socks), [], [], 0.2)
    tick = time.monotonic() >= next_byte
    if tick:
        next_byte += 1.0
    for s in list(socks):
        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            del socks[s]
            s.close()
            if err in (errno.ECONNRESET, errno.EPIPE):
                dropped += 1
            else:
                failed += 1
                name = errno.errorcode.get(err, str(err))
                errors[name] = errors.get(name, 0) + 1
            continue
        try:
            s.getpeername()
        except OSError:
            continue  # still connecting (its SYN may be retried)
        try:
            while True:
                d = s.recv(65536)
                if not d:
                    raise ConnectionResetError
        except BlockingIOError:
            pass
        except (ConnectionResetError, BrokenPipeError):
            drop(s)
            continue
        if mode == "slowloris" and tick and socks[s] < len(trickle):
            try:
                socks[s] += s.send(trickle[socks[s] : socks[s] + 1])
            except BlockingIOError:
                pass
            except (ConnectionResetError, BrokenPipeError):
                drop(s)
connected = 0
for s in socks:
    try:
        s.getpeername()
        connected += 1
    except OSError:
        pass
print(f"dropped={dropped} failed={failed} open={len(socks)}")
print(f"errors={errors} connected_of_open={connected}", flush=True)
