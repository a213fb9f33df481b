"""teacher.placement=engines: the teacher's top-k scored by vLLM (a prefill with prompt log-probs) instead of a teacher
forward on the learner — every teacher kind, with and without LoRA, strict and async, on real Ray + vLLM + DeepSpeed."""

import json
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError

SMOKE = str(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml")
ENGINES = ("teacher.placement=engines", "teacher.check_every=1")
# teacher/logprob_gap when the engine and the learner hold the same teacher: ~1e-6 in fp32 (rounding), with headroom;
# one EMA update apart (alpha 0.5) it is ~0.8
SAME = 1e-3


# a high lr and EMA rate: the student and the EMA teacher move visibly in 3 steps
RUN = ["logging.progress=false", "logging.wandb=false", "train.steps=3", "train.batch_size=4", "train.micro_batch_size=2",
       "rollout.max_new_tokens=12", "eval.max_new_tokens=8", "checkpoint.final=false", "train.lr=2e-2",
       "train.warmup_steps=0", "teacher.ema_alpha=0.5"]


def _cfg(tmp_path, name, *overrides):
    return load_config(SMOKE, [f"output_dir={tmp_path / name}", *RUN, *overrides])


def _steps(tmp_path, name, *overrides, on_step=None) -> list[dict]:
    from pipeline.run.driver import train

    train(_cfg(tmp_path, name, *overrides), on_step=on_step)
    return [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()][1:]


def _same_first_step(engines: list[dict], learner: list[dict]) -> None:
    """Step 1 — the same completions of the same base weights on both sides — has the learner-scored loss and gradient
    norm when the engines score the full vocabulary (fp32; vLLM's CPU kernels and torch's round differently, up to 4e-5
    of the loss seen; a wrong teacher is far outside: one EMA update stale or top-20 moves it by more than 1e-2).
    Later steps are not compared: Adam at lr 2e-2 turns rounding-level gradient differences into different samples.
    There the engine's teacher is checked against the learner's own on the actual samples (teacher/logprob_gap)."""
    e, l = engines[0], learner[0]
    assert e["loss"] == pytest.approx(l["loss"], rel=1e-4) and e["kl"] > 0
    assert e["grad_norm"] == pytest.approx(l["grad_norm"], rel=1e-3)


# ---- configuration --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, words", [
    ("loss.temperature=2", "loss.temperature"),
    ("loss.divergence=reverse_kl", "loss.divergence=reverse_kl"),
    ("loss.backend=fused_linear", "loss.backend"),
    ("model.lora.target_modules=[q_proj,lm_head]", "lm_head"),
])
def test_engine_teacher_refuses_what_vllm_cannot_score(override, words):
    with pytest.raises(ConfigError, match=words):
        load_config(SMOKE, ["teacher.placement=engines", "model.lora.r=8", override])


def test_pool_only_where_the_rollout_engines_lack_the_teacher():
    def pool(*o):
        return load_config(SMOKE, ["teacher.placement=engines", *o]).teacher_pool

    assert pool("teacher.kind=ema") and pool("teacher.kind=frozen")
    assert not pool("teacher.kind=live") and not pool("teacher.kind=ema", "model.lora.r=8")
    # the baselines keep their own teacher path (sdft compare runs every method from one config)
    assert not load_config(SMOKE, ["teacher.placement=engines", "train.mode=dft"]).teacher_on_engines
    assert not load_config(SMOKE, ["teacher.placement=engines", "train.mode=sft"]).teacher_on_engines


# ---- end to end ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("kind, layout", [
    ("live", []),  # scored by the rollout engine that sampled, in the same call
    # a teacher engine of its own (0.5 CPU each for the two engines' bundles); async: the frozen teacher is the same
    # whatever the staleness, so the runs still agree step by step
    ("frozen", ["ray.rollout_cpus=0.5", "async.max_staleness=1"]),
])
def test_full_vocabulary_on_the_engines_equals_the_learners_teacher(tmp_path, ray_session, tiny_model, kind, layout):
    engines = _steps(tmp_path, "engines", f"teacher.kind={kind}", "teacher.topk=-1", *ENGINES, *layout)
    _same_first_step(engines, _steps(tmp_path, "learner", f"teacher.kind={kind}", *layout))
    for r in engines:
        assert r["teacher"]["topk_mass"] == pytest.approx(1.0, abs=1e-5)  # the full vocabulary
        assert r["teacher"]["logprob_gap"] < SAME and r["teacher"]["seconds"] > 0
        assert r["pad_fraction"] >= 0 and "teacher" not in r["timing_s"]


@pytest.mark.slow
def test_ema_teacher_pool_moves_with_phi_every_sync(tmp_path, ray_session, tiny_model):
    """Full fine-tuning: a teacher engine of its own gets phi every teacher.sync_every = 2 steps. Step 1 scores on phi_0
    as the learner does; step 2 on phi one EMA update old (the gap shows it, and the loss differs); step 3 on the
    learner's own phi again, pushed after step 2."""
    engines = _steps(tmp_path, "engines", "teacher.kind=ema", "teacher.topk=-1", "teacher.sync_every=2",
                     "ray.rollout_cpus=0.5", *ENGINES)
    learner = _steps(tmp_path, "learner", "teacher.kind=ema")
    _same_first_step(engines, learner)
    gaps = [r["teacher"]["logprob_gap"] for r in engines]
    assert gaps[0] < SAME and gaps[2] < SAME and gaps[1] > 10 * SAME, gaps  # stale: 0.79 seen
    assert engines[1]["loss"] != pytest.approx(learner[1]["loss"], rel=1e-4)


@pytest.mark.slow
def test_lora_ema_adapter_on_the_engines_equals_the_learners(tmp_path, ray_session, tiny_model):
    """LoRA: the EMA adapter travels with the student's, served as a second adapter on the rollout engines."""
    engines = _steps(tmp_path, "engines", "teacher.kind=ema", "model.lora.r=8", "teacher.topk=-1", *ENGINES)
    _same_first_step(engines, _steps(tmp_path, "learner", "teacher.kind=ema", "model.lora.r=8"))
    assert all(r["teacher"]["logprob_gap"] < SAME for r in engines)


@pytest.mark.slow
def test_lora_frozen_top_k_async(tmp_path, ray_session, tiny_model):
    """LoRA frozen teacher (the engines' base), top-5 with the tail bucket, async: the engine's teacher is the learner's
    base, and the top-5 hold part of the mass only."""
    engines = _steps(tmp_path, "engines", "teacher.kind=frozen", "model.lora.r=8", "teacher.topk=5",
                     "async.max_staleness=1", *ENGINES)
    for r in engines:
        assert r["teacher"]["logprob_gap"] < SAME
        assert 0 < r["teacher"]["topk_mass"] < 1 and r["kl"] > 0 and r["loss"] == r["loss"]
    assert max(r["rollout"]["staleness_max"] for r in engines) == 1


@pytest.mark.slow
def test_pool_with_two_zero3_ranks_and_two_engines_resumes_exactly(tmp_path, ray_session, tiny_model):
    """The EMA teacher pool next to 2 ZeRO-3 learner ranks and 2 rollout engines. The pool engine is killed after step
    1: it restarts, gets the current phi and scores step 2 again (the gap stays at rounding). A run resumed from the
    step-2 checkpoint brings the pool to the checkpoint's phi and computes step 3 as the uninterrupted run did."""
    import os
    import shutil
    import signal

    from pipeline.cli import main as cli_main

    def kill_teacher_engine(step, actors):
        if step == 1:
            os.kill(ray_session.get(actors.teachers[0].node.remote())["pid"], signal.SIGKILL)

    layout = ["teacher.kind=ema", "teacher.topk=-1", *ENGINES, "ray.learner_ranks=2", "train.zero_stage=3",
              "rollout.num_engines=2", "ray.learner_cpus=0.5", "ray.rollout_cpus=0.25"]
    straight = _steps(tmp_path, "straight", *layout, "checkpoint.every=2", "checkpoint.keep_last=3",
                      on_step=kill_teacher_engine)
    assert all(r["teacher"]["logprob_gap"] < SAME for r in straight)
    assert straight[-1]["rollout"]["engine_restarts"] >= 1

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight", resumed, ignore=shutil.ignore_patterns("step_000003", "wandb"))
    lines = (resumed / "metrics.jsonl").read_text().splitlines()[:3]  # steps 0-2: stopped after the checkpoint
    (resumed / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert cli_main(["train", "--resume", "--output", str(resumed), SMOKE, *RUN, *layout]) == 0
    got = [json.loads(l) for l in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got] == [0, 1, 2, 3]
    assert got[3]["loss"] == pytest.approx(straight[2]["loss"], rel=1e-6, abs=1e-9)
    assert got[3]["teacher"]["logprob_gap"] < SAME
