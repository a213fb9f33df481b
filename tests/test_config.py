import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import TEACHER_TEMPLATE, ConfigError, load_config

SMOKE = str(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml")  # the tiny-model smoke config
ROOT = Path(__file__).resolve().parent.parent


def test_default_config_follows_spec_defaults():
    cfg = load_config(SMOKE)
    assert cfg.teacher.kind == "ema" and cfg.teacher.ema_alpha == 0.01
    assert cfg.loss.divergence == "forward_kl" and cfg.loss.is_cap == 2.0
    assert cfg.rollout.temperature == 1.0 and cfg.rollout.top_p == 1.0 and cfg.rollout.samples_per_prompt == 1
    assert cfg.train.grad_clip == 1.0 and cfg.train.weight_decay == 0.0 and cfg.train.lr_schedule == "cosine"
    assert cfg.data.teacher_template == TEACHER_TEMPLATE


def test_every_shipped_config_validates():
    files = sorted((ROOT / "configs").glob("*.yaml"))
    assert files
    for f in files:
        load_config(f)


def test_dotted_overrides_are_typed(tmp_path):
    cfg = load_config(SMOKE, ["train.lr=1e-5", "rollout.max_new_tokens=64", "teacher.kind=frozen", "data.eval=null"])
    assert cfg.train.lr == 1e-5 and cfg.rollout.max_new_tokens == 64 and cfg.teacher.kind == "frozen"
    assert cfg.data.eval is None


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_unknown_key_names_file_and_key(tmp_path):
    p = _write(tmp_path, "train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "train.lrr" in str(e.value) and "unknown key" in str(e.value)


def test_wrong_type_names_key(tmp_path):
    p = _write(tmp_path, "train:\n  batch_size: many\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "train.batch_size" in str(e.value) and "'many'" in str(e.value)


def test_unknown_override_key():
    with pytest.raises(ConfigError, match="loss.divergense"):
        load_config(SMOKE, ["loss.divergense=jsd"])


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_incompatible_options_rejected():
    with pytest.raises(ConfigError, match="multiple of train.micro_batch_size"):
        load_config(SMOKE, ["train.batch_size=6", "train.micro_batch_size=4"])
    with pytest.raises(ConfigError, match="zero_stage"):
        load_config(SMOKE, ["loss.backend=fused_linear", "train.zero_stage=3"])


def test_ipc_with_zero3_over_several_ranks_is_rejected_before_ray_starts():
    """ipc shares the whole model from rank 0's memory, which ZeRO-3 over several ranks does not hold."""
    ranks = ["train.batch_size=8", "train.micro_batch_size=2", "train.zero_stage=3"]
    with pytest.raises(ConfigError, match="sync.backend=ipc shares the whole model"):
        load_config(SMOKE, [*ranks, "ray.learner_ranks=2", "sync.backend=ipc"])
    for ok in (["ray.learner_ranks=1", "sync.backend=ipc"], ["ray.learner_ranks=2", "sync.backend=nccl"],
               ["ray.learner_ranks=2", "sync.backend=auto"]):
        load_config(SMOKE, [*ranks, *ok])
    load_config(SMOKE, ["train.batch_size=8", "train.micro_batch_size=2", "train.zero_stage=2", "ray.learner_ranks=2",
                        "sync.backend=ipc"])


def test_cli_reports_config_error_without_traceback(tmp_path):
    p = _write(tmp_path, "train:\n  lrr: 0.1\n")
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", str(p)], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 2
    assert "train.lrr" in r.stderr and "Traceback" not in r.stderr


def test_cli_help_explains_commands():
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", "--help"], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 0
    for flag in ("--output", "--steps", "--resume", "key=value"):
        assert flag in r.stdout


def test_batch_must_split_over_learner_ranks():
    with pytest.raises(ConfigError, match="cannot be split into 3 learner rank"):
        load_config(SMOKE, ["train.batch_size=8", "train.micro_batch_size=2", "ray.learner_ranks=3"])
    cfg = load_config(SMOKE, ["train.batch_size=8", "train.micro_batch_size=2", "ray.learner_ranks=2",
                              "rollout.samples_per_prompt=2"])
    assert cfg.sequences_per_step == 16


def test_thread_counts_per_phase():
    """Each role's own CPUs, except strict mode on one CPU-only node: every CPU of the run, split among the role's
    processes; the ray.*_threads keys override, and learners given more threads than the cores left to them next to
    running engines (async, one node) wait passively."""
    from actors.launcher import thread_counts

    def counts(*overrides, gpu=False, nodes=1):
        return thread_counts(load_config(SMOKE, list(overrides)), gpu, nodes)

    assert counts() == (2, 2, False)  # 1 learner CPU + 1 engine CPU, taking turns
    assert counts("async.max_staleness=1") == (1, 1, False)  # they overlap: a core each
    assert counts("async.max_staleness=1", "ray.learner_threads=2") == (2, 1, True)  # the learner shares the engine's
    assert counts(gpu=True) == (1, 1, False) and counts(nodes=2) == (1, 1, False)
    assert counts("async.max_staleness=1", gpu=True) == (1, 1, False)
    assert counts("ray.learner_ranks=2", "train.batch_size=8", "rollout.num_engines=2",
                  "ray.learner_cpus=2") == (3, 3, False)
    assert counts("ray.learner_threads=1", "ray.rollout_threads=3") == (1, 3, False)


def test_loss_backend_auto_is_triton_on_cuda_and_torch_elsewhere():
    cfg = load_config(SMOKE)
    assert cfg.loss.backend == "auto"
    assert cfg.loss.resolved_backend(on_gpu=True) == "triton" and cfg.loss.resolved_backend(on_gpu=False) == "torch"
    topk = load_config(SMOKE, ["loss.divergence=topk"])
    assert topk.loss.resolved_backend(on_gpu=True) == "torch"  # implemented in torch only
    assert load_config(SMOKE, ["loss.backend=fused_linear"]).loss.resolved_backend(on_gpu=False) == "fused_linear"
