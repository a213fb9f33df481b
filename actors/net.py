"""Ports for the rendezvous servers a run starts (DeepSpeed's process group, the NCCL weight-sync group)."""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOOPBACK = "127.0.0.1"
# Ray's worker processes take ports up to 19999 (its default --max-worker-port)
FIRST_PORT = 20000


def _ephemeral_start() -> int:
    """The first port the kernel hands to outgoing connections and bind(0)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "") -> int:
    """A port free on `host` right now ("" = every interface, for peers on other nodes), to be listened on a few
    seconds later by a process starting up. It is drawn below the kernel's ephemeral range: a port from bind(0)
    could be taken meanwhile by any outgoing connection of the node (Ray makes many), one below it only by another
    listener."""
    end = _ephemeral_start()
    pick = random.SystemRandom()  # not the global generator, which a run seeds alike in every process
    candidates = pick.sample(range(FIRST_PORT, end), min(64, end - FIRST_PORT)) if end > FIRST_PORT else []
    for port in [*candidates, 0]:
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free port")


def loopback_store():
    """(a torch.distributed TCPStore server in this process listening on 127.0.0.1 only, its port). Given a port,
    torch listens on every interface; given a socket bound here, it serves that one (and closes it when freed)."""
    from torch.distributed import TCPStore

    s = socket.socket()
    s.bind((LOOPBACK, 0))
    s.listen()
    port = s.getsockname()[1]
    return TCPStore(LOOPBACK, port, is_master=True, wait_for_workers=False, master_listen_fd=s.detach()), port
