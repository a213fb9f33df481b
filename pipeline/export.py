"""`sdft export CHECKPOINT --merge OUT`: a checkpoint's student as one plain HF model folder (config, safetensors,
tokenizer) that `AutoModelForCausalLM.from_pretrained` and vLLM load without peft.

A LoRA checkpoint (`step_N/adapter/`) is merged from its parts: the base named by the checkpoint's own config
(`model.path`, resolved as `sdft train` does) with the adapter loaded by `PeftModel.from_pretrained` and folded in
(`merge_and_unload`, in float32, then saved in the base's dtype). A full fine-tuning checkpoint already holds the
whole model (`step_N/model/`); it is written out the same way.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .run.checkpoint import OutputError, verify
from .config import load_config
from .models import ModelNotFound, resolve_model


def export_merged(checkpoint: Path, out: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint, out = Path(checkpoint), Path(out)
    config_file, adapter, model_dir = checkpoint / "config.yaml", checkpoint / "adapter", checkpoint / "model"
    if not config_file.exists() or not (model_dir / "config.json").exists():
        raise ModelNotFound(f"{checkpoint} is not a checkpoint written by `sdft train` (a step_* folder with "
                            "config.yaml and model/)")
    verify(checkpoint)  # its manifest: nothing damaged or swapped since it was written
    if out.exists() and not out.is_dir():
        raise OutputError(f"--merge {out} is a file: give a new folder")
    if out.exists() and any(out.iterdir()):
        raise OutputError(f"{out} is not empty: give --merge a new folder")
    cfg = load_config(config_file)
    remote = cfg.model.trust_remote_code
    if (adapter / "adapter_config.json").exists():
        from peft import PeftModel

        base_path = resolve_model(cfg.model.path, cfg.train.seed)
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, trust_remote_code=remote)
        stored = getattr(base.config, "dtype", None)
        model = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
        if isinstance(stored, torch.dtype) and stored.is_floating_point:
            model.to(stored)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=remote)
    tmp = out.with_name(f".{out.name}.tmp")  # written aside, then renamed: never a half-written model folder
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_dir, trust_remote_code=remote).save_pretrained(tmp)
    if out.exists():
        out.rmdir()  # empty, checked above
    os.replace(tmp, out)
    return out
