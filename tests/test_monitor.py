"""Forgetting monitor and teacher gate: the KL to the base against a direct float64 computation, the gate on the toy
world (passes) and on noise demonstrations (stops), monitor.max_kl stopping with a checkpoint, and bad configs."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipeline.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
TOY = str(ROOT / "configs" / "toy.yaml")
SMOKE = str(ROOT / "configs" / "smoke.yaml")
# Short toy runs: few eval rows, one small batch per step, no wandb.
FAST = ["logging.progress=false", "logging.wandb=false", "data.eval_size=4", "eval.size=4", "eval.every=0",
        "train.batch_size=8", "train.micro_batch_size=8", "gate.size=16"]


def _direct_kl(student, base, sequences, base_contexts=None) -> float:
    """Mean per-token KL(base || student), one unpadded sequence at a time, in the models' own dtype."""
    total, n = 0.0, 0
    with torch.no_grad():
        for i, (p, a) in enumerate(sequences):
            c = base_contexts[i] if base_contexts else p
            ls = torch.log_softmax(student(torch.tensor([p + a])).logits[0, len(p) - 1 : -1], -1)
            lb = torch.log_softmax(base(torch.tensor([c + a])).logits[0, len(c) - 1 : -1], -1)
            total += (lb.exp() * (lb - ls)).sum().item()
            n += len(a)
    return total / n


def _records(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


# ---- configuration (no Ray) --------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, key", [
    (["monitor.enabled=true"], "monitor.enabled needs monitor.data"),
    (["monitor.enabled=true", "monitor.data=configs/data/toy/copy_eval.jsonl", "monitor.every=0"], "monitor.every"),
    (["monitor.max_kl=0"], "monitor.max_kl"),
    (["gate.size=0"], "gate.size"),
    (["gate.min_margin=-0.1"], "gate.min_margin"),
])
def test_bad_monitor_or_gate_config_is_one_clear_error(overrides, key):
    with pytest.raises(ConfigError, match="invalid configuration") as e:
        load_config(SMOKE, overrides)
    problems = str(e.value).splitlines()[1:]
    assert len(problems) == 1 and key in problems[0]


def test_monitor_data_is_one_source_or_several():
    one = load_config(SMOKE, ["monitor.enabled=true", "monitor.data=configs/data/toy/copy_eval.jsonl"]).monitor
    assert one.data == ["configs/data/toy/copy_eval.jsonl"]
    assert load_config(TOY).monitor.enabled and len(load_config(TOY).monitor.data) == 3  # the prior skills
    assert not load_config(SMOKE).gate.enabled and load_config(TOY).gate.enabled


# ---- the shared KL computation (no Ray) ----------------------------------------------------------------------------
def test_token_kl_sum_matches_a_direct_computation(tiny_model):
    from transformers import AutoModelForCausalLM

    from actors.forward import completion_logits
    from actors.forward import token_kl_sum

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64).eval()
    student = copy.deepcopy(base)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    rng = random.Random(0)
    seqs = [([1] + [rng.randrange(3, 300) for _ in range(rng.randrange(2, 9))],
             [rng.randrange(3, 300) for _ in range(rng.randrange(1, 7))]) for _ in range(5)]
    seqs.append(([1, 5, 6], []))  # an empty answer has no token: skipped
    contexts = [[1, 9, 9, 9] + p[1:] for p, _ in seqs]

    def base_logits(x, y):
        return completion_logits(base, x, y, 0)

    for ctx in (None, contexts):  # the base behind the same prompts, or behind contexts of its own (the gate)
        total, count = token_kl_sum(student, base_logits, seqs, 0, chunk=2, base_contexts=ctx)  # padded chunks
        assert count == sum(len(a) for _, a in seqs)
        # float64 forwards; the KL itself accumulates in float32 (kernels.reference)
        assert total / count == pytest.approx(_direct_kl(student, base, seqs[:-1], ctx), rel=1e-6)
        assert total / count > 1e-3
    same, _ = token_kl_sum(base, base_logits, seqs, 0, chunk=4)
    assert same == pytest.approx(0.0, abs=1e-12)


# ---- end to end on the toy world -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def limited_run(tmp_path_factory, ray_session):
    """toy.yaml with an EMA teacher (the base is then a CPU copy on the learner after step 1) and monitor.max_kl
    tiny: the gate passes, step 1 crosses the limit, the run stops with a checkpoint. Through the CLI: exit code and
    message as a user sees them."""
    from pipeline.cli import main as cli_main

    out = tmp_path_factory.mktemp("limited")
    overrides = [*FAST, "teacher.kind=ema", "train.lr=1e-3", "train.warmup_steps=0", "monitor.every=1",
                 "monitor.size=24", "monitor.max_kl=1e-9"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli_main(["train", TOY, "--output", str(out), "--steps", "3", *overrides])
    return SimpleNamespace(out=out, rc=rc, err=err.getvalue(), cfg=load_config(TOY, [f"output_dir={out}", *overrides]))


@pytest.mark.slow
def test_max_kl_stops_with_a_checkpoint_and_one_line(limited_run):
    assert limited_run.rc == 1
    lines = [l for l in limited_run.err.splitlines() if l.startswith("sdft:")]
    ckpt = limited_run.out / "step_000001"
    assert len(lines) == 1 and lines[0].startswith("sdft: run failed: forgetting limit: after step 1")
    assert "monitor.max_kl=1e-09" in lines[0] and str(ckpt) in lines[0] and lines[0].endswith("--resume`.")
    assert (ckpt / "model" / "config.json").exists() and (ckpt / "trainer_state.json").exists()
    assert sorted(_records(limited_run.out)) == [0, 1]  # nothing after the step that crossed


@pytest.mark.slow
def test_gate_passes_on_the_toy_world_and_is_logged(limited_run):
    from pipeline.run.tracking import _flatten

    start = _records(limited_run.out)[0]
    g = start["gate"]
    assert g["passed"] == 1.0 and g["rows"] == 16
    assert g["teacher_accuracy"] >= 0.9 and g["teacher_accuracy"] >= g["student_accuracy"] + 0.2
    assert g["teacher_student_kl"] > 0.1  # the demonstration changes the distribution
    flat = _flatten(start)
    for key in ("gate/teacher_accuracy", "gate/student_accuracy", "gate/teacher_student_kl", "monitor/kl_to_base",
                "monitor/general_accuracy"):
        assert key in flat


@pytest.mark.slow
def test_monitor_kl_is_zero_at_start_and_matches_a_direct_computation(limited_run):
    from transformers import AutoModelForCausalLM

    from pipeline.models import resolve_model

    records = _records(limited_run.out)
    assert records[0]["monitor"]["kl_to_base"] == pytest.approx(0.0, abs=1e-7)
    assert records[0]["monitor"]["general_accuracy"] >= 0.9  # the base knows its prior skills
    kl = records[1]["monitor"]["kl_to_base"]
    assert kl > 1e-9
    saved = json.loads((limited_run.out / "monitor_base.json").read_text())
    assert len(saved["prompts"]) == 24 and all(saved["answers"])
    base = AutoModelForCausalLM.from_pretrained(resolve_model("toy:base"), dtype=torch.float64).eval()
    student = AutoModelForCausalLM.from_pretrained(limited_run.out / "step_000001" / "model",
                                                   dtype=torch.float64).eval()
    want = _direct_kl(student, base, list(zip(saved["prompts"], saved["answers"])))
    assert kl == pytest.approx(want, rel=1e-3, abs=1e-8)  # the learner works in float32


@pytest.mark.slow
def test_resume_reuses_the_saved_base_answers(limited_run):
    """On resume the engines no longer hold the base: the answers come from monitor_base.json, not from them."""
    from transformers import AutoTokenizer

    from pipeline.models import resolve_model
    from pipeline.experiments.monitor import ForgettingMonitor

    tok = AutoTokenizer.from_pretrained(resolve_model("toy:base"))
    mon = ForgettingMonitor(limited_run.cfg, tok)
    mon.start(SimpleNamespace(engines=[], learners=[]), limited_run.out, resume=True)  # generating would fail
    saved = json.loads((limited_run.out / "monitor_base.json").read_text())
    assert mon.sequences == list(zip(saved["prompts"], saved["answers"]))


@pytest.mark.slow
def test_gate_stops_a_run_whose_demonstrations_are_noise(tmp_path, ray_session):
    from pipeline.run.driver import train
    from pipeline.experiments.gate import TeacherGateFailed

    rng = random.Random(0)
    rows = [json.loads(l) for l in (ROOT / "configs/data/toy/shift_train.jsonl").read_text().splitlines()][:64]
    for r in rows:  # a demonstration of the right form whose letters are random: nothing in it helps
        r["demonstration"] = "-".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in r["answer"])
    data = tmp_path / "noise.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    cfg = load_config(TOY, [f"output_dir={out}", *FAST, f"data.train={data}", "eval.sets={}", "eval.prior=[]",
                            "monitor.enabled=false"])
    with pytest.raises(TeacherGateFailed) as e:
        train(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "cannot use the demonstrations" in msg and "gate.enforce=false" in msg
    g = _records(out)[0]["gate"]
    assert g["passed"] == 0.0 and g["teacher_accuracy"] <= g["student_accuracy"]
    assert not list(out.glob("step_*"))  # stopped before step 1
