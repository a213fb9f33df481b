"""The DeepSpeed learner on its own (Ray actors, no vLLM): ZeRO stages and loss backends agree."""

import math
from pathlib import Path

import pytest
import torch

from actors.net import free_port
from actors.learner import Learner
from actors.weight_sync import LEARNER_CONCURRENCY, SYNC_GROUP
from actors.weight_sync.object_store import bucket_tensors
from pipeline.config import load_config
from samples import learner_samples

SMOKE = str(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml")  # the tiny-model smoke config


pytestmark = pytest.mark.slow


def _export(ray, actor, version=0, **options) -> dict:
    """The learner's full weights, read through the object-store export (`options`: e.g. its concurrency group)."""
    stream = actor.export_weights.options(num_returns="streaming", **options).remote(version)
    return dict(t for ref in stream for t in bucket_tensors(ray.get(ref)))


def _run(ray, model, *overrides, steps=2):
    cfg = load_config(SMOKE, ["train.batch_size=4", "train.micro_batch_size=2", "train.lr=1e-2", "train.warmup_steps=0",
                              "loss.skip_first_tokens=1", *overrides])
    actor = ray.remote(Learner).options(num_cpus=1, runtime_env={"env_vars": {"TRITON_INTERPRET": "1"}}).remote(
        cfg, model, 10, master_port=free_port())
    try:
        metrics = [ray.get(actor.step.remote(learner_samples())).as_dict() for _ in range(steps)]
        ray.get(actor.open_weight_sync.remote("object_store", None))
        return metrics, _export(ray, actor)
    finally:
        ray.kill(actor)


def _close(a, b, tol):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=tol, rtol=tol), k


def test_zero_stages_train_the_same(ray_session, tiny_model):
    base_metrics, base_weights = _run(ray_session, tiny_model, "train.zero_stage=0")
    assert base_metrics[1]["loss"] != base_metrics[0]["loss"]
    assert all(m["grad_norm"] > 0 for m in base_metrics)
    for stage in (2, 3):
        metrics, weights = _run(ray_session, tiny_model, f"train.zero_stage={stage}")
        assert [m["loss"] for m in metrics] == pytest.approx([m["loss"] for m in base_metrics], rel=1e-4)
        # ZeRO-3: every rank's shard, without its padding, makes up the same norm
        assert [m["param_norm"] for m in metrics] == pytest.approx([m["param_norm"] for m in base_metrics], rel=1e-5)
        _close(weights, base_weights, 1e-4)  # ZeRO-3: gathered full weights come out


def test_a_blown_up_update_shows_in_the_parameter_norm(ray_session, tiny_model):
    """train.lr=1e6 (whose later steps were finite with loss and gradient 0): the norm train.max_param_growth bounds
    grows by orders of magnitude at once, where lr=1e-2 moves it by a few percent."""
    (sane,), _ = _run(ray_session, tiny_model, steps=1)
    (blown,), _ = _run(ray_session, tiny_model, "train.lr=1e6", steps=1)
    assert math.isfinite(blown["param_norm"]) and blown["param_norm"] > 100 * sane["param_norm"]


def test_loss_backends_agree(ray_session, tiny_model):
    torch_m, torch_w = _run(ray_session, tiny_model, "loss.backend=torch", steps=1)
    for backend in ("triton", "fused_linear"):
        m, w = _run(ray_session, tiny_model, f"loss.backend={backend}", "loss.chunk_size=7", steps=1)
        assert m[0]["loss"] == pytest.approx(torch_m[0]["loss"], rel=1e-5)
        assert m[0]["is_weight_mean"] == pytest.approx(torch_m[0]["is_weight_mean"], rel=1e-5)
        # Adam's first step is ~lr * g / |g|: on embedding rows whose gradient is ~1e-8 the last bits of g decide
        # the update, so weights agree to 1 % of one step (lr = 1e-2), not to float32 precision.
        _close(w, torch_w, 1e-4)


@pytest.mark.parametrize("stage", [0, 2])
def test_on_nonfinite_skip_leaves_the_weights_and_training_goes_on(ray_session, tiny_model, stage):
    """A step whose loss and gradients are NaN (NaN sampling logprobs make the IS weight NaN) changes nothing
    under train.on_nonfinite=skip; the next good step trains as usual."""
    import dataclasses

    cfg = load_config(SMOKE, ["train.batch_size=4", "train.micro_batch_size=2", "train.lr=1e-2", "train.warmup_steps=0",
                              f"train.zero_stage={stage}", "train.on_nonfinite=skip"])
    actor = ray_session.remote(Learner).options(num_cpus=1).remote(cfg, tiny_model, 10,
                                                                  master_port=free_port())

    def weights():
        return _export(ray_session, actor)

    try:
        ray_session.get(actor.open_weight_sync.remote("object_store", None))
        good = learner_samples()
        bad = [dataclasses.replace(s, logprobs=[float("nan")] * len(s.logprobs)) for s in good]
        before = weights()
        skipped = ray_session.get(actor.step.remote(bad))
        assert skipped.skipped == 1 and skipped.loss != skipped.loss  # NaN, and not applied
        _close(weights(), before, 0.0)
        trained = ray_session.get(actor.step.remote(good))
        assert trained.skipped == 0 and trained.finite()
        after = weights()
        assert any(not torch.equal(after[k], before[k]) for k in before)
        assert all(torch.isfinite(v).all() for v in after.values())
    finally:
        ray_session.kill(actor)


def test_export_runs_next_to_a_step_whose_update_waits_for_it(ray_session, tiny_model):
    """Async mode's second buffer: the export of version v runs in the learner's `sync` concurrency group while a
    step called with hold=v runs; that step's update waits until the export is done, so the exported weights are
    the ones before the step."""
    cfg = load_config(SMOKE, ["train.batch_size=4", "train.micro_batch_size=2", "train.lr=1e-2", "train.warmup_steps=0"])
    actor = ray_session.remote(concurrency_groups=LEARNER_CONCURRENCY)(Learner).options(num_cpus=1).remote(
        cfg, tiny_model, 10, master_port=free_port())
    try:
        ray_session.get(actor.open_weight_sync.remote("object_store", None))
        before = {k: v.clone() for k, v in _export(ray_session, actor).items()}
        step = actor.step.remote(learner_samples(), hold=1)
        ready, _ = ray_session.wait([step], timeout=5)
        assert not ready  # forward and backward done, the update held: version 1 is not exported yet
        exported = _export(ray_session, actor, 1, concurrency_group=SYNC_GROUP)  # runs while the step waits
        _close(exported, before, 0.0)
        assert ray_session.get(step, timeout=60).finite()
        after = _export(ray_session, actor)
        assert any(not torch.equal(after[k], before[k]) for k in before)  # then the update was applied
    finally:
        ray_session.kill(actor)
