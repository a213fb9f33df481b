"""The prior-capability suite (eval.lm_eval, `sdft eval --lm-eval`): lm-evaluation-harness tasks written by the test
(YAML + local JSONL, nothing downloaded), scored on the run's vLLM engines and checked against the harness's own HF
backend on the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main as cli_main
from pipeline.config import LmEvalConfig
from pipeline.errors import EvalError
from pipeline.experiments.harness import PAPER_METRICS, headline, parse_tasks, prepare_suite

CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Japan", "Tokyo"), ("Germany", "Berlin"), ("Spain", "Madrid"),
            ("Egypt", "Cairo")]


def _task(folder: Path, name: str, rows: list[dict], body: str) -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                         f"    test: {data}\ntest_split: test\n{body}")


def write_tasks(folder: Path) -> Path:
    """One task per kind of harness request: multiple choice (log-likelihoods), generation until a stop string, and
    rolling log-likelihood (perplexity)."""
    folder.mkdir(parents=True, exist_ok=True)
    _task(folder, "t_mc", [{"question": f"What is {a} plus {b}?", "choices": [str(a + b + 1), str(a + b), str(a * b + 3)],
                            "label": 1} for a, b in zip(range(2, 22), range(3, 23))],
          'output_type: multiple_choice\ndoc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\n'
          'doc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n')
    pattern = "|".join(a for _, a in CAPITALS)
    _task(folder, "t_gen", [{"q": f"What is the capital of {c}?", "a": a} for c, a in CAPITALS],
          'output_type: generate_until\ndoc_to_text: "Q: {{q}}\\nA:"\ndoc_to_target: "{{a}}"\n'
          'generation_kwargs:\n  until: ["\\n", "."]\n  max_gen_toks: 12\n  do_sample: false\n'
          f'filter_list:\n  - name: city\n    filter:\n      - function: regex\n        regex_pattern: "({pattern})"\n'
          '      - function: take_first\nmetric_list:\n  - metric: exact_match\n')
    _task(folder, "t_ppl", [{"text": t} for t in ("The cat sat on the mat and looked out of the window.",
                                                  "Water boils at one hundred degrees Celsius at sea level.")],
          'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
          'metric_list:\n  - metric: word_perplexity\n')
    return folder


def test_task_list_preset_and_headline():
    assert parse_tasks(["paper"]) == PAPER_METRICS
    assert parse_tasks(["hellaswag:acc,ifeval", "t_mc"]) == {"hellaswag": "acc", "ifeval": "inst_level_loose_acc",
                                                              "t_mc": None}
    results = {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.7}}
    assert headline(results, "t", None) == ("acc,none", 0.5)
    assert headline(results, "t", "acc_norm") == ("acc_norm,none", 0.7)
    with pytest.raises(EvalError, match=r"no metric 'mc1'; it reports \['acc', 'acc_norm'\]"):
        headline(results, "t", "mc1")


def test_suite_refusals(tmp_path, monkeypatch):
    """Before anything starts: a misspelt task (with the closest name), code execution not allowed, a Hub dataset
    offline."""
    tasks = write_tasks(tmp_path / "tasks")
    (tasks / "t_code.yaml").write_text((tasks / "t_mc.yaml").read_text().replace("task: t_mc", "task: t_code")
                                       + "unsafe_code: true\n")
    suite = prepare_suite(LmEvalConfig(tasks=["t_mc", "t_ppl"], include_path=str(tasks)))
    assert suite.tasks == ["t_mc", "t_ppl"]
    with pytest.raises(EvalError, match="'t_mcc' is not an lm-evaluation-harness task .did you mean t_mc"):
        prepare_suite(LmEvalConfig(tasks=["t_mcc"], include_path=str(tasks)))
    with pytest.raises(EvalError, match="runs the model's code .*allow_code_execution=true"):
        prepare_suite(LmEvalConfig(tasks=["t_code"], include_path=str(tasks)))
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(EvalError, match="task 'winogrande' cannot load its dataset .*HF_HUB_OFFLINE is set"):
        prepare_suite(LmEvalConfig(tasks=["winogrande"]))
    assert cli_main(["eval", str(tmp_path), "--lm-eval", "winogrand"]) != 0  # one line, before Ray


@pytest.mark.slow
def test_sdft_eval_lm_eval_matches_the_harness_hf_backend(tmp_path, ray_session, capsys):
    """`sdft eval MODEL --lm-eval FOLDER` on SmolLM2 through a vLLM engine gives the harness's own HF backend's
    numbers on the same weights: the same accuracies (multiple choice, generation) and the same perplexity."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from pipeline.models import resolve_model

    model = resolve_model("package:smollm2")
    tasks = write_tasks(tmp_path / "tasks")
    out = tmp_path / "suite.json"
    assert cli_main(["eval", model, "model.max_model_len=512", "data.eval_size=2", "eval.max_new_tokens=4",
                     "--lm-eval", str(tasks), "--output", str(out)]) == 0
    ours = json.loads(out.read_text())
    printed = json.loads(capsys.readouterr().out)
    assert printed["lm_eval"]["results_file"] == str(out)
    hf = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model},dtype=float32", tasks=["t_mc", "t_gen",
                                 "t_ppl"], task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                                 batch_size=8, device="cpu", log_samples=False)["results"]
    for task, key in (("t_mc", "acc,none"), ("t_mc", "acc_norm,none"), ("t_gen", "exact_match,city")):
        assert ours["results"][task][key] == hf[task][key], (task, key)
    assert 0.3 <= ours["results"]["t_mc"]["acc,none"] < 1 and ours["results"]["t_gen"]["exact_match,city"] > 0
    ppl = ours["results"]["t_ppl"]["word_perplexity,none"]
    assert ppl == pytest.approx(hf["t_ppl"]["word_perplexity,none"], rel=1e-4)
    # headline per task, the average over the metrics where higher is better (the perplexity stays out)
    assert ours["t_mc"] == ours["results"]["t_mc"]["acc,none"] and ours["t_ppl"] == ppl
    assert ours["average"] == pytest.approx((ours["t_mc"] + ours["t_gen"]) / 2)
    assert ours["metric_keys"] == {"t_gen": "exact_match,city", "t_mc": "acc,none", "t_ppl": "word_perplexity,none"}
