"""Rows -> examples -> token ids of the student context x and the teacher context teacher_ctx(x, c).

A row has a prompt (a string or a list of chat messages) and a demonstration. The teacher context folds the
demonstration into the last user turn with the SDFT template (system messages are kept) and goes through the
tokenizer's chat template when it has one, exactly as the student context does.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from .config import DEFAULT_CONFIG, Config, DataConfig
from .errors import DataError

PROJECT_ROOT = DEFAULT_CONFIG.parent.parent
THINKING = re.compile(r"<think>.*?</think>\s*", re.DOTALL)  # data.strip_thinking: a reasoning model's trace


@dataclass
class Example:
    prompt: str | list[dict]
    demonstration: str
    answer: str  # eval reference (the answer field, else the demonstration)
    where: str  # "file:line" for error messages
    student_ids: list[int] = field(default_factory=list)
    teacher_ids: list[int] = field(default_factory=list)
    demo_ids: list[int] = field(default_factory=list)  # demonstration + EOS (the SFT target)


def _resolve(path: str) -> Path:
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return PROJECT_ROOT / p


def _read_rows(source: str, split: str) -> list[tuple[dict, str]]:
    if source.startswith("hf:"):
        return _hub_rows(source, split)
    path = _resolve(source)
    if not path.exists():
        raise DataError(f"data file {source} does not exist (looked in the working directory and {PROJECT_ROOT})")
    if path.is_dir():
        return _folder_rows(path, split)
    rows = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a BOM may start the file
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: each line must be a JSON object, got {type(row).__name__}")
            rows.append((row, f"{path}:{lineno}"))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def fingerprint(source: str | None) -> str | None:
    """A short hash of a data source's bytes (a file, or every file of a folder with its name); a hub dataset is its
    name. Stored in each checkpoint so that a resume notices data that changed under it."""
    if not source:
        return None
    if source.startswith("hf:"):
        return source
    path = _resolve(source)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(path) if f != path else f.name).encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16] if files else None


def data_fingerprints(cfg: Config) -> dict[str, str | None]:
    return {"data.train": fingerprint(cfg.data.train), "data.eval": fingerprint(cfg.data.eval)}


def _hub_rows(source: str, split: str) -> list[tuple[dict, str]]:
    import datasets

    from .models import first_line, hub_offline

    name = source.removeprefix("hf:")
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline without a cached copy, no network, an unknown name or split
        fix = ("HF_HUB_OFFLINE is set and it is not in the local cache: load it once with network access, or use a "
               "local JSONL file" if hub_offline() else
               "check the name, data.split and the network, or use a local JSONL file")
        raise DataError(f"data {source!r}: cannot load it from the Hugging Face Hub ({first_line(e)}); {fix}") from None
    return [(dict(r), f"{name}[{i}]") for i, r in enumerate(ds)]


def _folder_rows(path: Path, split: str) -> list[tuple[dict, str]]:
    """A folder written by `datasets`' save_to_disk (a Dataset, or a DatasetDict with `split`)."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(f"data folder {path} is not a dataset saved with datasets' save_to_disk; give that, a JSONL "
                        "file or hf:<hub name>") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"data folder {path} has splits {sorted(ds)}, not data.split={split!r}")
        ds = ds[split]
    return [(dict(r), f"{path}[{i}]") for i, r in enumerate(ds)]


ROLES = ("system", "developer", "user", "assistant", "tool")  # what chat templates know


def _check_prompt(prompt, where: str, key: str):
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: field {key!r} is empty; give the prompt, or remove the row")
        return
    ok = isinstance(prompt, list) and prompt and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt
    )
    if not ok or not any(m["role"] == "user" for m in prompt):
        raise DataError(
            f"{where}: field {key!r} must be a string or a list of chat messages "
            "[{\"role\": ..., \"content\": ...}] with at least one user turn"
        )
    unknown = sorted({m["role"] for m in prompt} - set(ROLES))
    if unknown:
        raise DataError(f"{where}: field {key!r} has messages with role {unknown[0]!r}; chat templates know "
                        f"{', '.join(ROLES)}")
    last_user = [m for m in prompt if m["role"] == "user"][-1]
    if not last_user["content"].strip():
        raise DataError(f"{where}: field {key!r}: the last user turn is empty; give the prompt, or remove the row")


def load_examples(source: str, cfg: DataConfig) -> list[Example]:
    out = []
    for row, where in _read_rows(source, cfg.split):
        for key in (cfg.prompt_field, cfg.demonstration_field):
            if key not in row:
                raise DataError(
                    f"{where}: missing field {key!r} (row has {sorted(row)}; set data.prompt_field / "
                    "data.demonstration_field to match your data)"
                )
        _check_prompt(row[cfg.prompt_field], where, cfg.prompt_field)
        demo = row[cfg.demonstration_field]
        if not isinstance(demo, str):
            raise DataError(f"{where}: field {cfg.demonstration_field!r} must be a string")
        if cfg.strip_thinking:
            demo = THINKING.sub("", demo)
        if not demo.strip():
            raise DataError(f"{where}: field {cfg.demonstration_field!r} is empty" + (" once its <think> block is "
                            "dropped" if cfg.strip_thinking else "") + ": the teacher would see no demonstration; give "
                            "one, or remove the row")
        answer = row.get(cfg.answer_field) if cfg.answer_field else None
        out.append(Example(row[cfg.prompt_field], demo, str(answer) if answer is not None else demo, where))
    return out


def as_messages(prompt: str | list[dict]) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]


def teacher_messages(prompt: str | list[dict], demonstration: str, template: str) -> list[dict]:
    """The demonstration folded into the last user turn; every other message kept as is."""
    messages = as_messages(prompt)
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[last_user]["content"] = template.format(x=messages[last_user]["content"], c=demonstration)
    return messages


def encode_context(tokenizer, messages: list[dict], template_kwargs: dict | None = None) -> list[int]:
    """Token ids of a generation prompt; plain concatenation when the tokenizer has no chat template.
    `template_kwargs`: data.chat_template_kwargs (e.g. enable_thinking), passed to the chat template."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             **(template_kwargs or {}))
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer("\n".join(m["content"] for m in messages))["input_ids"]


def special_tokens(tokenizer) -> list[str]:
    """The strings the tokenizer reads as control tokens (<|im_start|>, </s>, ...)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return sorted({t.content for t in added.values() if t.special} | set(tokenizer.all_special_tokens), key=len)[::-1]


def _check_special(ex: Example, specials: list[str]) -> None:
    """Data is text: a control token written inside a row would be parsed as one (a row could open its own system
    turn), so such a row is refused rather than trained on."""
    texts = [m["content"] for m in as_messages(ex.prompt)] + [ex.demonstration]
    for text in texts:
        found = next((t for t in specials if t and t in text), None)
        if found:
            raise DataError(f"{ex.where}: contains {found!r}, a control token of the model's tokenizer, which would be "
                            "read as one (the row could open a turn of its own): remove it from the data")


def tokenize_examples(examples: list[Example], tokenizer, cfg: Config) -> None:
    """Fill the token ids in place; a context that cannot fit, or text holding a control token, is an error naming
    its row."""
    limit = cfg.model.max_model_len
    budget = limit - cfg.rollout.max_new_tokens
    specials = special_tokens(tokenizer)
    for ex in examples:
        _check_special(ex, specials)
        kwargs = cfg.data.chat_template_kwargs
        ex.student_ids = encode_context(tokenizer, as_messages(ex.prompt), kwargs)
        ex.teacher_ids = encode_context(tokenizer, teacher_messages(ex.prompt, ex.demonstration, cfg.data.teacher_template),
                                        kwargs)
        ex.demo_ids = tokenizer(ex.demonstration, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for name, ids in (("prompt", ex.student_ids), ("teacher context (prompt + demonstration)", ex.teacher_ids)):
            if len(ids) > budget:
                raise DataError(
                    f"{ex.where}: {name} is {len(ids)} tokens; with rollout.max_new_tokens="
                    f"{cfg.rollout.max_new_tokens} it exceeds model.max_model_len={limit}. Shorten the row, "
                    "lower rollout.max_new_tokens or raise model.max_model_len."
                )
        if cfg.train.mode == "sft" and len(ex.student_ids) + len(ex.demo_ids) > limit:
            raise DataError(f"{ex.where}: prompt + demonstration is longer than model.max_model_len={limit}")


def load_splits(cfg: Config, tokenizer) -> tuple[list[Example], list[Example]]:
    """Train and eval examples, tokenized; eval is a held-out slice of train unless data.eval is set."""
    train = load_examples(cfg.data.train, cfg.data)
    if cfg.data.eval:
        evals = load_examples(cfg.data.eval, cfg.data)
    else:
        order = list(range(len(train)))
        random.Random(cfg.train.seed).shuffle(order)
        n_eval = int(len(train) * cfg.data.eval_fraction)
        evals = [train[i] for i in order[:n_eval]]
        train = [train[i] for i in sorted(order[n_eval:])]
    if cfg.data.eval_size:
        evals = evals[: cfg.data.eval_size]
    tokenize_examples(train, tokenizer, cfg)
    tokenize_examples(evals, tokenizer, cfg)
    return train, evals


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> tuple[int, ...]:
    order = list(range(n))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return tuple(order)


def batch_indices(step: int, batch_size: int, n: int, seed: int, shuffle: bool) -> list[int]:
    """Indices of the examples in optimizer step `step`: epochs of a seeded permutation, so the data
    position is a function of the step and resuming needs no sampler state."""
    return [
        _epoch_order(n, seed, pos // n, shuffle)[pos % n] for pos in range(step * batch_size, (step + 1) * batch_size)
    ]
