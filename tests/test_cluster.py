"""Multi-node placement on simulated nodes, `ray job submit` against a loopback head, the cluster file."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from actors.net import free_port

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "smoke.yaml"
BIN = Path(sys.executable).parent


def test_ray_cluster_file_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    validate_config(prepare_config(config))  # fills the provider defaults, raises on schema errors
    gpu_workers = [t for t in config["available_node_types"].values() if t.get("min_workers", 0) >= 1]
    assert gpu_workers and config["head_node_type"] in config["available_node_types"]
    assert any('".[gpu]"' in c for c in config["setup_commands"])  # installs the project with the gpu extra
    assert {".venv", ".cache", "runs"} <= set(config["rsync_exclude"])


@pytest.mark.slow
def test_actors_land_on_the_nodes_placement_asks_for(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "multinode_run.py"), str(SMOKE), str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=ROOT, timeout=900)
    lines = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stderr[-3000:]
    res = json.loads(lines[-1].removeprefix("RESULT "))
    assert res["learners"] == [res["learner_node"]]
    assert res["engines"] == [res["rollout_node"]]
    assert res["steps"] == 2 and Path(res["checkpoint"], "model", "model.safetensors").exists()


def _ray_processes(temp_dir: str) -> list[int]:
    """PIDs of the Ray processes of the head started with `temp_dir` (and nothing else on the machine)."""
    import psutil

    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in part for part in (p.info["cmdline"] or [])):
                pids.append(p.info["pid"])
        except psutil.Error:
            continue
    return pids


def _stop(pids: list[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(2)


def _namespaces() -> bool:
    from test_two_hosts import _cannot_make_namespaces

    return _cannot_make_namespaces() is None


@pytest.mark.slow
@pytest.mark.skipif(_namespaces(), reason="tests/test_two_hosts.py submits the job to a real two-host cluster here")
def test_ray_job_submit_trains(tmp_path):
    """`ray job submit` against a loopback head, where two hosts cannot be made (network namespaces need root)."""
    temp = tempfile.mkdtemp(prefix="sdft-head-", dir="/tmp")
    port, dash, agent = free_port(), free_port(), free_port()
    # Ray 2.60 turns token auth on for new clusters: the client needs the same token and RAY_AUTH_MODE=token.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex,
           "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # connect on loopback as given, not via the host address
    env.pop("RAY_ADDRESS", None)
    subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                    "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
                    "--dashboard-agent-listen-port", str(agent),
                    "--temp-dir", temp, "--num-cpus", "2", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=180)
    out = tmp_path / "job-out"
    submit = [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(ROOT),
              "--", "sdft", "train", "configs/smoke.yaml", "--output", str(out), "--steps", "2",
              "logging.progress=false", "train.batch_size=4", "train.micro_batch_size=2", "rollout.max_new_tokens=8",
              "data.eval_size=2", "eval.max_new_tokens=4"]
    try:
        for _ in range(15):  # the head's job agent takes a few seconds to come up after `ray start`
            r = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
            if "No available agent" not in r.stderr:
                break
            time.sleep(2)
        assert r.returncode == 0 and "succeeded" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]
        records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        assert [x["step"] for x in records if "loss" in x] == [1, 2]
        assert (out / "step_000002" / "model" / "config.json").exists()
    finally:
        _stop(_ray_processes(temp))
        assert not _ray_processes(temp)
