"""LoRA (`model.lora`): the student as a peft model on the frozen base, and the adapter's ways out of it.

Under LoRA the learner holds one copy of the base weights. Adapters on it, by peft adapter name:

* `default` (STUDENT): the student θ, the only trainable parameters;
* `teacher` (TEACHER): the EMA teacher φ (`teacher.kind=ema` only; actors/teacher.py).

What leaves the learner is the student adapter in peft's own format (`get_peft_model_state_dict` names,
`adapter_config.json`): the weight sync to vLLM (actors/weight_sync/lora.py) and `step_N/adapter/`; `step_N/model/`
holds base + adapter merged into a plain HF model (`merged_state_dict`), which `sdft eval` and vLLM load as is.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

STUDENT = "default"  # peft's name for the adapter `get_peft_model` creates
TEACHER = "teacher"
ADAPTER_CONFIG = "adapter_config.json"  # peft's file names: what PeftModel.from_pretrained and vLLM read
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def is_peft(model) -> bool:
    return callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config")


def linear_names(model: torch.nn.Module) -> list[str]:
    """The distinct last name components of the model's linear layers (what `target_modules` entries match)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def check_targets(model: torch.nn.Module, targets: list[str]) -> None:
    """Every `model.lora.target_modules` entry must name linear layers of the model (peft's suffix match: the
    module name equals it or ends with `.` + it); peft itself fails only when none matches."""
    from pipeline.errors import ConfigError

    names = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in names):
            raise ConfigError(
                f"model.lora.target_modules: the model ({type(model).__name__}) has no linear layer {t!r}; its linear "
                f"layers are {', '.join(linear_names(model))}")


def check_targets_at(model_path: str, targets: list[str], trust_remote_code: bool = False) -> None:
    """`check_targets` on the model at `model_path` built on the meta device (no weights read or allocated), so a
    bad name fails before any actor starts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    check_targets(model, targets)


def peft_config(lora):
    """peft's LoraConfig for the `model.lora` section."""
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.dropout,
                      target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM")


def wrap(model: torch.nn.Module, lora) -> torch.nn.Module:
    """The student: `model` (an HF causal LM) with a fresh LoRA adapter (B = 0, so it starts as the base); every
    base parameter frozen, only the adapter trainable."""
    from peft import get_peft_model

    check_targets(model, lora.target_modules)
    return get_peft_model(model, peft_config(lora))


def adapter_params(model, adapter: str = STUDENT) -> dict[str, torch.nn.Parameter]:
    """peft checkpoint name (as `get_peft_model_state_dict` writes it) -> the adapter's live parameter."""
    tag = f".{adapter}."
    return {name.replace(tag, "."): p for name, p in model.named_parameters() if "lora_" in name and tag in name}


def adapter_config(model, adapter: str = STUDENT) -> dict:
    """The adapter's `adapter_config.json` contents (what peft's save_pretrained writes)."""
    out = model.peft_config[adapter].to_dict()
    for k, v in out.items():
        if isinstance(v, set):
            out[k] = sorted(v)
    return json.loads(json.dumps(out, default=str))


def write_adapter(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """A peft adapter folder: `adapter_config.json` + `adapter_model.safetensors`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(folder / ADAPTER_WEIGHTS))
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=1))
    return folder


def read_adapter(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / ADAPTER_WEIGHTS))


@torch.no_grad()
def merged_state_dict(model, adapter: str = STUDENT, device="cpu") -> dict[str, torch.Tensor]:
    """The plain HF state dict of base + `adapter` merged (W + (alpha/r)·B·A in every adapted layer), copied to
    `device`; the live model is left as it is (no merge in place). Tied tensors stay shared."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    deltas = {f"{name}.base_layer.weight": m.get_delta_weight(adapter) for name, m in base.named_modules()
              if isinstance(m, LoraLayer) and adapter in m.lora_A}
    out, copies = {}, {}
    for key, t in base.state_dict().items():
        if ".lora_" in key:
            continue
        if key in deltas:
            merged = (t.float() + deltas[key].float()).to(device=device, dtype=t.dtype)
        else:
            ident = (t.data_ptr(), t.dtype, tuple(t.shape))
            if ident not in copies:
                copies[ident] = t.detach().to(device=device, copy=True)
            merged = copies[ident]
        out[key.replace(".base_layer.", ".")] = merged
    return out


def save_merged(model, folder: Path, adapter: str = STUDENT) -> None:
    """Base + adapter merged, written as a plain HF model folder (config.json + safetensors)."""
    base = model.get_base_model()
    base.save_pretrained(folder, state_dict=merged_state_dict(model, adapter), safe_serialization=True)
