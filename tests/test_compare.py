"""`sdft compare`: the table, results.json and the plot (fast, from a synthetic run), and a short real
SDFT run on the toy world that must raise new-skill accuracy by a clear margin (slow)."""

from __future__ import annotations

import json

import pytest

from pipeline.cli import main as cli_main
from pipeline.experiments.compare import parse_stages, plot, print_table


def _fake_results():
    def hist(a, b):
        return [{"step": s, "new_acc": a * s / 100, "prior_acc": 1 - b * s / 100} for s in (0, 50, 100)]

    return {"methods": ["sft", "sdft"], "teacher": {"new_acc": 1.0}, "base": {"new_acc": 0.0, "prior_acc": 0.97},
            "sft": {"new_acc": 0.5, "prior_acc": 0.6, "steps": 100}, "sdft": {"new_acc": 0.9, "prior_acc": 0.9,
            "steps": 100, "sets": {"paraphrased": 0.42}}, "history": {"sft": hist(0.5, 0.4), "sdft": hist(0.9, 0.1)},
            "config": {"eval": {"sets": {"paraphrased": "p.jsonl", "copy": "c.jsonl"}, "prior": ["copy"]}}}


def test_table_and_plot(tmp_path, capsys):
    r = _fake_results()
    plot(r, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    # with the forgetting monitor's records a third panel (KL to base over steps) makes the figure wider
    r["monitor"] = {m: [{"step": s, "kl_to_base": s / 1000, "general_accuracy": 0.9} for s in (0, 50, 100)]
                    for m in r["methods"]}
    plot(r, tmp_path / "m.png")
    from PIL import Image

    assert Image.open(tmp_path / "m.png").width > Image.open(tmp_path / "p.png").width
    print_table(r, "t")
    out = capsys.readouterr().out
    assert "SDFT" in out and "90.0" in out and "97.0" in out
    assert "paraphrased" in out and "42.0" in out  # a named set outside eval.prior gets its own column


def test_stage_parsing_and_bad_methods(capsys):
    assert parse_stages(["shift=a.jsonl,b.jsonl"]) == [("shift", "a.jsonl", "b.jsonl")]
    with pytest.raises(ValueError, match="NAME=TRAIN"):
        parse_stages(["shift=a.jsonl"])
    assert cli_main(["compare", "--methods", "rl"]) == 2
    assert "choose from sft, dft, sdft" in capsys.readouterr().err


@pytest.mark.slow
def test_short_sdft_run_learns_the_new_skill(tmp_path, ray_session):
    """100 SDFT steps on the toy world (frozen teacher, foreign-form demonstrations): held-out shift accuracy
    without a demonstration goes from ~0 to a clear margin; results.json has the promised keys."""
    out = tmp_path / "cmp"
    assert cli_main(["compare", "--methods", "sdft", "--output", str(out), "--steps", "100", "train.lr=1e-3",
                     "train.lr_schedule=constant", "train.warmup_steps=5", "eval.every=0", "logging.progress=false",
                     "logging.wandb=false", "data.train=configs/data/toy/shift_train.jsonl"]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["teacher"]["new_acc"] >= 0.9
    assert r["base"]["new_acc"] <= 0.05 and r["base"]["prior_acc"] >= 0.9
    assert r["sdft"]["new_acc"] >= r["base"]["new_acc"] + 0.3
    assert 0.0 <= r["sdft"]["prior_acc"] <= 1.0
    assert (out / "compare.png").exists()
    kl = [row["kl_to_base"] for row in r["monitor"]["sdft"]]  # configs/toy.yaml turns the monitor on
    assert kl[0] == pytest.approx(0, abs=1e-6) and kl[-1] > kl[0]
