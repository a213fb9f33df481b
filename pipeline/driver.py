"""The training loop: batch -> rollout -> learner step -> weight sync -> metrics, strictly on-policy."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path

import ray

from actors.launcher import Actors, launch
from actors.rollout import generate_sharded

from . import checkpoint
from .config import Config
from .data import Example, batch_indices, load_splits
from .evaluation import evaluate
from .models import resolve_model
from .tracking import MetricsLogger


class SyncMismatch(RuntimeError):
    pass


def total_steps(cfg: Config, n_train: int) -> int:
    return cfg.train.steps or max(1, math.ceil(cfg.train.epochs * n_train / cfg.train.batch_size))


def sample_seeds(seed: int, step: int, n: int) -> list[int]:
    """Per-request sampling seeds: a function of (seed, step, index), so a resumed run samples the same."""
    return [((seed * 1_000_003 + step) * 65_537 + i) % (2**31 - 1) for i in range(n)]


@contextmanager
def timed(timings: dict, key: str):
    t0 = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - t0


def rollout_samples(actors: Actors, batch: list[Example], cfg: Config, step: int) -> tuple[list[dict], dict]:
    """The current student samples y ~ π_θ(·|x) for every prompt; returns learner samples + rollout stats."""
    prompts = [ex for ex in batch for _ in range(cfg.rollout.samples_per_prompt)]
    t0 = time.perf_counter()
    outs = generate_sharded(
        actors.engines, [ex.student_ids for ex in prompts], seeds=sample_seeds(cfg.train.seed, step, len(prompts)),
        max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
    )
    seconds = time.perf_counter() - t0
    samples = [
        {"student_ids": ex.student_ids, "teacher_ids": ex.teacher_ids, "completion_ids": o["token_ids"],
         "logprobs": o["logprobs"]}
        for ex, o in zip(prompts, outs)
    ]
    tokens = sum(len(o["token_ids"]) for o in outs)
    return samples, {"tokens": tokens, "tokens_per_s": tokens / seconds, "mean_length": tokens / len(outs),
                     "truncated_frac": sum(o["finish_reason"] == "length" for o in outs) / len(outs)}


def check_sync(actors: Actors, examples: list[Example], n: int = 2, max_new_tokens: int = 16) -> float:
    """vLLM greedy == learner (HF) greedy on a few prompts; raises if any engine disagrees."""
    prompts = [ex.student_ids for ex in examples[:n]]
    want = ray.get(actors.learner.greedy.remote(prompts, max_new_tokens))
    for e in actors.engines:
        got = [o["token_ids"] for o in ray.get(e.generate.remote(prompts, max_new_tokens=max_new_tokens, temperature=0.0))]
        if got != want:
            raise SyncMismatch(f"engine greedy output {got} differs from the learner's {want} after weight sync")
    return 1.0


def train(cfg: Config, resume: bool = False) -> dict:
    """Run SDFT (or the SFT baseline) as configured; returns a summary dict."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model(cfg.model.path, cfg.train.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    train_set, eval_set = load_splits(cfg, tokenizer)
    steps = total_steps(cfg, len(train_set))

    ckpt = checkpoint.latest(out) if resume else None
    state = checkpoint.trainer_state(ckpt) if ckpt else {"step": 0}
    actors = launch(cfg, model_path, steps)
    try:
        if ckpt:
            ray.get(actors.learner.load.remote(str(ckpt)))
        logger = MetricsLogger(cfg, out, resume_step=state["step"] if ckpt else None, wandb_id=state.get("wandb_id"))
        actors.sync.push(version=state["step"])  # engines start from the learner's weights (resumed or not)
        summary = {"steps": steps, "start_step": state["step"], "train_examples": len(train_set),
                   "eval_examples": len(eval_set)}
        if state["step"] == 0 and eval_set:
            summary["eval_before"] = evaluate(actors.engines, eval_set, tokenizer, cfg)
            logger.log(0, {"eval": summary["eval_before"]})

        bar = tqdm(range(state["step"], steps), initial=state["step"], total=steps, desc=cfg.train.mode,
                   disable=not cfg.logging.progress, dynamic_ncols=True)
        for step in bar:
            batch = [train_set[i] for i in batch_indices(step, cfg.train.batch_size, len(train_set),
                                                          cfg.train.seed, cfg.data.shuffle)]
            timings, record = {}, {}
            with timed(timings, "rollout"):
                if cfg.train.mode == "sdft":
                    samples, record["rollout"] = rollout_samples(actors, batch, cfg, step)
                else:  # SFT: the demonstrations are the targets; nothing to sample
                    samples = [{"student_ids": ex.student_ids, "completion_ids": ex.demo_ids} for ex in batch]
            with timed(timings, "learner"):
                record.update(ray.get(actors.learner.step.remote(samples)))
            with timed(timings, "sync"):
                sync = actors.sync.push(version=step + 1)
                if cfg.sync.check_greedy:
                    sync["greedy_match"] = check_sync(actors, train_set)
            record["sync"] = sync
            record["timing_s"] = timings
            record["learner_tokens_per_s"] = record["tokens"] / timings["learner"]
            done = step + 1
            if (cfg.eval.every and done % cfg.eval.every == 0) or done == steps:
                record["eval"] = evaluate(actors.engines, eval_set, tokenizer, cfg) if eval_set else {}
                summary["eval_after"] = record["eval"]
            logger.log(done, record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", kl=f"{record['kl']:.4f}")
            if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or done == steps:
                summary["checkpoint"] = str(checkpoint.save(actors.learner, out, done, cfg,
                                                            {"wandb_id": logger.wandb_id}))
            summary["last"] = record
        logger.finish()
        return summary
    finally:
        actors.shutdown()
