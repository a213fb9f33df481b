"""A private Ray instance (what `sdft train` starts when no cluster is given) listens on loopback only, and its temp
dir is gone when the run ends."""

import ipaddress
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1, a dual-stack socket bound to loopback
    return (mapped or addr).is_loopback


def _listening(root: int) -> dict[tuple, str]:
    """(ip, port, tcp/udp) -> process, for every listening TCP and unconnected UDP socket of `root`'s tree."""
    try:
        tree = {p.pid: p for p in [psutil.Process(root), *psutil.Process(root).children(recursive=True)]}
    except psutil.NoSuchProcess:
        return {}
    found = {}
    for c in psutil.net_connections(kind="inet"):
        if c.pid in tree and (c.status == psutil.CONN_LISTEN or (c.type.name == "SOCK_DGRAM" and not c.raddr)):
            try:
                name = " ".join(tree[c.pid].cmdline())[:100] or tree[c.pid].name()
            except psutil.Error:  # exiting
                name = ""
            found[(c.laddr.ip, c.laddr.port, "udp" if c.type.name == "SOCK_DGRAM" else "tcp")] = f"{c.pid} {name}"
    return found


def test_is_loopback():
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("::ffff:127.0.0.1")
    assert not any(_is_loopback(ip) for ip in ("0.0.0.0", "::", "192.0.2.2", "::ffff:192.0.2.2"))


@pytest.mark.slow
def test_private_instance_listens_on_loopback_only_and_leaves_no_temp_dir(tmp_path):
    """Polls the sockets of the run's whole process tree (driver, GCS, raylet, agents, workers, learner, engine)
    while it runs."""
    tmp = Path(tempfile.mkdtemp(prefix="sdft-t-", dir="/tmp"))  # the run's TMPDIR: short, for Ray's unix sockets
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"TMPDIR": str(tmp)}
    console = tmp_path / "console.txt"
    with console.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "train", str(ROOT / "configs" / "smoke.yaml"),
             "--output", str(tmp_path / "run"), "--steps", "2", "train.batch_size=4", "train.micro_batch_size=2",
             "rollout.max_new_tokens=8", "eval.max_new_tokens=4", "data.eval_size=2", "ray.num_cpus=2",
             "logging.progress=false", "logging.wandb=false"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    listeners, ray_temps = {}, set()
    try:
        deadline = time.monotonic() + 900
        while proc.poll() is None and time.monotonic() < deadline:
            for key, name in _listening(proc.pid).items():  # an actor's name shows once it runs: keep every one
                listeners.setdefault(key, set()).add(name)
            ray_temps |= set(tmp.glob("sdft-ray-*"))
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        left = sorted(tmp.glob("sdft-ray-*"))
        shutil.rmtree(tmp, ignore_errors=True)
    assert proc.returncode == 0, console.read_text()[-3000:]
    table = "\n".join(f"{ip}:{port}/{kind}  {' | '.join(sorted(names))}"
                      for (ip, port, kind), names in sorted(listeners.items()))
    for role in ("gcs_server", "raylet", "Learner", "RolloutEngine", "pipeline.cli"):  # the check saw them all
        assert any(role in name for names in listeners.values() for name in names), \
            f"no listener of {role} seen:\n{table}"
    exposed = [k for k in listeners if not _is_loopback(k[0])]
    assert not exposed, f"listening beyond loopback: {exposed}\nall listeners:\n{table}"
    assert ray_temps, "the run's Ray instance did not use a temp dir of its own under TMPDIR"
    assert left == [], f"Ray temp dirs left behind: {left}"
