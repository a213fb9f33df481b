"""`sdft compare`: the table, results.json and the plot (fast, from a synthetic run), and a short real
SDFT run on the toy world that must raise new-skill accuracy by a clear margin (slow)."""

from __future__ import annotations

import json

import pytest

from pipeline.cli import main as cli_main
from pipeline.experiments.compare import parse_stages, plot, print_paper_table, print_table


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


def test_paper_layout(tmp_path, capsys):
    """With the lm-evaluation-harness suite: the paper's Table 5 layout (new task, each prior benchmark, their
    average; base included) and a fourth panel, new task against the prior average."""
    r = _fake_results()
    plot(r, tmp_path / "p.png")
    for row, (h, i, avg) in (("base", (0.60, 0.70, 0.65)), ("sft", (0.50, 0.62, 0.56)), ("sdft", (0.59, 0.70, 0.645))):
        r[row].update(prior_suite={"hellaswag": h, "ifeval": i}, prior_average=avg)
    plot(r, tmp_path / "s.png")
    from PIL import Image

    assert Image.open(tmp_path / "s.png").width > Image.open(tmp_path / "p.png").width
    print_paper_table(r)
    lines = capsys.readouterr().out.splitlines()
    row = {name: next(line for line in lines if line.lstrip("│ ").startswith(name)) for name in ("base", "SFT", "SDFT")}
    assert "hellaswag" in "".join(lines) and "ifeval" in "".join(lines)
    assert ["0.0", "60.0", "70.0", "65.0"] == row["base"].replace("│", " ").split()[1:]
    assert ["50.0", "50.0", "62.0", "56.0"] == row["SFT"].replace("│", " ").split()[1:]
    assert ["90.0", "59.0", "70.0", "64.5"] == row["SDFT"].replace("│", " ").split()[1:]


def test_stage_parsing_and_bad_methods(capsys):
    assert parse_stages(["shift=a.jsonl,b.jsonl"]) == [("shift", "a.jsonl", "b.jsonl")]
    with pytest.raises(ValueError, match="NAME=TRAIN"):
        parse_stages(["shift=a.jsonl"])
    assert cli_main(["compare", "--methods", "rl"]) == 2
    assert "choose from sft, dft, sdft" in capsys.readouterr().err


def _toy_reverse_task(folder) -> str:
    """The toy world's reverse skill as an lm-evaluation-harness task (greedy generation, exact match)."""
    from pathlib import Path

    data = Path(__file__).resolve().parent.parent / "configs" / "data" / "toy" / "reverse_eval.jsonl"
    folder.mkdir()
    (folder / "toy_reverse.yaml").write_text(
        f"task: toy_reverse\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: []\n  max_gen_toks: 16\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
    return str(folder)


@pytest.mark.slow
def test_short_sdft_run_learns_the_new_skill(tmp_path, ray_session, capsys):
    """100 SDFT steps on the toy world (frozen teacher, foreign-form demonstrations): held-out shift accuracy
    without a demonstration goes from ~0 to a clear margin; results.json has the promised keys. The prior skill
    `reverse` is also an lm-evaluation-harness task (eval.lm_eval) run on the engines: before and after training it
    scores exactly what the built-in eval scores on the same prompts and weights, and lands in the paper's layout."""
    out = tmp_path / "cmp"
    assert cli_main(["compare", "--methods", "sdft", "--output", str(out), "--steps", "100", "train.lr=1e-3",
                     "train.lr_schedule=constant", "train.warmup_steps=5", "eval.every=0", "logging.progress=false",
                     "logging.wandb=false", "data.train=configs/data/toy/shift_train.jsonl",
                     "eval.lm_eval.tasks=[toy_reverse]", f"eval.lm_eval.include_path={_toy_reverse_task(tmp_path / 't')}",
                     "eval.lm_eval.apply_chat_template=true", "eval.lm_eval.every=50"]) == 0
    r = json.loads((out / "results.json").read_text())
    records = [json.loads(line) for line in (out / "sdft" / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in records if "lm_eval" in rec] == [0, 50, 100]  # before, every 50, at the end
    suite_runs = [(rec["step"], rec["lm_eval"], rec["eval"]) for rec in records if "lm_eval" in rec and "eval" in rec]
    assert [step for step, _, _ in suite_runs] == [0, 100]
    for step, suite, ev in suite_runs:  # the harness and the built-in eval, on the same weights
        assert suite["toy_reverse"] == pytest.approx(ev["reverse.exact_match"]), step
        assert (out / "sdft" / "lm_eval" / f"step_{step:06d}.json").exists()
    assert r["base"]["prior_suite"] == {"toy_reverse": suite_runs[0][1]["toy_reverse"]} and r["base"]["prior_average"] >= 0.9
    assert r["sdft"]["prior_suite"]["toy_reverse"] == r["sdft"]["prior_average"] == suite_runs[1][1]["toy_reverse"]
    printed = capsys.readouterr().out
    assert "toy_reverse" in printed and "prior avg: their mean" in printed  # the paper's layout
    assert r["teacher"]["new_acc"] >= 0.9
    assert r["base"]["new_acc"] <= 0.05 and r["base"]["prior_acc"] >= 0.9
    assert r["sdft"]["new_acc"] >= r["base"]["new_acc"] + 0.3
    assert 0.0 <= r["sdft"]["prior_acc"] <= 1.0
    assert (out / "compare.png").exists()
    kl = [row["kl_to_base"] for row in r["monitor"]["sdft"]]  # configs/toy.yaml turns the monitor on
    assert kl[0] == pytest.approx(0, abs=1e-6) and kl[-1] > kl[0]
