"""The learner: student θ under DeepSpeed and the teacher φ; scores rollouts, steps, updates the EMA teacher.

One instance per data-parallel rank. Everything here runs in the learner's own process (a Ray actor), so it
controls its own thread count; vLLM never shares this process.
"""

from __future__ import annotations

import copy
import json
import os
import socket
from pathlib import Path

import torch

import kernels

from .loss import LossOutput, TokenLayout, sdft_loss, sft_loss, token_logprobs


def _pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def _inputs(contexts, completions, pad_id, device):
    """context ⊕ completion[:-1], right-padded: position len(context)-1+t predicts completion token t."""
    return _pad([c + y[:-1] for c, y in zip(contexts, completions)], pad_id, device)


def completion_logits(model, contexts: list[list[int]], completions: list[list[int]], pad_id: int) -> torch.Tensor:
    """Logits at the positions that predict each completion token, flattened to [N, V].

    A full forward of the model (so ZeRO-3's parameter hooks and tied embeddings behave), with the LM head
    applied only from the first completion position on (`logits_to_keep`).
    """
    ids, mask = _inputs(contexts, completions, pad_id, next(model.parameters()).device)
    first = min(len(c) for c in contexts) - 1
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=torch.arange(first, ids.shape[1])).logits
    return torch.cat([logits[i, len(c) - 1 - first : len(c) - 1 - first + len(y)]
                      for i, (c, y) in enumerate(zip(contexts, completions))])


def completion_hidden(model, contexts: list[list[int]], completions: list[list[int]], pad_id: int) -> torch.Tensor:
    """Final hidden states at the same positions, [N, H], for the fused-linear kernels (ZeRO <= 2)."""
    ids, mask = _inputs(contexts, completions, pad_id, next(model.parameters()).device)
    hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    return torch.cat([hidden[i, len(c) - 1 : len(c) - 1 + len(y)] for i, (c, y) in enumerate(zip(contexts, completions))])


def _dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


class Learner:
    """Student + teacher on one data-parallel rank. `cfg` is the run's Config as a dict."""

    def __init__(self, cfg: dict, model_path: str, total_steps: int, rank: int = 0, world_size: int = 1,
                 master_addr: str = "127.0.0.1", master_port: int = 29500):
        import deepspeed
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from pipeline.config import Config

        self.cfg = cfg = Config.model_validate(cfg)
        torch.manual_seed(cfg.train.seed + rank)
        on_gpu = torch.cuda.is_available()
        # One process per rank; Ray sets CUDA_VISIBLE_DEVICES to this rank's GPU, hence LOCAL_RANK 0.
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK="0")
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False)

        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.eos_id = self.tokenizer.eos_token_id
        self.dtype = _dtype(cfg.model.dtype)
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch.float32, trust_remote_code=cfg.model.trust_remote_code
        )
        if cfg.train.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        # The EMA teacher is kept in float32: with alpha=0.01 a bf16 copy would round most updates away.
        self.teacher = None
        if cfg.train.mode == "sdft" and cfg.teacher.kind in ("ema", "frozen"):
            self.teacher = copy.deepcopy(model).requires_grad_(False).eval()
            if on_gpu:
                self.teacher.to("cuda", dtype=torch.float32 if cfg.teacher.kind == "ema" else self.dtype)

        per_rank = cfg.sequences_per_step // world_size  # divisibility checked by Config
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=self._scheduler(optimizer, total_steps),
            config=self._ds_config(per_rank), dist_init_required=False,
        )
        self.rank, self.world_size = rank, world_size

    # ---- setup helpers -------------------------------------------------------------------------------------
    def _scheduler(self, optimizer, total_steps: int):
        from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

        t = self.cfg.train
        if t.lr_schedule == "cosine":
            return get_cosine_schedule_with_warmup(optimizer, t.warmup_steps, max(total_steps, 1))
        return get_constant_schedule_with_warmup(optimizer, t.warmup_steps)

    def _ds_config(self, seqs_per_rank: int) -> dict:
        t = self.cfg.train
        return {
            "train_micro_batch_size_per_gpu": t.micro_batch_size,
            "gradient_accumulation_steps": seqs_per_rank // t.micro_batch_size,
            "gradient_clipping": t.grad_clip,
            "zero_optimization": {"stage": t.zero_stage},
            "bf16": {"enabled": self.dtype == torch.bfloat16},
            "fp16": {"enabled": self.dtype == torch.float16},
            "zero_allow_untested_optimizer": True,  # a torch AdamW client optimizer under ZeRO
            "steps_per_print": 10**9,
        }

    # ---- scoring -------------------------------------------------------------------------------------------
    def _micro_loss(self, micro: list[dict]) -> LossOutput:
        cfg, device = self.cfg, self.engine.device
        student = self.engine  # forward through the engine: ZeRO-3 accumulates gradients correctly only then
        completions = [s["completion_ids"] for s in micro]
        layout = TokenLayout.from_lengths([len(y) for y in completions], device=device)
        ids = torch.tensor([t for y in completions for t in y], device=device)
        x, x_teacher = [s["student_ids"] for s in micro], [s.get("teacher_ids") for s in micro]
        if cfg.train.mode == "sft":
            return sft_loss(completion_logits(student, x, completions, self.pad_id), ids, layout, eos_id=self.eos_id)

        teacher = self.teacher if self.teacher is not None else student
        div = dict(divergence=cfg.loss.divergence, beta=cfg.loss.jsd_beta, temperature=cfg.loss.temperature)
        if cfg.loss.backend == "fused_linear":  # [N, V] logits exist only chunk by chunk
            with torch.no_grad():
                t_hidden = completion_hidden(teacher, x_teacher, completions, self.pad_id)
            s_hidden = completion_hidden(student, x, completions, self.pad_id)
            s_w = self.engine.module.get_output_embeddings().weight
            t_w = (self.teacher or self.engine.module).get_output_embeddings().weight
            per_token = kernels.fused_linear_token_divergence(
                s_hidden, s_w, t_hidden.to(s_hidden.dtype), t_w.to(s_w.dtype),
                chunk_size=cfg.loss.chunk_size, **div)
            logp_train = _chunked_token_logprobs(s_hidden, s_w, ids, cfg.loss.chunk_size)
        else:
            with torch.no_grad():
                t_logits = completion_logits(teacher, x_teacher, completions, self.pad_id)
            s_logits = completion_logits(student, x, completions, self.pad_id)
            per_token = kernels.token_divergence(s_logits, t_logits.to(s_logits.dtype), backend=cfg.loss.backend,
                                                 sampled_ids=ids, topk=cfg.loss.topk, **div)
            logp_train = token_logprobs(s_logits.detach(), ids)
        rollout_lp = torch.tensor([lp for s in micro for lp in s["logprobs"]], device=device)
        return sdft_loss(
            per_token, logp_train, ids, rollout_lp, layout, eos_id=self.eos_id,
            skip_first_tokens=cfg.loss.skip_first_tokens, is_cap=cfg.loss.is_cap if cfg.loss.is_correction else None,
        )

    def step(self, samples: list[dict]) -> dict:
        """One optimizer step over this rank's samples (micro-batched; DeepSpeed accumulates), then EMA."""
        self.engine.train()
        mb = self.cfg.train.micro_batch_size
        micro_batches = [samples[i : i + mb] for i in range(0, len(samples), mb)]
        loss = kl = 0.0
        tokens, weights, grad_norm = 0, [], None
        for micro in micro_batches:
            out = self._micro_loss(micro)
            self.engine.backward(out.loss)
            if self.engine.is_gradient_accumulation_boundary() and self.cfg.train.zero_stage == 0:
                grad_norm = _grad_norm(self.engine.module)  # ZeRO-0 does not record it; before clipping
            self.engine.step()
            loss += out.loss.item() / len(micro_batches)
            kl += out.divergence.item() / len(micro_batches)
            tokens += out.num_tokens
            weights.append(out.is_weights)
        if self.teacher is not None and self.cfg.teacher.kind == "ema":
            with self._full_params():
                ema_update(self.teacher, self.engine.module, self.cfg.teacher.ema_alpha)
        w = torch.cat(weights).float()
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        return {
            "loss": loss, "kl": kl, "tokens": tokens,
            "is_weight_mean": w.mean().item(), "is_weight_min": w.min().item(), "is_weight_max": w.max().item(),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": self.scheduler.get_last_lr()[0],
        }

    def _full_params(self):
        import contextlib

        import deepspeed

        if self.cfg.train.zero_stage == 3:
            return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()))
        return contextlib.nullcontext()

    # ---- weights out ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def export_weights(self, dtype: str | None = None, device="cpu") -> dict[str, torch.Tensor] | None:
        """Full HF-named state dict copied to `device`, for the rollout engines; None on ranks > 0.
        Under ZeRO-3 every rank must call it (the gather is collective)."""
        out_dtype = _dtype(dtype) if dtype else None
        with self._full_params():
            if self.rank != 0:
                return None
            sd = self.engine.module.state_dict()
            return {k: v.detach().to(device, dtype=out_dtype or v.dtype).clone() for k, v in sd.items()}

    @torch.no_grad()
    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """HF greedy completions of the current student (the reference the engines are checked against)."""
        model = self.engine.module.eval()
        out = []
        for p in prompts:
            ids = torch.tensor([p], device=self.engine.device)
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=self.pad_id, eos_token_id=self.eos_id)
            out.append(gen[0, len(p):].tolist())
        return out

    # GPU backends (vLLM's weight-transfer API, see weight_sync_gpu.py); rank 0 only.
    def gpu_sync_setup(self, backend: str, num_engines: int) -> list[dict]:
        import ray

        from .weight_sync_gpu import TrainerSender

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        self._sender = TrainerSender(backend, num_engines, ray.util.get_node_ip_address(), port)
        return [self._sender.init_info(i) for i in range(num_engines)]

    def gpu_sync_connect(self) -> None:
        self._sender.connect()

    def gpu_sync_update_info(self) -> tuple[dict, int]:
        # Under ZeRO-3 these are gathered copies; they must outlive the broadcast, so keep them until release.
        self._staged = self.export_weights(device=self.engine.device) if self.cfg.train.zero_stage == 3 else \
            dict(self.engine.module.state_dict())
        return (self._sender.update_info(self._staged.items()),
                sum(t.numel() * t.element_size() for t in self._staged.values()))

    def gpu_sync_send(self) -> None:
        self._sender.broadcast()

    def gpu_sync_release(self) -> None:
        self._sender.release()
        self._staged = None

    def node(self) -> dict:
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "rank": self.rank}

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def save(self, folder: str) -> None:
        """Student as an HF folder, teacher weights, DeepSpeed engine state (optimizer, scheduler, RNG)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        self.engine.save_checkpoint(str(folder / "deepspeed"), tag="state",
                                    client_state={"torch_rng": torch.get_rng_state()})
        with self._full_params():  # collective under ZeRO-3: every rank enters, rank 0 writes
            if self.rank == 0:
                self.engine.module.save_pretrained(folder / "model", safe_serialization=True)
        if self.rank == 0:
            self.tokenizer.save_pretrained(folder / "model")
            if self.teacher is not None and self.cfg.teacher.kind == "ema":
                sd = {k: v.contiguous() for k, v in self.teacher.state_dict().items()}
                save_file(_untie(sd), str(folder / "teacher.safetensors"))
            (folder / "learner.json").write_text(json.dumps({"world_size": self.world_size}))

    def load(self, folder: str) -> None:
        from safetensors.torch import load_file

        folder = Path(folder)
        _, client = self.engine.load_checkpoint(str(folder / "deepspeed"), tag="state")
        torch.set_rng_state(client["torch_rng"])
        if self.teacher is not None and self.cfg.teacher.kind == "ema":
            self.teacher.load_state_dict(load_file(str(folder / "teacher.safetensors")), strict=False)


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, alpha: float) -> None:
    """φ ← α·θ + (1−α)·φ, parameter by parameter (after every optimizer step)."""
    for p_t, p_s in zip(teacher.parameters(), student.parameters()):
        p_t.lerp_(p_s.detach().to(p_t.dtype), alpha)


@torch.no_grad()
def _grad_norm(model: torch.nn.Module) -> float:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))) if grads else 0.0


def _untie(sd: dict) -> dict:
    """safetensors refuses shared storage (tied embeddings): keep one copy of each tensor."""
    seen, out = set(), {}
    for k, v in sd.items():
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            out[k] = v
    return out


@torch.no_grad()
def _chunked_token_logprobs(hidden, weight, ids, chunk: int) -> torch.Tensor:
    return torch.cat([
        token_logprobs(hidden[i : i + chunk] @ weight.T, ids[i : i + chunk]) for i in range(0, len(ids), chunk)
    ])
