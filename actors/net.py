"""Ports for the rendezvous servers a run starts (DeepSpeed's process group, the NCCL weight-sync group)."""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"


def free_port(host: str = "") -> int:
    """A port free on `host` right now ("" = every interface, for peers on other nodes)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def loopback_store():
    """(a torch.distributed TCPStore server in this process listening on 127.0.0.1 only, its port). Given a port,
    torch listens on every interface; given a socket bound here, it serves that one (and closes it when freed)."""
    from torch.distributed import TCPStore

    s = socket.socket()
    s.bind((LOOPBACK, 0))
    s.listen()
    port = s.getsockname()[1]
    return TCPStore(LOOPBACK, port, is_master=True, wait_for_workers=False, master_listen_fd=s.detach()), port
