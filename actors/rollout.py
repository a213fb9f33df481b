"""The rollout engine: one vLLM engine that samples completions from the current student.

Runs as a Ray actor in its own process. On CPU the engine runs in-process (no engine-core subprocess,
eager mode), which starts in seconds. New weights arrive through this engine's end of the weight sync
(`actors/weight_sync`).
"""

from __future__ import annotations

import itertools
import os
import shutil
import time

from pipeline.config import Config

from .logs import drop_expected_vllm_warnings, redirect_output
from .messages import Completion, TeacherTopK

ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine core in this process: fast start, direct weight access
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_LOGGING_LEVEL": "WARNING",
}


def engine_env(rollout) -> dict[str, str]:
    """Environment the rollout actor's process needs before `import vllm` (`rollout`: the config's section).
    An eager engine (`rollout.enforce_eager`) also runs vLLM's few compiled helpers eagerly: the one the sampler
    calls for log-probs costs 3.4 s of tracing on the first generate (SmolLM2, CPU), then no faster than eager."""
    eager = {"TORCHDYNAMO_DISABLE": "1"} if rollout.enforce_eager else {}
    return {**ENGINE_ENV, **eager, "VLLM_CPU_KVCACHE_SPACE": str(rollout.cpu_kv_cache_gib)}


class RolloutEngine:
    """A vLLM engine behind a small interface: generate token ids with logprobs, load new weights."""

    def __init__(self, model_path: str, cfg: Config, engine_index: int = 0, sleep_mode: bool = False,
                 log_dir: str | None = None, sync_backend: str | None = None, role: str = "engine"):
        """`cfg`: the run's Config itself (Ray pickles the pydantic model), validated once in the driver;
        `sync_backend`: the resolved weight-sync backend, whose worker-side engine vLLM creates at start (None: an
        engine whose weights never change, e.g. `sdft eval`'s); `role`: `engine` (rollouts) or `teacher` (an engine of
        the teacher pool, which only scores), the name of its log file."""
        redirect_output(log_dir, f"{role}-{engine_index}")
        self.cfg = cfg
        for k, v in engine_env(cfg.rollout).items():
            os.environ.setdefault(k, v)
        import torch
        from vllm import LLM

        drop_expected_vllm_warnings()

        on_gpu = torch.cuda.is_available()
        kwargs = dict(
            model=model_path, dtype=cfg.model.resolved_dtype(on_gpu), seed=cfg.train.seed + engine_index, max_model_len=cfg.model.max_model_len,
            enforce_eager=cfg.rollout.enforce_eager, distributed_executor_backend="uni",
            trust_remote_code=cfg.model.trust_remote_code,
        )
        if on_gpu:
            kwargs["gpu_memory_utilization"] = cfg.rollout.gpu_memory_utilization
            kwargs["enable_sleep_mode"] = sleep_mode  # colocated: free the GPU while the learner trains
        if cfg.teacher_on_engines:  # teacher scoring: prompt log-probs of the teacher's top-k (-1: the vocabulary)
            kwargs["max_logprobs"] = cfg.teacher.topk
        if cfg.model.lora.enabled and not on_gpu:  # prompt log-probs: teacher scoring, eval.lm_eval
            from .vllm_fixes import patch_lora_prompt_logprobs

            patch_lora_prompt_logprobs()
        if cfg.model.lora.enabled:  # the base stays; the student arrives as LoRA adapters (weight_sync/lora.py)
            # the EMA teacher scored here is a second adapter next to the student's
            loras = 2 if cfg.teacher_on_engines and cfg.teacher.kind == "ema" else 1
            kwargs.update(enable_lora=True, max_lora_rank=cfg.model.lora.max_lora_rank, max_loras=loras)
        elif sync_backend is not None:  # full weights arrive through vLLM's weight-transfer API (weight_sync/receiver.py)
            from .weight_sync.receiver import engine_kwargs

            kwargs.update(engine_kwargs(sync_backend))
        self.llm = LLM(**kwargs)
        self.model_path = model_path
        self.sleep_mode = sleep_mode
        self.weight_version = 0
        self.lora_request = None  # under LoRA the student adapter in use; None: the base (a fresh adapter, B = 0)
        self.teacher_lora = None  # under LoRA with the EMA teacher scored here: its adapter; None: the base (phi_0)
        self.lora_ids = itertools.count(1)
        self.receiver = None  # this engine's end of the weight sync (open_weight_sync)

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float = 1.0,
                 seeds: list[int] | None = None, teacher_contexts: list[list[int]] | None = None,
                 stop: list[str] | None = None) -> list[Completion]:
        """Sample one completion per prompt; temperature 0 is greedy. Returns token ids, per-token sampling
        logprobs (of the raw model distribution), the weight version that produced them and the call's duration.
        With `teacher_contexts` (teacher.placement=engines, a teacher this engine holds) the completions are scored
        under the teacher at once, on the weights that sampled them (`score`). `stop`: strings that end a completion
        (lm-evaluation-harness's `until`)."""
        from vllm import SamplingParams

        def params(i):
            return SamplingParams(
                max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, logprobs=0,
                seed=None if seeds is None else seeds[i], stop=stop or None,
            )

        t0 = time.perf_counter()
        outs = self.llm.generate(
            [{"prompt_token_ids": p} for p in prompts], [params(i) for i in range(len(prompts))], use_tqdm=False,
            lora_request=self.lora_request,
        )
        seconds = time.perf_counter() - t0
        results = []
        for out in outs:
            c = out.outputs[0]
            ids = list(c.token_ids)
            logprobs = [lp[t].logprob for t, lp in zip(ids, c.logprobs)] if c.logprobs else []
            results.append(Completion(ids, logprobs, c.finish_reason, self.weight_version, seconds))
        if teacher_contexts is not None:
            for c, scores in zip(results, self.score(teacher_contexts, results)):
                c.teacher = scores
        return results

    def score(self, contexts: list[list[int]], completions: list[Completion]) -> list[TeacherTopK]:
        """The teacher's top-k (teacher.topk) at every token of each completion behind its teacher context: one prefill
        of context ⊕ completion with vLLM's prompt log-probs (raw model, temperature 1), one throw-away output token.
        The teacher is this engine's weights; under LoRA the adapter `teacher.kind` names (live: the student's, frozen:
        none, ema: the EMA adapter)."""
        from vllm import SamplingParams

        limit = self.cfg.model.max_model_len - 1  # the output token needs a slot
        prompts = [ctx + c.token_ids for ctx, c in zip(contexts, completions)]
        too_long = [len(p) for p in prompts if len(p) > limit]
        if too_long:
            raise ValueError(f"teacher context + completion of {max(too_long)} tokens does not fit model.max_model_len="
                             f"{self.cfg.model.max_model_len} of the engine scoring the teacher: raise model.max_model_len")
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=self.cfg.teacher.topk,
                                flat_logprobs=True, detokenize=False)
        t0 = time.perf_counter()
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False,
                                 lora_request=self._teacher_lora())
        seconds = time.perf_counter() - t0
        return [_topk_of(out.prompt_logprobs, len(ctx), len(c.token_ids), self.weight_version, seconds)
                for out, ctx, c in zip(outs, contexts, completions)]

    def loglikelihood(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """lm-evaluation-harness's scoring on this engine's student: for each (context, continuation) of token ids, the
        continuation's summed log-prob and whether greedy decoding would produce it, from one prefill with prompt
        log-probs (the token's own entry and the top-1)."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1, flat_logprobs=True, detokenize=False)
        outs = self.llm.generate([{"prompt_token_ids": ctx + cont} for ctx, cont in pairs], params, use_tqdm=False,
                                 lora_request=self.lora_request)
        results = []
        for out, (ctx, cont) in zip(outs, pairs):
            top = _topk_of(out.prompt_logprobs, len(ctx), len(cont), self.weight_version, 0.0)
            results.append((float(top.sampled.sum()), bool((top.ids[:, 0] == cont).all())))
        return results

    def _teacher_lora(self):
        if not self.cfg.model.lora.enabled:
            return None
        return {"live": self.lora_request, "frozen": None, "ema": self.teacher_lora}[self.cfg.teacher.kind]

    # ---- weights in: this engine's end of the weight sync (actors/weight_sync), called by the driver's WeightSync ----
    def open_weight_sync(self, backend: str) -> None:
        from .weight_sync import make_receiver

        self.receiver = make_receiver(backend, self)

    def init_weight_transfer(self, init_info: dict) -> None:
        self.receiver.init(init_info)

    def start_weight_update(self) -> None:
        self.receiver.begin()

    def update_weights(self, payload: dict) -> None:
        self.receiver.update(payload)

    def finish_weight_update(self, version: int) -> dict:
        return self.receiver.finish(version)

    def close_weight_sync(self) -> None:
        self.receiver.close()

    def restore_base(self) -> None:
        """Back to the initial weights (version 0): drop the student adapter under LoRA, else vLLM's in-place
        `reload_weights` (the layerwise reload the weight sync runs) fed with the base model's HF state dict. Not from
        disk alone: a checkpoint with tied embeddings has no `lm_head.weight`, and the CPU worker's separately
        prepacked LM head would stay the student's."""
        if self.lora_request is not None:
            self.llm.llm_engine.remove_lora(self.lora_request.lora_int_id)
            shutil.rmtree(self.lora_request.lora_path, ignore_errors=True)
            self.lora_request = None
        if not self.cfg.model.lora.enabled:
            import torch
            from transformers import AutoModelForCausalLM

            dtype = getattr(torch, self.cfg.model.resolved_dtype(torch.cuda.is_available()))
            base = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype,
                                                        trust_remote_code=self.cfg.model.trust_remote_code)
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(base.state_dict().items()),
                                                              "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()
        self.weight_version = 0

    def sleep(self) -> None:
        if self.sleep_mode:
            self.llm.sleep(level=1)

    def wake_up(self) -> None:
        if self.sleep_mode:
            self.llm.wake_up()

    def node(self) -> dict:
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "weight_version": self.weight_version}


def _topk_of(flat, start: int, length: int, version: int, seconds: float) -> TeacherTopK:
    """Positions start .. start + length - 1 of vLLM's flat prompt log-probs: each holds the prompt token's own entry,
    then the top-k by rank (all of them for k = -1), so every scored position has the same k + 1 entries."""
    import numpy as np

    a, b = flat.start_indices[start], flat.end_indices[start + length - 1]
    width = flat.end_indices[start] - a
    ids = np.asarray(flat.token_ids[a:b], dtype=np.int64).reshape(length, width)
    lps = np.asarray(flat.logprobs[a:b], dtype=np.float32).reshape(length, width)
    return TeacherTopK(ids[:, 1:], lps[:, 1:], lps[:, 0], version, seconds)


def submit_sharded(engines: list, prompts: list[list[int]], seeds: list[int] | None = None,
                   teacher_contexts: list[list[int]] | None = None, **sampling) -> list:
    """Spread prompts round-robin over the engines (Ray handles) without waiting: [(engine index, prompt
    indices, ObjectRef)], collected by `generate_sharded` or the scheduler. With `teacher_contexts` (one per prompt)
    each engine scores its completions under the teacher it holds, in the same call."""
    shards = []
    for i, e in enumerate(engines):
        idx = list(range(i, len(prompts), len(engines)))
        if idx:
            ref = e.generate.remote([prompts[j] for j in idx],
                                    seeds=None if seeds is None else [seeds[j] for j in idx],
                                    teacher_contexts=None if teacher_contexts is None else [teacher_contexts[j]
                                                                                            for j in idx],
                                    **sampling)
            shards.append((i, idx, ref))
    return shards


def generate_sharded(engines: list, prompts: list[list[int]], seeds: list[int] | None = None,
                     stall_timeout_s: float = 0, **sampling) -> list[Completion]:
    """Results in prompt order. An engine that makes no progress for `stall_timeout_s` is killed, and the call raises
    RayActorError as for a crash (actors/watchdog.py)."""
    from . import watchdog

    shards = submit_sharded(engines, prompts, seeds, **sampling)
    results = watchdog.wait([ref for _, _, ref in shards], [watchdog.Owner(f"rollout engine {i}", engines[i])
                                                            for i, _, _ in shards], stall_timeout_s, "evaluation")
    out: list[Completion] = [None] * len(prompts)  # type: ignore[list-item]
    for (_, idx, _), part in zip(shards, results):
        for j, r in zip(idx, part):
            out[j] = r
    return out
