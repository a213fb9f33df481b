"""End to end on real components: Ray actors, vLLM (CPU) rollouts, a DeepSpeed learner, weight sync."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.cli import main as cli_main
from pipeline.config import load_config
from pipeline.run.driver import train

SMOKE = str(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml")  # the tiny-model smoke config

pytestmark = pytest.mark.slow

TIMINGS = ("rollout", "learner", "sync")


def _cfg(tmp_path, *overrides):
    return load_config(SMOKE, [f"output_dir={tmp_path}", "logging.progress=false", "train.batch_size=4",
                               "train.micro_batch_size=2", "rollout.max_new_tokens=12", "eval.max_new_tokens=8",
                               *overrides])


def _records(out) -> list[dict]:
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _hf_greedy(folder, prompts, n=8):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        out.append(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                  pad_token_id=0)[0, len(p):].tolist())
    return out


def test_sdft_steps_sync_every_step_and_log(tmp_path, ray_session, tiny_model):
    # lr high enough that a few steps change the greedy output: the sync check then has something to catch.
    cfg = _cfg(tmp_path, "train.steps=3", "train.lr=2e-2", "train.warmup_steps=0", "sync.check_greedy=true",
               "loss.backend=triton", "eval.every=2")
    summary = train(cfg)

    records = _records(tmp_path)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert "accuracy" in records[0]["eval"] and "accuracy" in records[2]["eval"] and "accuracy" in records[3]["eval"]
    for r in records[1:]:
        for key in ("loss", "kl", "is_weight_mean", "is_weight_min", "is_weight_max", "grad_norm", "lr"):
            assert isinstance(r[key], float) and r[key] == r[key], key  # present and not NaN
        assert set(TIMINGS) <= set(r["timing_s"]) and all(r["timing_s"][k] > 0 for k in TIMINGS)
        assert r["sync"]["greedy_match"] == 1.0 and r["sync"]["bytes"] > 0
        assert 0 < r["sync"]["transport_s"] < r["sync"]["seconds"] and 0 < r["sync"]["load_s"] < r["sync"]["seconds"]
        assert r["rollout"]["tokens"] > 0 and r["kl"] > 0
        assert 0.5 < r["is_weight_mean"] <= 2.0  # vLLM and the learner agree closely on fp32 CPU

    ckpt = Path(summary["checkpoint"])
    base, student = load_file(f"{tiny_model}/model.safetensors"), load_file(ckpt / "model" / "model.safetensors")
    teacher = load_file(ckpt / "teacher.safetensors")
    k = "model.layers.0.mlp.down_proj.weight"
    moved = (student[k] - base[k]).abs().max()
    assert moved > 1e-3  # the student trained
    # EMA teacher: after 3 steps at alpha=0.01 it moved, but about 100x less than the student
    t_moved = (teacher[k] - base[k]).abs().max()
    assert 0 < t_moved < moved / 10
    prompts = [[1, 87, 85, 263, 201], [1, 67, 85, 85, 275]]
    assert _hf_greedy(tiny_model, prompts) != _hf_greedy(ckpt / "model", prompts)  # greedy output did change


def test_sft_steps(tmp_path, ray_session, tiny_model):
    """SFT pushes its weights only when an eval needs them (nothing samples in between): the engines hold version 0
    after step 1, the student's after the eval of step 2 and of the end."""
    cfg = _cfg(tmp_path, "train.mode=sft", "train.steps=3", "train.lr=1e-2", "eval.every=2")
    held = {}
    summary = train(cfg, on_step=lambda step, actors: held.update(
        {step: ray_session.get(actors.engines[0].node.remote())["weight_version"]}))
    records = _records(tmp_path)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert held == {1: 0, 2: 2, 3: 3}
    assert all(r["sync"] == {} and r["loss"] > 0 for r in records[1:])
    assert records[3]["loss"] < records[1]["loss"]  # NLL on the demonstrations goes down
    base = load_file(f"{tiny_model}/model.safetensors")
    student = load_file(Path(summary["checkpoint"]) / "model" / "model.safetensors")
    assert not torch.equal(base["model.embed_tokens.weight"], student["model.embed_tokens.weight"])
    assert not (Path(summary["checkpoint"]) / "teacher.safetensors").exists()  # SFT has no teacher


def test_resume_continues_exactly(tmp_path, ray_session, capsys):
    straight = tmp_path / "straight"
    train(_cfg(straight, "train.steps=4", "checkpoint.every=2", "checkpoint.keep_last=3"))
    want = [r["loss"] for r in _records(straight)[1:]]
    assert len(want) == 4

    # A run that stopped right after its step-2 checkpoint: same folder minus everything later.
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed, ignore=shutil.ignore_patterns("step_000004", "wandb"))
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    (resumed / "metrics.jsonl").write_text("\n".join(lines + ['{"step": 3, "loss": -1.0}']) + "\n")  # stale line
    assert cli_main(["train", "--output", str(resumed), "--steps", "4", "--resume", SMOKE, "logging.progress=false",
                     "train.batch_size=4", "train.micro_batch_size=2", "rollout.max_new_tokens=12",
                     "eval.max_new_tokens=8"]) == 0
    got = [r["loss"] for r in _records(resumed) if "loss" in r]
    assert [r["step"] for r in _records(resumed)] == [0, 1, 2, 3, 4]
    assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert (resumed / "step_000004" / "model" / "config.json").exists()
    assert not list(resumed.glob(".step_*"))  # no temp folders left behind

    capsys.readouterr()
    assert cli_main(["eval", str(resumed / "step_000004")]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):])
    assert result["num_examples"] == 8 and 0.0 <= result["accuracy"] <= 1.0
    assert result["accuracy"] == pytest.approx(_records(resumed)[-1]["eval"]["accuracy"])
