"""Ports for the rendezvous servers a run starts (DeepSpeed's process group, the NCCL weight-sync group)."""

from __future__ import annotations

import socket


def free_port(host: str = "") -> int:
    """A port free on `host` right now ("" = every interface, for peers on other nodes)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
