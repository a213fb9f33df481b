"""The embedded toy world: data, tokenizer, the committed base checkpoint in HF and in vLLM, and the teacher
(the base with a demonstration in context) solving the new skill it has never been trained on."""

from __future__ import annotations

import json

import pytest

from pipeline.config import load_config
from pipeline.data import encode_context, load_splits, teacher_messages
from pipeline.models import resolve_model
from pipeline.toyworld import tasks


@pytest.fixture(scope="module")
def toy():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model("toy:base")
    return path, AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()


def test_skills_and_forms():
    assert tasks.SKILLS["shift"]("abz") == "bca"
    assert tasks.SKILLS["swap"]("abcde") == "badce"
    assert tasks.SKILLS["mirror"]("abz") == "zya"
    assert tasks.SKILLS["sort"]("cab") == "abc"
    assert tasks.FORMS[tasks.EXPERT_FORM]("bcd") == "B-C-D"
    assert tasks.normalize("[B-c.D]") == "bcd"


def test_data_files_are_what_the_generator_writes(tmp_path):
    tasks.build_data(tmp_path)
    for p in sorted(tmp_path.iterdir()):
        assert p.read_text() == (tasks.DATA_DIR / p.name).read_text(), p.name
    evals = {json.loads(l)["prompt"] for l in (tasks.DATA_DIR / "shift_eval.jsonl").read_text().splitlines()}
    train = {json.loads(l)["prompt"] for l in (tasks.DATA_DIR / "shift_train.jsonl").read_text().splitlines()}
    assert len(evals) == 100 and not evals & train  # held out


def test_tokenizer_is_per_character_with_the_toy_template(toy):
    _, tok, _ = toy
    content = tasks.teacher_content("shift", "abc", "B-C-D")
    ids = encode_context(tok, teacher_messages("shift: abc", "B-C-D", tasks.TEACHER_TEMPLATE))
    assert tok.decode(ids) == tasks.as_text(content)
    assert len(ids) == len(content) + 1 + len(" => ")  # <s> + one token per character
    assert tok.decode(tok("bcd", add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
                      skip_special_tokens=True) == "bcd"


def test_default_config_is_the_toy_world(toy):
    path, tok, _ = toy
    cfg = load_config()
    assert cfg.model.path == "toy:base" and cfg.data.teacher_template == tasks.TEACHER_TEMPLATE
    train, evals = load_splits(cfg, tok)
    assert len(evals) == 100 and len(train) > 500
    assert tok.decode(evals[0].teacher_ids).endswith(f"|demo: {evals[0].demonstration} => ")


def _hf_greedy(model, tok, prompts: list[list[int]], max_new: int = 16) -> list[str]:
    import torch

    out = []
    with torch.no_grad():
        for p in prompts:
            g = model.generate(torch.tensor([p]), max_new_tokens=max_new, do_sample=False,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            out.append(tok.decode(g[0, len(p):], skip_special_tokens=True))
    return out


def test_hf_base_knows_prior_skills_and_the_teacher_solves_the_new_one(toy):
    """Greedy, in Hugging Face: prior skills without a demo; shift only with its (foreign-form) demo."""
    path, tok, model = toy
    cfg = load_config()
    _, evals = load_splits(cfg, tok)
    evals = evals[:40]
    student = _hf_greedy(model, tok, [ex.student_ids for ex in evals])
    teacher = _hf_greedy(model, tok, [ex.teacher_ids for ex in evals])
    assert sum(tasks.normalize(s) == ex.answer for s, ex in zip(student, evals)) <= 2  # base ~0% on shift
    assert sum(t == ex.answer for t, ex in zip(teacher, evals)) >= 36  # teacher >= 90%, in the model's own form
    assert all(ex.demonstration.isupper() for ex in evals)  # ... from demonstrations in a foreign form
    copy = [json.loads(l) for l in (tasks.DATA_DIR / "copy_eval.jsonl").read_text().splitlines()][:20]
    got = _hf_greedy(model, tok, [encode_context(tok, [{"role": "user", "content": r["prompt"]}]) for r in copy])
    assert sum(g == r["answer"] for g, r in zip(got, copy)) >= 18


def test_vllm_loads_the_toy_checkpoint_and_agrees_with_hf(toy, ray_session):
    """The committed checkpoint through the project's rollout actor (vLLM): greedy == HF greedy."""
    import ray

    from actors.rollout import RolloutEngine, engine_env

    path, tok, model = toy
    cfg = load_config()
    _, evals = load_splits(cfg, tok)
    prompts = [ex.teacher_ids for ex in evals[:8]] + [ex.student_ids for ex in evals[:8]]
    engine = ray.remote(RolloutEngine).options(
        num_cpus=1, runtime_env={"env_vars": engine_env(cfg.rollout.cpu_kv_cache_gib)}).remote(path, cfg.model_dump())
    try:
        outs = ray.get(engine.generate.remote(prompts, max_new_tokens=16, temperature=0.0))
    finally:
        ray.kill(engine)
    got = [tok.decode(o["token_ids"], skip_special_tokens=True) for o in outs]
    assert got == _hf_greedy(model, tok, prompts)
    assert sum(g == ex.answer for g, ex in zip(got[:8], evals[:8])) >= 7
