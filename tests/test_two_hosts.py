"""Two hosts for real: two network namespaces joined by a veth pair (addresses of a private range, created and
removed here), a Ray head in one and a worker in the other, each with addresses that are not loopback. `sdft train`
submitted with `ray job submit` from the head, with a learner rank on each host (their gloo group and DeepSpeed
rendezvous across the pair) and the engine on the worker, the greedy check after every weight sync. Needs root for
the namespaces; skipped with the reason where they cannot be made."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "smoke.yaml"
BIN = Path(sys.executable).parent
PORT, DASHBOARD, AGENT = 6379, 8265, 52365  # fresh namespaces: every port is free


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


def _cannot_make_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    probe = f"sdft-probe-{uuid.uuid4().hex[:6]}"
    made = _ip("netns", "add", probe)
    _ip("netns", "del", probe)
    return None if made.returncode == 0 else f"cannot create a network namespace: {made.stderr.strip()}"


class TwoHosts:
    """Namespaces `head` and `worker`, a veth pair between them (10.213.N.1 and .2), a Ray node in each."""

    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        self.ns = {"head": f"sdft-h-{tag}", "worker": f"sdft-w-{tag}"}
        self.dev = {"head": f"sdfth{tag}", "worker": f"sdftw{tag}"}  # interface names: at most 15 characters
        net = random.randint(1, 250)
        self.ip = {"head": f"10.213.{net}.1", "worker": f"10.213.{net}.2"}
        # a Ray temp dir per host: hosts that shared one would unpack (and delete) each other's job packages
        self.temp = {host: tempfile.mkdtemp(prefix=f"sdft-2h-{host[0]}-", dir="/tmp") for host in ("head", "worker")}
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex,
                    "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)

    def exec(self, host: str, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        env = {**self.env, "GLOO_SOCKET_IFNAME": self.dev[host], **kw.pop("env", {})}
        return subprocess.run(["ip", "netns", "exec", self.ns[host], *cmd], env=env, capture_output=True, text=True,
                              cwd=ROOT, **kw)

    def __enter__(self) -> TwoHosts:
        try:
            for host in ("head", "worker"):
                assert _ip("netns", "add", self.ns[host]).returncode == 0
            assert _ip("link", "add", self.dev["head"], "type", "veth", "peer", "name", self.dev["worker"]).returncode == 0
            for host in ("head", "worker"):
                ns, dev = self.ns[host], self.dev[host]
                for args in (("link", "set", dev, "netns", ns), ("-n", ns, "addr", "add", f"{self.ip[host]}/24", "dev", dev),
                             ("-n", ns, "link", "set", dev, "up"), ("-n", ns, "link", "set", "lo", "up")):
                    r = _ip(*args)
                    assert r.returncode == 0, (args, r.stderr)
            head = self.exec("head", [str(BIN / "ray"), "start", "--head", "--node-ip-address", self.ip["head"],
                                      "--port", str(PORT), "--dashboard-host", self.ip["head"], "--dashboard-port",
                                      str(DASHBOARD), "--include-dashboard", "true", "--dashboard-agent-listen-port",
                                      str(AGENT), "--temp-dir", self.temp["head"], "--num-cpus", "1", "--resources",
                                      '{"learner_slot": 1}', "--disable-usage-stats"], timeout=180)
            assert head.returncode == 0, head.stderr[-3000:]
            worker = self.exec("worker", [str(BIN / "ray"), "start", "--address", f"{self.ip['head']}:{PORT}",
                                          "--node-ip-address", self.ip["worker"], "--temp-dir", self.temp["worker"],
                                          "--num-cpus", "2", "--resources",
                                          '{"learner_slot": 1, "worker": 1}', "--disable-usage-stats"], timeout=180)
            assert worker.returncode == 0, worker.stderr[-3000:]
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        """Stop every process of both namespaces (the Ray nodes and what they started), then remove them."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = [int(p) for ns in self.ns.values() for p in _ip("netns", "pids", ns).stdout.split()]
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            if pids:
                time.sleep(3)
        for ns in self.ns.values():
            _ip("netns", "del", ns)  # the veth pair goes with its namespaces
        for temp in self.temp.values():
            shutil.rmtree(temp, ignore_errors=True)


def _ray_list(hosts: TwoHosts, what: str) -> list[dict]:
    """`ray list actors|nodes` of the cluster, from the head (Ray's state API: dead actors included)."""
    r = hosts.exec("head", [str(BIN / "ray"), "list", what, "--address", f"http://{hosts.ip['head']}:{DASHBOARD}",
                            "--format", "json", "--detail", "--limit", "1000"], timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


@pytest.mark.slow
@pytest.mark.skipif(_cannot_make_namespaces() is not None, reason=str(_cannot_make_namespaces()))
def test_two_hosts_train_by_job_submit(tmp_path):
    """`sdft train` submitted with `ray job submit` from the head: a learner rank on each host, the engine on the
    worker, the greedy check after every sync; where each actor ran comes from Ray's state API."""
    with TwoHosts() as hosts:
        out = tmp_path / "run"
        submit = [str(BIN / "ray"), "job", "submit", "--address", f"http://{hosts.ip['head']}:{DASHBOARD}",
                  "--working-dir", str(ROOT), "--", "sdft", "train", "configs/smoke.yaml", "--output", str(out),
                  "--steps", "2", "logging.progress=false", "train.batch_size=4", "train.micro_batch_size=1",
                  "rollout.max_new_tokens=8", "data.eval_size=2", "eval.max_new_tokens=4", "ray.learner_ranks=2",
                  "ray.learner_resources={learner_slot: 1}", "ray.rollout_resources={worker: 1}",
                  "sync.check_greedy=true"]
        for _ in range(15):  # the head's job agent takes a few seconds to come up after `ray start`
            r = hosts.exec("head", submit, timeout=900)
            if "No available agent" not in r.stderr:
                break
            time.sleep(2)
        assert r.returncode == 0 and "succeeded" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in records if "loss" in r]
        assert [r["step"] for r in steps] == [1, 2]
        assert all(r["sync"]["greedy_match"] == 1.0 for r in steps)  # the engine on the worker holds the new weights
        address = {n["node_id"]: n["node_ip"] for n in _ray_list(hosts, "nodes")}
        placed = {}
        for actor in _ray_list(hosts, "actors"):
            placed.setdefault(actor["class_name"], []).append(address[actor["node_id"]])
        assert sorted(placed["Learner"]) == sorted(hosts.ip.values())  # a learner rank on each host
        assert placed["RolloutEngine"] == [hosts.ip["worker"]]
