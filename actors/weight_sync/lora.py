"""LoRA backend (`model.lora`): only the student adapter travels, through Ray's object store, as a peft adapter.

The engines run the base model with LoRA enabled (`enable_lora`, `max_lora_rank`); the base never changes. After
every step learner rank 0 exports its student adapter (the tensors `get_peft_model_state_dict` gives, plus the
adapter config): a few MB that Ray puts once in shared memory. Each engine writes it to a temp folder of its own as
a peft adapter (`adapter_config.json` + `adapter_model.safetensors`; engines on other nodes share no filesystem
with the learner), loads it as a new `LoRARequest` (a fresh id per load), drops the previous one and its folder,
and samples with it from then on (`RolloutEngine.lora_request`).

Version 0 is the fresh adapter, B = 0: the base itself, which an engine without any adapter (just started, or
restarted after a crash) samples from. A restarted engine is re-synced like any other: it gets the current adapter.
ZeRO-3 is not supported with LoRA (config error), so every rank holds the whole adapter and rank 0 alone exports.

With the EMA teacher scored on the engines (`teacher.placement=engines`) the payload also carries the teacher adapter
φ, loaded the same way as the engine's second adapter (`RolloutEngine.teacher_lora`): one push, both adapters.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch

from .object_store import bucket_payload, bucket_tensors


class LoRASender:
    """Learner side (rank 0 exports; the other ranks hold the same adapter)."""

    def __init__(self, learner, dtype: str | None = None):
        self.learner = learner
        self.dtype = getattr(torch, dtype) if dtype else None

    def init_info(self, num_engines: int) -> list[dict]:
        return [{}] * num_engines

    def connect(self) -> None:
        """Nothing to join."""

    def updates(self):
        """The one payload: the student adapter's config and tensors (and the EMA teacher's when the engines score
        it), put once into the object store."""
        from ..adapters import STUDENT, TEACHER

        cfg = self.learner.cfg
        payload = {"student": self._adapter(STUDENT)}
        if cfg.teacher_on_engines and cfg.teacher.kind == "ema":
            payload["teacher"] = self._adapter(TEACHER)
        yield payload

    def _adapter(self, name: str) -> dict:
        from ..adapters import adapter_config, adapter_params

        model = self.learner.engine.module
        tensors = [(key, p.detach().to(device="cpu", dtype=self.dtype or p.dtype))
                   for key, p in adapter_params(model, name).items()]
        return {"config": adapter_config(model, name), "tensors": bucket_payload(tensors)}

    def send(self) -> None:
        """Everything went in the payload."""

    def release(self) -> None:
        """The object store frees the adapter once every engine has loaded it."""

    def close(self) -> None:
        """Nothing to leave."""


class LoRAReceiver:
    """Engine side: the adapter arrives in one `update`, goes live at `finish`. The adapter in use is the engine's own
    `lora_request` (None: the base), so a receiver opened again on a live engine carries on from it."""

    def __init__(self, engine):
        self.engine, self.stats = engine, {}
        previous = engine.lora_request
        # Each adapter in a folder of its own under one temp folder per engine process; the one in use is kept
        # (vLLM reads it again should it ever drop it from its cache), the previous one deleted.
        self.root = Path(previous.lora_path).parent if previous is not None else Path(
            tempfile.mkdtemp(prefix="sdft-lora-"))

    def init(self, init_info: dict) -> None:
        """No transfer engine: vLLM loads adapters by itself."""

    def begin(self) -> None:
        self.stats = {"load_s": 0.0, "bytes": 0}

    def update(self, payload: dict) -> None:
        t0 = time.perf_counter()
        self.stats = {"bytes": sum(self._load(adapter, slot) for slot, adapter in (
            ("lora_request", payload["student"]), ("teacher_lora", payload.get("teacher"))) if adapter is not None)}
        self.stats["load_s"] = time.perf_counter() - t0

    def _load(self, adapter: dict, slot: str) -> int:
        """Load `adapter` as a new vLLM adapter into the engine's `slot` attribute, dropping the one it replaces;
        returns its size in bytes."""
        from vllm.lora.request import LoRARequest

        from ..adapters import write_adapter

        tensors = dict(bucket_tensors(adapter["tensors"]))
        previous = getattr(self.engine, slot)
        lora_id = next(self.engine.lora_ids)  # vLLM caches adapters by id: a new one each time
        folder = write_adapter(self.root / f"adapter-{lora_id}", adapter["config"], tensors)
        request = LoRARequest(f"{slot}-{lora_id}", lora_id, str(folder))
        engine = self.engine.llm.llm_engine
        if not engine.add_lora(request):
            raise RuntimeError(f"vLLM did not load the adapter from {folder}")
        setattr(self.engine, slot, request)
        if previous is not None:
            engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def finish(self, version: int) -> dict:
        self.engine.llm.reset_prefix_cache()  # cached prefixes were computed under the previous adapter
        self.engine.weight_version = version
        return self.stats

    def close(self) -> None:
        """Nothing to leave."""
