"""pipeline/convert.py on small local fixtures written in the official SDFT release schema (save_to_disk folders with
the release's nested feature types, and the older upload's JSON lists); nothing is downloaded."""

import json
from pathlib import Path

import pytest
from datasets import Dataset, Features, List, Value

from pipeline.config import DataConfig
from pipeline.convert import convert
from pipeline.data import load_examples
from pipeline.errors import DataError
from pipeline.experiments.task_metrics import science, tooluse

S = Value("string")
CALL = {"Action": S, "Action_Input": S}
TOOL_COLUMNS = {"prompt": S, "name": S, "description": S, "nl_documentation": S, "instruction": S}
TOOL_TRAIN = Features({**TOOL_COLUMNS, "golden_answer": List(CALL), "golden_response": List(S)})
TOOL_EVAL = Features({**TOOL_COLUMNS, "golden_answer": List(CALL)})  # the eval split has no golden_response
TOOL_FORK = Features({**TOOL_COLUMNS, "golden_answer": {"Action": List(S), "Action_Input": List(S)}})
MESSAGES = List({"content": S, "role": S})
SCI_TRAIN = Features({"messages": MESSAGES, "output_text": S})
SCI_EVAL = Features({"prompt": MESSAGES, "answer": S})


def tool_row(name: str, instruction: str, calls: list[tuple[str, str]], response: list[str] | None) -> dict:
    description, documentation = f"The {name} API.", f"{name} endpoints ..."
    # the release's prompt, as its rows hold it
    row = {"prompt": "Your task is to answer the user's question using available tools. \nYou have access to the "
                     f"following tools:\nName: {name}\nDescription: {description}\nDocumentation:\n{documentation}\n"
                     "Use the following format:\nThought: you should always think about what to do\nAction: the action "
                     "to take, should be one of the tool names.\nAction Input: the input to the action, must be in "
                     "JSON format. All of the action input must be realistic and from the user.\n\nBegin!\n"
                     f"Question: {instruction}",
           "name": name, "description": description, "nl_documentation": documentation,
           "instruction": instruction, "golden_answer": [{"Action": a, "Action_Input": i} for a, i in calls]}
    return row if response is None else {**row, "golden_response": response}


AXOLOTL_Q = "Hey, can you show me a random picture of an axolotl?"
AXOLOTL_CALLS = [("getRandomAxolotlImage", "{}")]
AXOLOTL_RESPONSE = ["Thought: The user wants a random axolotl picture.", "Action: getRandomAxolotlImage",
                    "Action Input: {}"]
# Two calls sharing the key "locale"; a non-ASCII character to check the output is not \u-escaped.
CARDS_Q = "Montre-moi les cartes Mage et les dos de cartes, en anglais s'il te plaît."
CARDS_CALLS = [("getCardsByClass", '{"class": "Mage", "locale": "enUS"}'), ("getCardBacks", '{"locale": "enUS"}')]
CARDS_RESPONSE = ["Thought: Two calls are needed.", "Action: getCardsByClass",
                  'Action Input: {"class": "Mage", "locale": "enUS"}', "Action: getCardBacks",
                  'Action Input: {"locale": "enUS"}']
TOOL_TRAIN_ROWS = [tool_row("Axolotl", AXOLOTL_Q, AXOLOTL_CALLS, AXOLOTL_RESPONSE),
                   tool_row("Hearthstone", CARDS_Q, CARDS_CALLS, CARDS_RESPONSE)]
TOOL_EVAL_ROWS = [tool_row("Hearthstone", CARDS_Q, CARDS_CALLS, None)]

SYSTEM = {"content": "Answer with <reasoning>...</reasoning> then <answer>X</answer>.", "role": "system"}
SCI_Q = {"content": "Which organelle makes most of the cell's ATP?\nA. Nucleus\nB. Mitochondrion\nC. Ribosome\n"
                    "D. Golgi apparatus", "role": "user"}
SCI_OUTPUT = "<reasoning>Oxidative phosphorylation happens in the mitochondrion.</reasoning>\n<answer>B</answer>"
SCI_TRAIN_ROWS = [{"messages": [SYSTEM, SCI_Q], "output_text": SCI_OUTPUT}]
SCI_EVAL_ROWS = [{"prompt": [SYSTEM, SCI_Q], "answer": "B"}]


def save(rows: list[dict], features: Features, path: Path) -> Path:
    Dataset.from_list(rows, features=features).save_to_disk(str(path))
    return path


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def answer(calls: list[tuple[str, str]]) -> str:
    return json.dumps([{"Action": a, "Action_Input": i} for a, i in calls])


def user(row: dict) -> list[dict]:
    return [{"role": "user", "content": row["prompt"]}]


def test_tooluse_train_split(tmp_path):
    src = save(TOOL_TRAIN_ROWS, TOOL_TRAIN, tmp_path / "train_data")
    out = tmp_path / "train.jsonl"
    assert convert("official-tooluse", src, out) == {"rows": 2, "splits": {"train": 2}, "outputs": [str(out)]}
    assert jsonl(out) == [
        {"id": 0, "prompt": user(TOOL_TRAIN_ROWS[0]), "demonstration": "\n".join(AXOLOTL_RESPONSE),
         "answer": answer(AXOLOTL_CALLS)},
        {"id": 1, "prompt": user(TOOL_TRAIN_ROWS[1]), "demonstration": "\n".join(CARDS_RESPONSE),
         "answer": answer(CARDS_CALLS)},
    ]
    assert "plaît" in out.read_text(encoding="utf-8")  # UTF-8, not \u-escaped


def test_tooluse_eval_split_and_the_forks_shape(tmp_path):
    rendered = ('Action: getCardsByClass\nAction Input: {"class": "Mage", "locale": "enUS"}\n'
                'Action: getCardBacks\nAction Input: {"locale": "enUS"}')
    expected = [{"id": 0, "prompt": user(TOOL_EVAL_ROWS[0]), "demonstration": rendered, "answer": answer(CARDS_CALLS)}]
    convert("official-tooluse", save(TOOL_EVAL_ROWS, TOOL_EVAL, tmp_path / "eval_data"), tmp_path / "eval.jsonl")
    assert jsonl(tmp_path / "eval.jsonl") == expected
    fork = [{**TOOL_EVAL_ROWS[0], "golden_answer": {"Action": [a for a, _ in CARDS_CALLS],
                                                    "Action_Input": [i for _, i in CARDS_CALLS]}}]
    convert("official-tooluse", save(fork, TOOL_FORK, tmp_path / "fork"), tmp_path / "fork.jsonl")
    assert jsonl(tmp_path / "fork.jsonl") == expected


def test_science_splits(tmp_path):
    convert("official-science", save(SCI_TRAIN_ROWS, SCI_TRAIN, tmp_path / "train_data"), tmp_path / "train.jsonl")
    convert("official-science", save(SCI_EVAL_ROWS, SCI_EVAL, tmp_path / "eval_data"), tmp_path / "eval.jsonl")
    prompt = [{"role": "system", "content": SYSTEM["content"]}, {"role": "user", "content": SCI_Q["content"]}]
    assert jsonl(tmp_path / "train.jsonl") == [{"id": 0, "prompt": prompt, "demonstration": SCI_OUTPUT, "answer": "B"}]
    assert jsonl(tmp_path / "eval.jsonl") == [
        {"id": 0, "prompt": prompt, "demonstration": "<answer>\nB\n</answer>", "answer": "B"}]


def test_release_folder_loads_and_scores(tmp_path):
    release = tmp_path / "tooluse_data"
    save(TOOL_TRAIN_ROWS, TOOL_TRAIN, release / "train_data")
    save(TOOL_EVAL_ROWS, TOOL_EVAL, release / "eval_data")
    out = tmp_path / "converted"
    result = convert("official-tooluse", release, out)
    assert result == {"rows": 3, "splits": {"train": 2, "eval": 1},
                      "outputs": [str(out / "train.jsonl"), str(out / "eval.jsonl")]}
    train = load_examples(str(out / "train.jsonl"), DataConfig())
    evals = load_examples(str(out / "eval.jsonl"), DataConfig())
    assert [ex.prompt for ex in train] == [user(r) for r in TOOL_TRAIN_ROWS]
    assert [ex.answer for ex in train + evals] == [answer(AXOLOTL_CALLS), answer(CARDS_CALLS), answer(CARDS_CALLS)]
    # The demonstrations (official and rendered) pass the official rule against their own answers.
    assert [tooluse(ex.demonstration, ex) for ex in train + evals] == [1.0, 1.0, 1.0]
    assert tooluse(train[0].demonstration, evals[0]) == 0.0


@pytest.mark.parametrize("task", ["tooluse", "science"])
def test_the_paper_recipes_read_the_converted_release(task, tmp_path, monkeypatch, capsys):
    """`sdft data convert` as the recipe's comment says, then configs/qwen2.5-7b-<task>.yaml finds the files, its
    eval.metric is the official rule (the eval demonstrations score 1) and its prior suite is the paper's."""
    from pipeline.cli import main as cli_main
    from pipeline.config import load_config
    from pipeline.experiments.evaluation import make_scorer

    train, evals = ((TOOL_TRAIN_ROWS, TOOL_TRAIN), (TOOL_EVAL_ROWS, TOOL_EVAL)) if task == "tooluse" else \
        ((SCI_TRAIN_ROWS, SCI_TRAIN), (SCI_EVAL_ROWS, SCI_EVAL))
    save(*train, tmp_path / "release" / "train_data")
    save(*evals, tmp_path / "release" / "eval_data")
    monkeypatch.chdir(tmp_path)
    assert cli_main(["data", "convert", "--from", f"official-{task}", "release", "--output", f"data/{task}"]) == 0
    assert json.loads(capsys.readouterr().out)["splits"] == {"train": len(train[0]), "eval": len(evals[0])}
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / f"qwen2.5-7b-{task}.yaml")
    assert len(load_examples(cfg.data.train, cfg.data)) == len(train[0])
    scorer = make_scorer(cfg.eval.metric, cfg.eval.regex)
    assert all(scorer(ex.demonstration, ex) == 1.0 for ex in load_examples(cfg.data.eval, cfg.data))
    assert cfg.eval.metric == task and cfg.eval.lm_eval.tasks == ["paper"]


def test_science_release_of_json_lists_loads(tmp_path):
    # The older upload: train_data.json / eval_data.json, each a JSON list of rows.
    release = tmp_path / "science_data"
    release.mkdir()
    (release / "train_data.json").write_text(json.dumps(SCI_TRAIN_ROWS), encoding="utf-8")
    (release / "eval_data.json").write_text(json.dumps(SCI_EVAL_ROWS), encoding="utf-8")
    convert("official-science", release, tmp_path / "out")
    (ex,) = load_examples(str(tmp_path / "out" / "eval.jsonl"), DataConfig())
    assert ex.prompt[1]["content"] == SCI_Q["content"] and ex.answer == "B"
    assert science(SCI_OUTPUT, ex) == 1.0


def test_json_list_and_jsonl_files(tmp_path):
    src = tmp_path / "train_data.json"
    src.write_text(json.dumps(TOOL_TRAIN_ROWS, ensure_ascii=False), encoding="utf-8")
    assert convert("official-tooluse", src, tmp_path / "a.jsonl")["rows"] == 2
    lines = tmp_path / "rows.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in TOOL_TRAIN_ROWS), encoding="utf-8")
    convert("official-tooluse", lines, tmp_path / "b.jsonl")
    assert jsonl(tmp_path / "a.jsonl") == jsonl(tmp_path / "b.jsonl")
    assert jsonl(tmp_path / "a.jsonl")[1]["answer"] == answer(CARDS_CALLS)


def test_the_wrong_kind_names_the_row_and_the_right_kind(tmp_path):
    sci = save(SCI_EVAL_ROWS, SCI_EVAL, tmp_path / "sci")
    with pytest.raises(DataError, match=r"sci\[0\]: --from official-tooluse needs .*'answer', 'prompt'.*"
                                        r"looks like --from official-science"):
        convert("official-tooluse", sci, tmp_path / "x.jsonl")
    tool = save(TOOL_EVAL_ROWS, TOOL_EVAL, tmp_path / "tool")
    with pytest.raises(DataError, match=r"tool\[0\]: --from official-science needs .*"
                                        r"looks like --from official-tooluse"):
        convert("official-science", tool, tmp_path / "x.jsonl")
    assert not (tmp_path / "x.jsonl").exists()


def test_a_bad_row_leaves_the_old_output_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.jsonl").write_text("old\n", encoding="utf-8")
    release = tmp_path / "science_data"
    save(SCI_TRAIN_ROWS, SCI_TRAIN, release / "train_data")
    # An eval row whose answer is missing: refused, and the good train split is not written either.
    save([{"prompt": [SYSTEM, SCI_Q], "answer": None}], SCI_EVAL, release / "eval_data")
    with pytest.raises(DataError, match=r"eval_data\[0\]: --from official-science needs"):
        convert("official-science", release, out)
    assert [p.name for p in out.iterdir()] == ["train.jsonl"] and (out / "train.jsonl").read_text() == "old\n"
    # A train demonstration without <answer> tags is refused rather than given an empty answer.
    bad = save([{"messages": [SYSTEM, SCI_Q], "output_text": "It is B."}], SCI_TRAIN, tmp_path / "bad")
    with pytest.raises(DataError, match=r"bad\[0\]: output_text has no non-empty <answer>"):
        convert("official-science", bad, tmp_path / "bad.jsonl")
