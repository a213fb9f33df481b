"""The official SDFT release data (Continual-Intelligence/Self-Distillation) -> this project's JSONL rows.

Every output row is {"id": index in the source, "prompt": chat messages, "demonstration": str, "answer": str}, built
as the official training and eval scripts use the columns:

* official-tooluse: prompt = one user turn holding `prompt` (no system message); demonstration = the lines of
  `golden_response` joined by "\\n"; answer = JSON text of the gold calls [{"Action", "Action_Input"}] (what
  experiments/task_metrics.tooluse reads), from either stored shape of `golden_answer`.
* official-science: train rows (`messages`, `output_text`): prompt = messages, demonstration = output_text,
  answer = the text of its last <answer>...</answer>; eval rows (`prompt`, `answer`): the prompt and letter as is.

A source is one split (a `save_to_disk` folder, a JSON-list file or a JSONL file), or the release folder holding
`train_data/` and `eval_data/` (or the older upload's `train_data.json` / `eval_data.json`): then the output is a
folder that gets `train.jsonl` and `eval.jsonl`, one per split present.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .data import _read_rows
from .errors import DataError, OutputError
from .experiments.task_metrics import science_answer

KINDS = ("official-tooluse", "official-science")
SPLITS = ("train", "eval")


def _is_messages(value) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)


def _missing(row: dict, where: str, kind: str, needs: str) -> DataError:
    """A row without the columns `kind` needs; names the other kind when the row has its columns."""
    other = "official-science" if kind == "official-tooluse" else "official-tooluse"
    looks_other = ("messages" in row or _is_messages(row.get("prompt"))) if kind == "official-tooluse" \
        else "golden_answer" in row
    hint = f"it looks like --from {other}" if looks_other else "is this a split of the official SDFT release?"
    return DataError(f"{where}: --from {kind} needs {needs}; the row has {sorted(row)} ({hint})")


def _gold_calls(value, where: str) -> list[dict]:
    """golden_answer as a list of calls: the release's list of {Action, Action_Input}, or a fork's struct of lists."""
    if isinstance(value, dict) and isinstance(value.get("Action"), list):
        actions, inputs = value["Action"], value.get("Action_Input")
        if not isinstance(inputs, list) or len(inputs) != len(actions):
            raise DataError(f"{where}: golden_answer has {len(actions)} Action but Action_Input is not a list of as "
                            "many strings; fix the row")
        value = [{"Action": a, "Action_Input": i} for a, i in zip(actions, inputs)]
    if not isinstance(value, list) or not all(
            isinstance(c, dict) and isinstance(c.get("Action"), str) and isinstance(c.get("Action_Input"), str)
            for c in value):
        raise DataError(f"{where}: golden_answer must be a list of {{\"Action\": str, \"Action_Input\": str}} (or "
                        "a struct of those two lists); fix the row")
    return [{"Action": c["Action"], "Action_Input": c["Action_Input"]} for c in value]


def tooluse_row(row: dict, where: str) -> dict:
    """Eval rows have no golden_response: their demonstration is rendered from the gold calls as "Action: NAME\\n
    Action Input: INPUT" lines. That text is for the teacher-accuracy eval only; the official eval uses none."""
    if not isinstance(row.get("prompt"), str) or "golden_answer" not in row:
        raise _missing(row, where, "official-tooluse", "'prompt' (a string) and 'golden_answer'")
    calls = _gold_calls(row["golden_answer"], where)
    response = row.get("golden_response")
    if response is None:
        demo = "\n".join(f"Action: {c['Action']}\nAction Input: {c['Action_Input']}" for c in calls)
    elif isinstance(response, list) and all(isinstance(line, str) for line in response):
        demo = "\n".join(response)
    else:
        raise DataError(f"{where}: golden_response must be a list of strings; fix the row")
    return {"prompt": [{"role": "user", "content": row["prompt"]}], "demonstration": demo,
            "answer": json.dumps(calls, ensure_ascii=False)}


def _messages(value, where: str, key: str) -> list[dict]:
    if not _is_messages(value):
        raise DataError(f"{where}: {key!r} must be a list of chat messages {{\"role\", \"content\"}}; fix the row")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def science_row(row: dict, where: str) -> dict:
    """A train row without <answer> tags is refused rather than given an empty answer: an eval held out of train
    would score it against nothing, silently."""
    if "messages" in row:
        demo = row.get("output_text")
        if not isinstance(demo, str):
            raise _missing(row, where, "official-science", "'output_text' (a string) next to 'messages'")
        if "<answer>" not in demo or not science_answer(demo):
            raise DataError(f"{where}: output_text has no non-empty <answer>...</answer> to take the answer from; "
                            "fix or drop the row")
        return {"prompt": _messages(row["messages"], where, "messages"), "demonstration": demo,
                "answer": science_answer(demo)}
    if "prompt" in row and isinstance(row.get("answer"), str):
        answer = row["answer"]
        return {"prompt": _messages(row["prompt"], where, "prompt"), "demonstration": f"<answer>\n{answer}\n</answer>",
                "answer": answer}
    raise _missing(row, where, "official-science", "'messages' and 'output_text' (train) or 'prompt' and 'answer' "
                   "(a string, eval)")


def _starts_list(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4096).decode("utf-8-sig", errors="replace").lstrip().startswith("[")


def read_rows(source: Path) -> list[tuple[dict, str]]:
    """(row, "where" for errors) from a save_to_disk folder, a JSON-list file or a JSONL file."""
    if source.is_file() and _starts_list(source):
        try:
            rows = json.loads(source.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{source}: not a valid JSON list of rows ({e}); give the file as UTF-8 JSON") from None
        if not rows or not all(isinstance(r, dict) for r in rows):
            raise DataError(f"{source}: must be a non-empty JSON list of row objects")
        return [(r, f"{source}[{i}]") for i, r in enumerate(rows)]
    return _read_rows(str(source), "train")  # a folder (a Dataset, or a DatasetDict's train split) or JSONL


def _release_splits(source: Path) -> dict[str, Path]:
    """{split: path} of a release folder; empty when `source` is not one."""
    if not source.is_dir():
        return {}
    found = {}
    for split in SPLITS:
        for name in (f"{split}_data", f"{split}_data.json"):
            if (source / name).exists():
                found[split] = source / name
                break
    return found


def _write_jsonl(rows: list[dict], output: Path) -> None:
    """Through a temp file and os.replace: an error or a crash never leaves a half-written output."""
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def convert(kind: str, source: Path, output: Path) -> dict:
    """Convert SOURCE to JSONL at OUTPUT; {"rows": total, "splits": {name: rows}, "outputs": [paths written]}."""
    if kind not in KINDS:
        raise DataError(f"--from {kind!r} is not a known kind; use one of {', '.join(KINDS)}")
    source, output = Path(source), Path(output)
    if not source.exists():
        raise DataError(f"{source} does not exist; give a release folder, a split folder or a JSON/JSONL file")
    convert_row = tooluse_row if kind == "official-tooluse" else science_row
    splits = _release_splits(source)
    if splits:
        if output.exists() and not output.is_dir():
            raise OutputError(f"{output} is a file; a release folder converts into a folder (train.jsonl, eval.jsonl)")
        targets = {split: (path, output / f"{split}.jsonl") for split, path in splits.items()}
    else:
        if output.is_dir():
            raise OutputError(f"{output} is a folder; give a .jsonl file to convert the split {source} into")
        targets = {output.stem: (source, output)}
    # Every split is converted before anything is written: a bad row leaves no output at all.
    converted = {name: (out, [{"id": i, **convert_row(row, where)} for i, (row, where) in enumerate(read_rows(src))])
                 for name, (src, out) in targets.items()}
    for out, rows in converted.values():
        _write_jsonl(rows, out)
    counts = {name: len(rows) for name, (_, rows) in converted.items()}
    return {"rows": sum(counts.values()), "splits": counts, "outputs": [str(out) for out, _ in converted.values()]}
