"""The learner: student θ under DeepSpeed and the teacher φ; scores rollouts, steps, updates the EMA teacher.

One instance per data-parallel rank. Everything here runs in the learner's own process (a Ray actor), so it
controls its own thread count; vLLM never shares this process.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
from pathlib import Path

import numpy as np
import torch

import kernels
from pipeline.config import Config

from . import batching
from .forward import (attention_kwargs, chunked_token_logprobs, completion_hidden, completion_logits, token_counts,
                      token_kl_sum)
from .logs import redirect_output
from .loss import LossOutput, TokenLayout, sdft_loss, sft_loss, token_logprobs
from .messages import Sample, StepMetrics
from .teacher import Teacher


EXPORT_TIMEOUT_S = 600


class Learner:
    """Student + teacher on one data-parallel rank. `cfg` is the run's Config itself (Ray pickles the pydantic model;
    it was validated once, in the driver, so it is not validated again here)."""

    def __init__(self, cfg: Config, model_path: str, total_steps: int, rank: int = 0, world_size: int = 1,
                 master_addr: str = "127.0.0.1", master_port: int = 29500, log_dir: str | None = None):
        redirect_output(log_dir, f"learner-{rank}")
        import deepspeed
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        torch.manual_seed(cfg.train.seed + rank)
        on_gpu = torch.cuda.is_available()
        # One process per rank; Ray sets CUDA_VISIBLE_DEVICES to this rank's GPU, hence LOCAL_RANK 0.
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK="0")
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False)

        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.eos_id = self.tokenizer.eos_token_id
        self.dtype = getattr(torch, cfg.model.resolved_dtype(on_gpu))
        self.loss_backend = cfg.loss.resolved_backend(on_gpu)
        self.attention = attention_kwargs(cfg.train.packing, on_gpu)  # the teacher copies the student's config
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch.float32, trust_remote_code=cfg.model.trust_remote_code, **self.attention
        )
        if cfg.train.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.lora = cfg.model.lora.enabled
        if self.lora:  # the student is the base (frozen) + a LoRA adapter: only the adapter trains
            from .adapters import wrap

            model = wrap(model, cfg.model.lora)
            if cfg.train.gradient_checkpointing:  # checkpointed blocks need an input that requires grad
                model.enable_input_require_grads()
        self.teacher = None  # before DeepSpeed: ZeRO-3 partitions the model it is given
        if cfg.train.distills:
            self.teacher = Teacher(cfg.teacher.kind, model, ema_alpha=cfg.teacher.ema_alpha, dtype=self.dtype,
                                   device="cuda" if on_gpu else "cpu")

        per_rank = cfg.sequences_per_step // world_size  # divisibility checked by Config
        trainable = [p for p in model.parameters() if p.requires_grad]  # all of them, or the LoRA adapter's
        optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.engine, self.optimizer, _, self.lr_schedule = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=self._lr_schedule(optimizer, total_steps),
            config=self._ds_config(per_rank), dist_init_required=False,
        )
        self.senders = {}  # this rank's ends of the weight sync, by source (open_weight_sync)
        self._exported = threading.Condition()  # async mode: the newest weight version exported (export_weights)
        self._exported_version = -1
        self.model_path = model_path
        self._base = None  # kl_to_base's copy of the base model, loaded on first use when nothing else is the base

    # ---- setup helpers -------------------------------------------------------------------------------------
    def _lr_schedule(self, optimizer, total_steps: int):
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
            "bf16": {"enabled": self.dtype == torch.bfloat16,
                     "check_grad_overflow": t.on_nonfinite == "skip"},  # ZeRO then skips a non-finite step
            "fp16": {"enabled": self.dtype == torch.float16},
            "zero_allow_untested_optimizer": True,  # a torch AdamW client optimizer under ZeRO
            "steps_per_print": 10**9,
        }

    def _full_params(self):
        """The student's full parameters, readable on every rank (a collective gather under ZeRO-3)."""
        import deepspeed

        if self.cfg.train.zero_stage == 3:
            return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()))
        return contextlib.nullcontext()

    @torch.no_grad()
    def param_norm(self) -> float:
        """The L2 norm of every parameter of the student (frozen ones included: a LoRA run's adapter is measured against
        the whole model). ZeRO-3 ranks each hold a shard of every parameter: a collective of every rank."""
        zero3 = self.cfg.train.zero_stage == 3
        local = [_own_shard(p, self.rank) if zero3 else p for p in self.engine.module.parameters()]
        total = torch.stack([torch.linalg.vector_norm(t.float()) ** 2 for t in local]).sum()
        if zero3 and self.world_size > 1:
            torch.distributed.all_reduce(total)
        return total.sqrt().item()

    # ---- the SDFT step -------------------------------------------------------------------------------------
    def _micro_loss(self, micro: list[Sample]) -> LossOutput:
        """student forward → teacher scores → kernel → loss, on one micro-batch."""
        cfg, device, pad, packed = self.cfg, self.engine.device, self.pad_id, self.cfg.train.packing
        x, y = [s.student_ids for s in micro], [s.completion_ids for s in micro]
        layout = TokenLayout.from_lengths([len(c) for c in y], device=device)
        ids = torch.tensor([t for c in y for t in c], device=device)
        if cfg.train.mode == "sft":  # forward through the engine: only then does ZeRO-3 accumulate correctly
            return sft_loss(completion_logits(self.engine, x, y, pad, packed), ids, layout, eos_id=self.eos_id)

        x_teacher = [s.teacher_ids for s in micro]
        div = dict(divergence=cfg.loss.divergence, beta=cfg.loss.jsd_beta, temperature=cfg.loss.temperature)
        if self.loss_backend == "fused_linear":  # [N, V] logits exist only chunk by chunk
            s_hidden = completion_hidden(self.engine, x, y, pad, packed)
            s_w = self.engine.module.get_output_embeddings().weight
            t_hidden, t_w = self.teacher.hidden(x_teacher, y, pad, packed)
            per_token = kernels.fused_linear_token_divergence(
                s_hidden, s_w, t_hidden.to(s_hidden.dtype), t_w.to(s_w.dtype), chunk_size=cfg.loss.chunk_size, **div)
            logp_train = chunked_token_logprobs(s_hidden, s_w, ids, cfg.loss.chunk_size)
        elif micro[0].teacher_topk is not None:  # scored on the engines: the teacher's top-k arrived with the samples
            s_logits = completion_logits(self.engine, x, y, pad, packed)
            t_ids, t_logprobs = _teacher_topk(micro, device)
            per_token = kernels.sparse_topk_divergence(s_logits, t_ids, t_logprobs, tail=cfg.loss.topk_tail,
                                                       backend=self.loss_backend)
            logp_train = token_logprobs(s_logits.detach(), ids)
        else:
            s_logits = completion_logits(self.engine, x, y, pad, packed)
            t_logits = self.teacher.logits(x_teacher, y, pad, packed)
            per_token = kernels.token_divergence(s_logits, t_logits.to(s_logits.dtype), backend=self.loss_backend,
                                                 sampled_ids=ids, topk=cfg.loss.topk, **div)
            logp_train = token_logprobs(s_logits.detach(), ids)
        rollout_lp = torch.tensor([lp for s in micro for lp in s.logprobs], device=device)
        return sdft_loss(
            per_token, logp_train, ids, rollout_lp, layout, eos_id=self.eos_id,
            skip_first_tokens=cfg.loss.skip_first_tokens, is_cap=cfg.is_cap, token_clip=cfg.loss.token_clip,
        )

    @torch.no_grad()
    def _teacher_gap(self, samples: list[Sample], n: int = 2) -> float:
        """Mean |engine - learner| teacher log-prob of the sampled tokens of the first `n` samples: the engines scored
        them, the learner's own teacher scores them again (teacher.check_every; before this step's update, when both
        should hold the same teacher)."""
        part = samples[:n]
        y = [s.completion_ids for s in part]
        ids = torch.tensor([t for c in y for t in c], device=self.engine.device)
        mine = token_logprobs(self.teacher.logits([s.teacher_ids for s in part], y, self.pad_id,
                                                  self.cfg.train.packing), ids)
        theirs = torch.from_numpy(np.concatenate([s.teacher_topk.sampled for s in part])).to(mine)
        return (mine - theirs).abs().mean().item()

    def step(self, samples: list[Sample], hold: int | None = None, check_teacher: bool = False) -> StepMetrics:
        """One optimizer step over this rank's samples (micro-batched; DeepSpeed accumulates), then the teacher
        update. With `hold`, the current weights are being exported as that version next to this step (async mode:
        `export_weights` in the actor's `sync` concurrency group): forward and backward run meanwhile, the update waits
        for the export to finish. `check_teacher`: measure teacher/logprob_gap on samples the engines scored."""
        scored = samples[0].teacher_topk is not None
        gap = self._teacher_gap(samples) if check_teacher and scored else None
        self.engine.train()
        micro_batches = self._micro_batches(samples)
        loss = kl = 0.0
        tokens, weights, grad_norm = 0, [], None
        real = computed = 0  # tokens of the learner's forwards, and those with padding (pad_fraction)
        skipped_before = self.engine.skipped_steps
        skip = False  # ZeRO-0, train.on_nonfinite=skip: a non-finite gradient drops the update
        for k, micro in enumerate(micro_batches):
            # each sequence weighs 1 / len(samples) whatever its micro-batch (the per-sequence loss, then the mean)
            share = len(micro) / len(samples)
            self.engine.set_gradient_accumulation_boundary(k == len(micro_batches) - 1)
            out = self._micro_loss(micro)
            self.engine.backward(out.loss * share, scale_wrt_gas=False)
            if self.engine.is_gradient_accumulation_boundary() and self.cfg.train.zero_stage == 0:
                grad_norm = _grad_norm(self.engine.module)  # ZeRO-0 does not record it; before clipping
                skip = self.cfg.train.on_nonfinite == "skip" and not math.isfinite(grad_norm)
            if hold is not None and self.engine.is_gradient_accumulation_boundary():
                self._await_export(hold)
            with _without_optimizer_step(self.engine.optimizer) if skip else contextlib.nullcontext():
                self.engine.step()  # the step's bookkeeping (schedule, counters, zeroed gradients) still happens
            loss += out.loss.item() * share
            kl += out.divergence.item() * share
            tokens += out.num_tokens
            weights.append(out.is_weights)
            for r, c in self._forward_tokens(micro):
                real, computed = real + r, computed + c
        if self.teacher is not None:
            self.teacher.update(self._full_params)
        w = torch.cat(weights).float()
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        return StepMetrics(
            loss=loss, kl=kl, tokens=tokens,
            is_weight_mean=w.mean().item(), is_weight_min=w.min().item(), is_weight_max=w.max().item(),
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            param_norm=self.param_norm(),
            lr=self.lr_schedule.get_last_lr()[0],
            # ZeRO 1-3 drop a step whose gradient norm is not finite themselves (bf16: check_grad_overflow)
            skipped=int(skip or self.engine.skipped_steps > skipped_before),
            pad_fraction=1 - real / computed,
            topk_mass=_topk_mass(samples) if scored else None,
            logprob_gap=gap,
        )

    def _micro_batches(self, samples: list[Sample]) -> list[list[Sample]]:
        """train.micro_batch_size sequences each, or whole sequences up to train.micro_batch_tokens (the student's
        tokens) each, as many on every rank (actors/batching.py)."""
        t = self.cfg.train
        if t.micro_batch_tokens is None:
            groups = batching.by_count(len(samples), t.micro_batch_size)
        else:
            lengths = [len(s.student_ids) + len(s.completion_ids) - 1 for s in samples]
            groups = batching.by_tokens(lengths, t.micro_batch_tokens)
            if self.world_size > 1:
                count = torch.tensor([len(groups)], device=self.engine.device)
                torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
                groups = batching.split_to(groups, int(count.item()), lengths)
        return [[samples[i] for i in g] for g in groups]

    def _forward_tokens(self, micro: list[Sample]) -> list[tuple[int, int]]:
        """(real, computed) tokens of each forward this micro-batch took: the student's, and the teacher's."""
        y, packed = [s.completion_ids for s in micro], self.cfg.train.packing
        out = [token_counts([s.student_ids for s in micro], y, packed)]
        if self.teacher is not None and micro[0].teacher_topk is None:
            out.append(token_counts([s.teacher_ids for s in micro], y, packed))
        return out

    # ---- weights out: this rank's end of the weight sync (actors/weight_sync), called by the driver's WeightSync ----
    def open_weight_sync(self, backend: str, dtype: str | None, source: str = "student") -> None:
        from .weight_sync import make_sender

        self.senders[source] = make_sender(backend, self, dtype, source)

    def weight_source(self, source: str) -> tuple[torch.nn.Module, bool]:
        """(module, whether ZeRO-3 partitions it) of the weights a sender sends: the student, or the teacher's full
        copy (full fine-tuning, teacher.kind=ema: phi, pushed to the teacher engine pool)."""
        if source == "teacher":
            return self.teacher.model, False
        return self.engine.module, self.cfg.train.zero_stage == 3

    def weight_init_info(self, num_engines: int, source: str = "student") -> list[dict]:
        return self.senders[source].init_info(num_engines)

    def connect_weight_sync(self, source: str = "student") -> None:
        self.senders[source].connect()

    def export_weights(self, version: int, source: str = "student"):
        """The payloads of weight version `version`, as a streaming call in the `sync` concurrency group. A
        `step(..., hold=version)` running next to it updates the weights once the export is done (returned or
        failed: a failure reaches the driver with the stream)."""
        try:
            yield from self.senders[source].updates()
        finally:
            if source == "student":
                with self._exported:
                    self._exported_version = max(self._exported_version, version)
                    self._exported.notify_all()

    def send_weights(self, source: str = "student") -> None:
        self.senders[source].send()

    def release_weights(self, source: str = "student") -> None:
        self.senders[source].release()

    def close_weight_sync(self, source: str = "student") -> None:
        self.senders[source].close()

    def _await_export(self, version: int) -> None:
        with self._exported:
            if not self._exported.wait_for(lambda: self._exported_version >= version, timeout=EXPORT_TIMEOUT_S):
                raise RuntimeError(f"the export of weight version {version} did not finish within "
                                   f"{EXPORT_TIMEOUT_S}s; the update waiting for it is not applied")

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

    # ---- distance to the base model (forgetting monitor, teacher gate) -------------------------------------------
    @torch.no_grad()
    def kl_to_base(self, sequences: list[tuple[list[int], list[int]]],
                   base_contexts: list[list[int]] | None = None) -> float:
        """Mean per-token KL(base || student) on the answers of (prompt_ids, answer_ids) pairs. With `base_contexts`
        the base reads each answer behind its own context (the gate: the teacher context, before step 1)."""
        total, count = token_kl_sum(self.engine.module.eval(), self._base_logits(), sequences, self.pad_id,
                                    self.cfg.train.micro_batch_size, base_contexts, self.cfg.train.packing)
        return total / count if count else 0.0

    def _base_logits(self):
        """(contexts, answers) -> [N, V] logits of the base model, at no extra memory where one is at hand: the
        teacher while it is the base (frozen, or any kind before the first optimizer step), the LoRA model with its
        adapter off; else a copy loaded once from model.path, kept on the CPU."""
        if self.teacher is not None and (self.teacher.kind == "frozen" or self.engine.global_steps == 0):
            return lambda x, y: self.teacher.logits(x, y, self.pad_id, self.cfg.train.packing)
        if self.lora:
            def adapter_off(x, y):
                with self.engine.module.disable_adapter():
                    return completion_logits(self.engine.module, x, y, self.pad_id, self.cfg.train.packing)
            return adapter_off
        if self._base is None:
            from transformers import AutoModelForCausalLM

            self._base = AutoModelForCausalLM.from_pretrained(
                self.model_path, dtype=self.dtype, trust_remote_code=self.cfg.model.trust_remote_code,
                **self.attention).eval()
        return lambda x, y: completion_logits(self._base, x, y, self.pad_id, self.cfg.train.packing)

    def node(self) -> dict:
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "rank": self.rank}

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def save(self, folder: str) -> None:
        """Student as an HF folder, the teacher's state, DeepSpeed engine state (optimizer, scheduler, RNG).

        Under LoRA: `model/` is base + student adapter merged (a plain HF model, for `sdft eval` and vLLM),
        `adapter/` the student adapter in peft format, `teacher_adapter/` the EMA adapter, and the DeepSpeed state
        holds only the trainable (adapter) parameters besides the optimizer: the base comes from model.path."""
        folder = Path(folder)
        self.engine.save_checkpoint(str(folder / "deepspeed"), tag="state",
                                    client_state={"torch_rng": torch.get_rng_state()},
                                    exclude_frozen_parameters=self.lora)
        if self.lora:
            if self.rank == 0:
                from .adapters import STUDENT, save_merged

                self.engine.module.save_pretrained(folder / "adapter", selected_adapters=[STUDENT])
                save_merged(self.engine.module, folder / "model")
        else:
            with self._full_params():  # collective under ZeRO-3: every rank enters, rank 0 writes
                if self.rank == 0:
                    self.engine.module.save_pretrained(folder / "model", safe_serialization=True)
        if self.rank == 0:
            self.tokenizer.save_pretrained(folder / "model")
            if self.teacher is not None:
                self.teacher.save(folder)
            (folder / "learner.json").write_text(json.dumps({"world_size": self.world_size}))

    def load(self, folder: str) -> None:
        """Restore a checkpoint written by `save`. Nothing in it can run code: the DeepSpeed state is read with
        torch.load(weights_only=True) (`_WeightsOnlyLoads`), the teacher and adapters are safetensors."""
        folder = Path(folder)
        if not isinstance(self.engine.checkpoint_engine, _WeightsOnlyLoads):
            self.engine.checkpoint_engine = _WeightsOnlyLoads(self.engine.checkpoint_engine)
        _, client = self.engine.load_checkpoint(str(folder / "deepspeed"), tag="state",
                                                load_module_strict=not self.lora)  # LoRA: the adapter only
        torch.set_rng_state(client["torch_rng"])
        if self.teacher is not None:
            self.teacher.load(folder)


def _deepspeed_safe_globals() -> list:
    """The only classes DeepSpeed 0.19 pickles into its state besides tensors and builtins (ZeRO stages 0-3, fp32,
    bf16 and fp16, LoRA), as listed by torch.serialization.get_unsafe_globals_in_checkpoint on each: plain data
    holders, rebuilt without calling any of their code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class _WeightsOnlyLoads:
    """DeepSpeed's checkpoint engine with its load replaced. DeepSpeed has no option for it: its TorchCheckpointEngine
    calls torch.load(weights_only=False), which runs whatever a pickled object's __reduce__ names. Every file
    `load_checkpoint` reads for this learner (model states, ZeRO optimizer partitions) goes through
    `engine.checkpoint_engine.load`, so this one method is the whole change; saving and the rest are delegated."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def load(self, path: str, map_location=None):
        import pickle
        import re

        from pipeline.errors import CheckpointError

        try:
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:  # torch's message is many lines of advice to load it unsafely
            found = re.search(r"GLOBAL ([\w.]+)", str(e)) or re.search(r"WeightsUnpickler error: ([^\n]+)", str(e))
            what = found.group(1) if found else "not tensors or plain data"
            raise CheckpointError(f"{path} holds objects a checkpoint may not ({what}): refused to load it, nothing "
                                  "in it ran") from None


def _teacher_topk(micro: list[Sample], device) -> tuple[torch.Tensor, torch.Tensor]:
    """The engines' teacher top-k of a micro-batch's tokens, flattened like the student's rows: [N, k] ids, log-probs."""
    topk = [s.teacher_topk for s in micro]
    return (torch.from_numpy(np.concatenate([t.ids for t in topk])).to(device),
            torch.from_numpy(np.concatenate([t.logprobs for t in topk])).to(device))


def _topk_mass(samples: list[Sample]) -> float:
    """The teacher's mean mass on its top-k over every token of the samples (1 for the full vocabulary)."""
    logprobs = np.concatenate([s.teacher_topk.logprobs for s in samples]).astype(np.float64)
    return float(np.exp(logprobs).sum(-1).mean())


@contextlib.contextmanager
def _without_optimizer_step(optimizer):
    """DeepSpeed's step at this boundary leaves the weights and the optimizer state as they are (ZeRO-0 has no
    overflow check of its own: a skipped update, train.on_nonfinite=skip)."""
    optimizer.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del optimizer.step  # the class's step again


def _own_shard(param: torch.nn.Parameter, rank: int) -> torch.Tensor:
    """This rank's ZeRO-3 shard of a parameter, without the padding of the last shard (left uninitialized)."""
    shard = param.ds_tensor
    return shard.narrow(0, 0, max(0, min(shard.numel(), param.ds_numel - rank * shard.numel())))


@torch.no_grad()
def _grad_norm(model: torch.nn.Module) -> float:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))) if grads else 0.0
