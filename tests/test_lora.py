"""LoRA SDFT (`model.lora`): config errors, the teacher built from adapters on one base, and end to end: only the
adapter trains, syncs to vLLM (greedy equal to HF + peft after every step), checkpoints, resumes exactly and exports
as a merged model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
SMOKE = str(ROOT / "configs" / "smoke.yaml")  # the tiny-model smoke config


# ---- config --------------------------------------------------------------------------------------------------
def test_lora_is_off_by_default_and_sets_the_engine_rank():
    cfg = load_config(SMOKE)
    assert not cfg.model.lora.enabled
    on = load_config(SMOKE, ["model.lora.r=16"]).model.lora
    assert on.enabled and on.max_lora_rank == 16 and on.lora_alpha == 32.0
    assert on.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert load_config(SMOKE, ["model.lora.r=12"]).model.lora.max_lora_rank == 16  # smallest servable >= r
    assert load_config(SMOKE, ["model.lora.r=300"]).model.lora.max_lora_rank == 320


def test_vllm_serves_the_ranks_the_config_assumes():
    """`MaxLoRARanks = Literal[...]` in vLLM's LoRA config, read from its source (importing vLLM takes seconds)."""
    import ast
    import importlib.util

    from pipeline.config import VLLM_LORA_RANKS

    source = Path(importlib.util.find_spec("vllm").submodule_search_locations[0]) / "config" / "lora.py"
    [literal] = [node.value for node in ast.parse(source.read_text()).body if isinstance(node, ast.Assign)
                 and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["MaxLoRARanks"]]
    assert tuple(ast.literal_eval(literal.slice)) == VLLM_LORA_RANKS


@pytest.mark.parametrize("overrides, message", [
    (["model.lora.r=1024"], "model.lora.r=1024 is above the largest LoRA rank vLLM engines serve"),
    (["model.lora.r=8", "train.zero_stage=3"], "LoRA with train.zero_stage=3 is not supported; use 0 or 2"),
    (["model.lora.r=8", "sync.backend=nccl"], "sync.backend=nccl does not apply"),
    (["model.lora.r=8", "model.lora.target_modules=[]"], "model.lora.target_modules is empty"),
])
def test_config_errors_are_one_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(SMOKE, overrides)


def test_unknown_target_module_names_it_and_lists_the_linear_layers(tiny_model, tmp_path, capsys):
    from actors.adapters import check_targets_at
    from pipeline.cli import main as cli_main

    with pytest.raises(ConfigError) as e:
        check_targets_at(tiny_model, ["q_proj", "qkv_proj"])
    msg = str(e.value)
    assert "'qkv_proj'" in msg and "q_proj, up_proj, v_proj" in msg and "down_proj, gate_proj" in msg
    # `sdft train`: one line, before any actor starts
    assert cli_main(["train", "--output", str(tmp_path / "run"), SMOKE, "model.lora.r=8", "logging.progress=false",
                     "model.lora.target_modules=[q_proj,qkv_proj]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdft: error: model.lora.target_modules: the model (LlamaForCausalLM) has no linear layer "
                          "'qkv_proj'; its linear layers are down_proj, gate_proj, k_proj, lm_head, o_proj")


# ---- the teacher under LoRA: one base, adapters ----------------------------------------------------------------
def _peft_student(tiny_model, r=4):
    from transformers import AutoModelForCausalLM

    from actors.adapters import wrap

    lora = load_config(SMOKE, [f"model.lora.r={r}"]).model.lora
    return wrap(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), lora)


def _trainable(model) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def _reference_logits(tiny_model, adapter: dict[str, torch.Tensor] | None, ids):
    """A separate float64 HF + peft model with `adapter` (peft names) loaded; None: the plain base."""
    from peft import set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from actors.forward import completion_logits

    if adapter is None:
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    else:
        model = _peft_student(tiny_model)
        set_peft_model_state_dict(model, adapter)
    model = model.double().eval()
    with torch.no_grad():
        return completion_logits(model, *ids, pad_id=0)


@pytest.mark.parametrize("kind", ["ema", "frozen", "live"])
def test_teacher_kinds_under_lora_match_a_float64_reference(tiny_model, tmp_path, kind):
    from actors.adapters import STUDENT, adapter_params
    from actors.forward import completion_logits
    from actors.teacher import Teacher

    torch.manual_seed(0)
    student = _peft_student(tiny_model)
    base_before = {n: p.detach().clone() for n, p in student.named_parameters() if "lora_" not in n}
    alpha = 0.3
    teacher = Teacher(kind, student, ema_alpha=alpha, dtype=torch.float32, device="cpu")
    student.train()
    flags = _trainable(student)
    assert all(v == ("lora_" in n and ".default." in n) for n, v in flags.items())  # only the student adapter
    theta = adapter_params(student, STUDENT)
    phi = {k: v.detach().double().clone() for k, v in theta.items()}  # φ₀ = θ₀
    ids = ([[1, 5, 9, 13], [1, 7, 3]], [[20, 21, 2], [30, 31, 32, 2]])
    for _ in range(3):  # "optimizer steps": move A and B, then the teacher update
        with torch.no_grad():
            for p in theta.values():
                p.add_(torch.randn_like(p) * 0.2)
        teacher.update()
        phi = {k: alpha * theta[k].detach().double() + (1 - alpha) * v for k, v in phi.items()}
        got = teacher.logits(*ids, pad_id=0)
        assert _trainable(student) == flags and student.training  # scoring puts flags and mode back
        assert student.active_adapter == STUDENT
        if kind == "ema":
            want = _reference_logits(tiny_model, {k: v.float() for k, v in phi.items()}, ids)
            assert torch.allclose(got.double(), want, atol=1e-4)
            assert torch.allclose(teacher.masters[next(iter(phi))].double(), phi[next(iter(phi))], atol=1e-6)
        elif kind == "frozen":
            want = _reference_logits(tiny_model, None, ids)
            assert torch.allclose(got.double(), want, atol=1e-4)
        else:
            student.eval()
            with torch.no_grad():
                want = completion_logits(student, *ids, pad_id=0)
            student.train()
            assert torch.equal(got, want)
        hidden, w = teacher.hidden(*ids, pad_id=0)
        assert torch.allclose((hidden @ w.T).double(), got.double(), atol=1e-4)  # fused-linear inputs agree
    assert all(torch.equal(p, base_before[n]) for n, p in student.named_parameters() if "lora_" not in n)

    if kind == "ema":  # save / load: φ comes back exactly, as a peft adapter folder
        teacher.save(tmp_path)
        assert (tmp_path / "teacher_adapter" / "adapter_config.json").exists()
        other = Teacher(kind, _peft_student(tiny_model), ema_alpha=alpha, dtype=torch.float32, device="cpu")
        other.load(tmp_path)
        assert all(torch.equal(other.masters[k], teacher.masters[k]) for k in teacher.masters)
        assert torch.equal(other.logits(*ids, pad_id=0), teacher.logits(*ids, pad_id=0))


# ---- the learner: ZeRO stages and loss backends, only the adapter trains -------------------------------------
def _learner_run(ray, model, *overrides, steps=2):
    from actors.learner import Learner
    from actors.net import free_port
    from actors.weight_sync.object_store import bucket_tensors

    from samples import learner_samples

    cfg = load_config(SMOKE, ["model.lora.r=8", "train.batch_size=4", "train.micro_batch_size=2", "train.lr=1e-2",
                              "train.warmup_steps=0", "loss.skip_first_tokens=1", *overrides])
    actor = ray.remote(Learner).options(num_cpus=1, runtime_env={"env_vars": {"TRITON_INTERPRET": "1"}}).remote(
        cfg, model, 10, master_port=free_port())
    try:
        metrics = [ray.get(actor.step.remote(learner_samples())).as_dict() for _ in range(steps)]
        ray.get(actor.open_weight_sync.remote("lora", None))
        (exported,) = [ray.get(ref) for ref in actor.export_weights.options(num_returns="streaming").remote(0)]
        return metrics, dict(bucket_tensors(exported["student"]["tensors"])), exported["student"]["config"]
    finally:
        ray.kill(actor)


@pytest.mark.slow
def test_learner_zero2_and_fused_linear_train_the_adapter_like_zero0_torch(ray_session, tiny_model):
    from peft import get_peft_model_state_dict

    ref_m, ref_w, config = _learner_run(ray_session, tiny_model, "train.zero_stage=0", "loss.backend=torch")
    assert ref_m[1]["loss"] != ref_m[0]["loss"] and all(m["grad_norm"] > 0 for m in ref_m)
    assert config["r"] == 8 and sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    # exactly the student adapter, by the names peft writes (no base weight, no EMA teacher adapter)
    assert set(ref_w) == set(get_peft_model_state_dict(_peft_student(tiny_model, r=8)))
    assert all(v.abs().max() > 0 for k, v in ref_w.items() if "lora_B" in k)  # B left 0: the adapter trained
    # ZeRO-2, the fused lm_head + kernel (the student's hidden states come from under the peft wrapper) and
    # gradient checkpointing change how, not what: the same losses and adapter.
    m, w, _ = _learner_run(ray_session, tiny_model, "train.zero_stage=2", "loss.backend=fused_linear",
                           "loss.chunk_size=7", "train.gradient_checkpointing=true")
    assert [x["loss"] for x in m] == pytest.approx([x["loss"] for x in ref_m], rel=1e-4)
    for k in ref_w:
        assert torch.allclose(w[k], ref_w[k], atol=1e-4, rtol=1e-4), k


# ---- end to end ----------------------------------------------------------------------------------------------
RUN = ["logging.progress=false", "train.batch_size=4", "train.micro_batch_size=2", "rollout.max_new_tokens=12",
       "eval.max_new_tokens=8", "model.lora.r=8", "train.lr=2e-2", "train.warmup_steps=0", "train.zero_stage=2"]
STEPS = ["--steps", "4", "checkpoint.every=2", "checkpoint.keep_last=3"]


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _hf_greedy(model, prompts, n=8):
    model = model.eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            out.append(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                      pad_token_id=0)[0, len(p):].tolist())
    return out


PROMPTS = [[1, 87, 85, 263, 201], [1, 67, 85, 85, 275], [1, 40, 41, 42]]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, ray_session):
    """One LoRA SDFT run (ZeRO-2), 4 steps, 2 engines, every sync checked (vLLM + adapter greedy == HF + peft greedy); engine 1
    is killed after step 1 and must come back holding the current adapter."""
    import os
    import signal

    from pipeline.run.driver import train

    def kill_engine(step, actors):
        if step == 1:
            os.kill(ray_session.get(actors.engines[1].node.remote())["pid"], signal.SIGKILL)

    out = tmp_path_factory.mktemp("lora") / "straight"
    cfg = load_config(SMOKE, [f"output_dir={out}", *RUN, "train.steps=4", "checkpoint.every=2", "checkpoint.keep_last=3",
                              "sync.check_greedy=true", "rollout.num_engines=2", "ray.rollout_cpus=0.5"])
    train(cfg, on_step=kill_engine)
    return out


@pytest.mark.slow
def test_lora_sdft_run_trains_only_the_adapter_and_syncs_it(lora_run, tiny_model):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    records = _records(lora_run)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    assert records[-1]["rollout"]["engine_restarts"] == 1
    assert all(r["rollout"]["staleness_max"] == 0 for r in records[1:])  # the restarted engine got the current version
    for r in records[1:]:
        assert r["sync"]["greedy_match"] == 1.0  # both engines, after every step (the restarted one re-synced)
        assert 0 < r["sync"]["bytes"] < 100_000  # the adapter only (the base is ~400 kB)
        assert 0.5 < r["is_weight_mean"] <= 2.0  # vLLM + adapter and the learner agree on the sampled tokens
    ckpt = lora_run / "step_000004"
    for f in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "model/config.json",
              "teacher_adapter/adapter_model.safetensors", "deepspeed/latest"):
        assert (ckpt / f).exists(), f
    # The adapter moved; the base did not: model/ (merged) is exactly base + the adapter's (alpha/r)·B·A.
    adapter = load_file(ckpt / "adapter" / "adapter_model.safetensors")
    assert max(v.abs().max().item() for k, v in adapter.items() if "lora_B" in k) > 1e-3
    base = load_file(f"{tiny_model}/model.safetensors")
    merged = load_file(ckpt / "model" / "model.safetensors")
    scale = 16 / 8
    for key, w in base.items():
        prefix = "base_model.model." + key.removesuffix(".weight")
        if f"{prefix}.lora_A.weight" in adapter:
            delta = scale * adapter[f"{prefix}.lora_B.weight"] @ adapter[f"{prefix}.lora_A.weight"]
            assert torch.allclose(merged[key], w + delta, atol=1e-6), key
        else:
            assert torch.equal(merged[key], w), key  # embeddings, norms: untouched
    # The EMA teacher adapter trails the student's: after 4 steps at alpha 0.01, about 100x less B.
    teacher = load_file(ckpt / "teacher_adapter" / "adapter_model.safetensors")
    assert teacher.keys() == adapter.keys()
    b = [k for k in adapter if "lora_B" in k]
    assert 0 < max(teacher[k].abs().max() for k in b) < max(adapter[k].abs().max() for k in b) / 10
    # step_N/adapter loads with peft on the base and generates what the merged model/ generates (and it changed).
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), ckpt / "adapter")
    want = _hf_greedy(peft_model, PROMPTS)
    assert _hf_greedy(AutoModelForCausalLM.from_pretrained(ckpt / "model"), PROMPTS) == want
    assert _hf_greedy(AutoModelForCausalLM.from_pretrained(tiny_model), PROMPTS) != want


@pytest.mark.slow
def test_lora_resume_continues_exactly(lora_run, tmp_path):
    from safetensors.torch import load_file

    from pipeline.cli import main as cli_main

    want = [r["loss"] for r in _records(lora_run)[1:]]
    resumed = tmp_path / "resumed"
    shutil.copytree(lora_run, resumed, ignore=shutil.ignore_patterns("step_000004", "wandb"))
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    (resumed / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")  # stopped after its step-2 checkpoint
    assert cli_main(["train", "--output", str(resumed), "--resume", SMOKE, *RUN, *STEPS,
                     "rollout.num_engines=2", "ray.rollout_cpus=0.5"]) == 0
    got = [r["loss"] for r in _records(resumed) if "loss" in r]
    assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
    for name in ("adapter/adapter_model.safetensors", "teacher_adapter/adapter_model.safetensors"):
        a, b = load_file(lora_run / "step_000004" / name), load_file(resumed / "step_000004" / name)
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), name


@pytest.mark.slow
def test_merged_export_loads_in_hf_and_vllm_and_generates_like_the_adapter(lora_run, tmp_path, tiny_model,
                                                                          ray_session):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from actors.rollout import RolloutEngine, engine_env
    from pipeline.cli import main as cli_main

    ckpt, out = lora_run / "step_000004", tmp_path / "merged"
    assert cli_main(["export", str(ckpt), "--merge", str(out)]) == 0
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    assert (out / "tokenizer_config.json").exists() and not (out / "adapter_config.json").exists()
    want = _hf_greedy(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), ckpt / "adapter"),
                      PROMPTS)
    assert _hf_greedy(AutoModelForCausalLM.from_pretrained(out), PROMPTS) == want
    cfg = load_config(SMOKE, [f"model.path={out}"])  # LoRA off: a plain model
    engine = ray_session.remote(RolloutEngine).options(
        num_cpus=0.5, runtime_env={"env_vars": engine_env(cfg.rollout)}).remote(str(out), cfg)
    try:
        got = ray_session.get(engine.generate.remote(PROMPTS, max_new_tokens=8, temperature=0.0))
    finally:
        ray_session.kill(engine)
    assert [c.token_ids for c in got] == want
