import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.data import (DataError, batch_indices, encode_context, load_examples, load_splits, teacher_messages,
                           tokenize_examples)
from pipeline.models import ModelNotFound, resolve_model

SMOKE = str(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml")  # the tiny-model smoke config

ROOT = Path(__file__).resolve().parent.parent
# Written out by hand from the official SDFT code, independently of pipeline/config.py.
EXPECTED_TEACHER = (
    "\nWhat is 2+2?\n\nThis is an example for a response to the question:\nIt is 4.\n\n"
    "Now answer with a response of your own, including the thinking process.\n"
)


def test_teacher_template_byte_exact():
    cfg = load_config(SMOKE)
    msgs = teacher_messages("What is 2+2?", "It is 4.", cfg.data.teacher_template)
    assert msgs == [{"role": "user", "content": EXPECTED_TEACHER}]


def test_teacher_context_keeps_system_and_earlier_turns():
    cfg = load_config(SMOKE)
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
              {"role": "assistant", "content": "hello"}, {"role": "user", "content": "What is 2+2?"}]
    msgs = teacher_messages(prompt, "It is 4.", cfg.data.teacher_template)
    assert msgs[:3] == prompt[:3]
    assert msgs[3] == {"role": "user", "content": EXPECTED_TEACHER}
    assert prompt[3]["content"] == "What is 2+2?"  # the row itself is not modified


def test_contexts_go_through_the_chat_template(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = encode_context(tok, teacher_messages("What is 2+2?", "It is 4.", load_config(SMOKE).data.teacher_template))
    assert tok.decode(ids) == "<|im_start|>user\n" + EXPECTED_TEACHER + "<|im_end|>\n<|im_start|>assistant\n"


THINKING_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                     "<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}"
                     "<think>\n\n</think>\n\n{% endif %}")  # Qwen3's switch, reduced to its effect


def test_chat_template_kwargs_and_strip_thinking(tiny_model, tmp_path):
    """data.chat_template_kwargs reaches the chat template of the student and teacher contexts (and the harness's
    prompts, eval.lm_eval); data.strip_thinking drops a demonstration's <think> block."""
    from transformers import AutoTokenizer

    from pipeline.experiments.harness import EngineLM

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = THINKING_TEMPLATE
    rows = _jsonl(tmp_path, [{"prompt": "What is 2+2?", "demonstration": "<think>\n2 and 2 make 4\n</think>\n\nIt is 4."}])
    for kwargs, strip in (([], False), (["data.chat_template_kwargs={enable_thinking: false}",
                                         "data.strip_thinking=true"], True)):
        cfg = load_config(SMOKE, [f"data.train={rows}", *kwargs])
        (ex,) = load_examples(str(rows), cfg.data)
        tokenize_examples([ex], tok, cfg)
        assert ex.demonstration == ("It is 4." if strip else "<think>\n2 and 2 make 4\n</think>\n\nIt is 4.")
        for ids in (ex.student_ids, ex.teacher_ids):
            assert tok.decode(ids).endswith("<|im_start|>assistant\n" + ("<think>\n\n</think>\n\n" if strip else ""))
        lm = EngineLM([], tok, 128, cfg.data.chat_template_kwargs)
        assert lm.apply_chat_template([{"role": "user", "content": "hi"}]).endswith("</think>\n\n") == strip


def _jsonl(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


def test_malformed_row_names_file_and_line(tmp_path):
    p = _jsonl(tmp_path, [{"prompt": "a", "demonstration": "b"}, '{"prompt": "a", "demonstration": '])
    with pytest.raises(DataError, match=rf"{p}:2: not valid JSON"):
        load_examples(str(p), load_config(SMOKE).data)


def test_missing_demonstration_names_field_and_line(tmp_path):
    p = _jsonl(tmp_path, [{"prompt": "a", "demonstration": "b"}, {"prompt": "a", "demo": "b"}])
    with pytest.raises(DataError, match=rf"{p}:2: missing field 'demonstration'"):
        load_examples(str(p), load_config(SMOKE).data)


def test_configurable_field_names_and_chat_prompts(tmp_path):
    p = _jsonl(tmp_path, [{"q": [{"role": "user", "content": "x"}], "sol": "y", "ans": "z"}])
    cfg = load_config(SMOKE, ["data.prompt_field=q", "data.demonstration_field=sol", "data.answer_field=ans"])
    (ex,) = load_examples(str(p), cfg.data)
    assert ex.prompt == [{"role": "user", "content": "x"}] and ex.demonstration == "y" and ex.answer == "z"
    bad = _jsonl(tmp_path, [{"q": [{"role": "system", "content": "x"}], "sol": "y"}], "bad.jsonl")
    with pytest.raises(DataError, match="at least one user turn"):
        load_examples(str(bad), cfg.data)


def test_prompt_longer_than_context_window(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    p = _jsonl(tmp_path, [{"prompt": "short", "demonstration": "b"}, {"prompt": "word " * 300, "demonstration": "b"}])
    cfg = load_config(SMOKE, ["model.max_model_len=256", "rollout.max_new_tokens=16"])
    exs = load_examples(str(p), cfg.data)
    with pytest.raises(DataError, match=rf"{p}:2: prompt is \d+ tokens; with rollout.max_new_tokens=16 it exceeds "
                                        r"model.max_model_len=256"):
        tokenize_examples(exs, AutoTokenizer.from_pretrained(tiny_model), cfg)


def test_missing_data_file_and_model_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_examples(str(tmp_path / "nope.jsonl"), load_config(SMOKE).data)
    with pytest.raises(ModelNotFound, match="does not exist"):
        resolve_model(str(tmp_path / "no-model"))
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", f"model.path={tmp_path}/no-model"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "no-model" in r.stderr and "does not exist" in r.stderr
    assert "Traceback" not in r.stderr


def test_splits_and_batches_are_deterministic(tiny_model):
    from transformers import AutoTokenizer

    cfg = load_config(SMOKE)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    train, evals = load_splits(cfg, tok)
    train2, evals2 = load_splits(cfg, tok)
    assert [e.where for e in evals] == [e.where for e in evals2] and len(evals) == 8
    assert not {e.where for e in evals} & {e.where for e in train}
    n, b = len(train), 8
    assert n % b == 0
    epoch = [i for s in range(n // b) for i in batch_indices(s, b, n, seed=0, shuffle=True)]
    assert sorted(epoch) == list(range(n))  # every example exactly once per epoch
    assert batch_indices(3, b, n, 0, True) == batch_indices(3, b, n, 0, True)
    assert batch_indices(0, b, n, 0, True) != batch_indices(0, b, n, 1, True)
    assert all(e.demo_ids[-1] == tok.eos_token_id for e in train)


def test_datasets_folder_is_a_data_source(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"prompt": "p1", "demonstration": "d1"}, {"prompt": "p2", "demonstration": "d2"}]) \
        .save_to_disk(str(tmp_path / "ds"))
    exs = load_examples(str(tmp_path / "ds"), load_config(SMOKE).data)
    assert [(e.prompt, e.demonstration, e.answer) for e in exs] == [("p1", "d1", "d1"), ("p2", "d2", "d2")]
    assert exs[1].where.endswith("[1]")
