"""The training loop: batch -> rollout -> learner step -> weight sync -> metrics (-> eval, checkpoint).

Strictly on-policy by default; with async.max_staleness = k generation runs up to k steps ahead
(pipeline/scheduler.py). Learner ranks each take an equal slice of the step's samples.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import ray
from ray.exceptions import RayActorError

from actors.launcher import Actors, init_ray, launch, stop_private_ray
from actors.messages import Sample, StepMetrics

from . import checkpoint, gate
from .config import MAX_CONSECUTIVE_SKIPS, Config
from .console import forget_log, log_to_file, print_header
from .data import Example, batch_indices, load_splits
from .evaluation import check_metric, evaluate_all, load_eval_sets
from .models import resolve_model
from .monitor import ForgettingMonitor
from .scheduler import RolloutScheduler
from .tracking import MetricsLogger


class SyncMismatch(RuntimeError):
    pass


def total_steps(cfg: Config, n_train: int) -> int:
    return cfg.train.steps or max(1, math.ceil(cfg.train.epochs * n_train / cfg.train.batch_size))


@contextmanager
def timed(timings: dict, key: str):
    t0 = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - t0


def shard(samples: list, ranks: int) -> list[list]:
    """Contiguous, equal slices of a step's samples, one per learner rank."""
    per = len(samples) // ranks
    return [samples[r * per : (r + 1) * per] for r in range(ranks)]


class LearnerFailed(RuntimeError):
    pass


class TrainingDiverged(RuntimeError):
    pass


class ForgettingLimit(RuntimeError):
    pass


def idle_ratios(record: dict, num_engines: int) -> dict:
    """Share of the step's wall time each side spent waiting: the learner outside its step, the engines
    outside generation (engine-side seconds, so overlapped generation counts as busy)."""
    wall = record["timing_s"]["step"]
    busy = record.get("rollout", {}).get("busy_s", 0.0)
    return {"learner": max(0.0, 1 - record["timing_s"]["learner"] / wall),
            "rollout": max(0.0, 1 - busy / (wall * max(num_engines, 1)))}


def _finish_if_saved(saving: checkpoint.Pending, keep_last: int) -> str | None:
    try:
        return str(checkpoint.finish(saving, keep_last))
    except RayActorError:  # a rank died while saving: the temp folder stays incomplete and unpublished
        return None


def _save_now(saving: checkpoint.Pending | None, actors: Actors, out: Path, step: int, cfg: Config,
              extra: dict) -> str:
    """Publish a checkpoint of `step` before the run stops (the one being written, if it is that step's)."""
    if saving is None or saving.final.name != f"{checkpoint.PREFIX}{step:06d}":
        if saving is not None:
            checkpoint.finish(saving, cfg.checkpoint.keep_last)
        saving = checkpoint.start(actors.learners, out, step, cfg, extra)
    return str(checkpoint.finish(saving, cfg.checkpoint.keep_last))


def check_sync(actors: Actors, examples: list[Example], n: int = 2, max_new_tokens: int = 16) -> float:
    """vLLM greedy == learner (HF) greedy on a few prompts; raises if any engine disagrees."""
    prompts = [ex.student_ids for ex in examples[:n]]
    want = ray.get(actors.learner.greedy.remote(prompts, max_new_tokens))
    for e in actors.engines:
        got = [o.token_ids for o in ray.get(e.generate.remote(prompts, max_new_tokens=max_new_tokens, temperature=0.0))]
        if got != want:
            raise SyncMismatch(f"engine greedy output {got} differs from the learner's {want} after weight sync")
    return 1.0


def _load_inputs(cfg: Config, model_path: str) -> tuple:
    """The tokenizer, the train/eval split, the named eval sets (eval.sets: e.g. prior skills, for retention) and the
    forgetting monitor (monitor.data: general prompts), all tokenized."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    train_set, eval_set = load_splits(cfg, tokenizer)
    named_sets = load_eval_sets(cfg, tokenizer)
    monitor = ForgettingMonitor(cfg, tokenizer) if cfg.monitor.enabled else None
    return tokenizer, train_set, eval_set, named_sets, monitor


def _start(cfg: Config, model_path: str, start_step: int, log_dir: Path) -> tuple[Actors, logging.Handler, tuple]:
    """Start Ray and the actors while a thread loads the tokenizer and the data (seconds each, more for a large
    dataset): the engines, whose vLLM start is the longest, start as soon as Ray is up; the learners, whose LR
    schedule needs the step count, once the data is loaded. Returns the actors, the driver's log handler and the
    inputs. A data error stops the engines and, when this run created the log folder, removes it: the folder
    marks a previous run, and the corrected command should run as it is."""
    fresh = not log_dir.exists()
    log_file = log_to_file(log_dir)
    with ThreadPoolExecutor(1, thread_name_prefix="sdft-inputs") as pool:
        loading = pool.submit(_load_inputs, cfg, model_path)

        def step_count() -> int:
            _, train_set, eval_set, _, _ = loading.result()
            steps = total_steps(cfg, len(train_set))
            if cfg.logging.progress:
                print_header(cfg, model_path, len(train_set), len(eval_set), steps, start_step, log_dir)
            return steps

        try:
            init_ray(cfg.ray.address, cfg.ray.num_cpus)
            actors = launch(cfg, model_path, step_count, log_dir=str(log_dir))
        except BaseException:
            if loading.done() and loading.exception() is not None and fresh:
                forget_log(log_file)
                shutil.rmtree(log_dir, ignore_errors=True)
            else:
                logging.getLogger().removeHandler(log_file)
            raise
    return actors, log_file, loading.result()


def train(cfg: Config, resume: bool | str = False, on_step: Callable[[int, Actors], None] | None = None,
          overwrite: bool = False, allow_config_change: bool = False) -> dict:
    """Run SDFT (or the SFT baseline) as configured; returns a summary dict. A folder that holds a previous run is
    continued with `resume` or replaced with `overwrite`, never written into otherwise. `resume` (True or "latest")
    continues from the newest checkpoint, which must be intact; "auto" from the newest intact one. A config that
    differs from the checkpoint's beyond checkpoint.RESUME_SAFE_KEYS needs `allow_config_change`.
    `on_step(step, actors)` is called after every completed step (monitoring and fault-injection hooks).
    A private Ray instance that this call starts (no cluster given, none running) stops when it returns."""
    own_ray = not ray.is_initialized()
    try:
        return _train(cfg, resume, on_step, overwrite, allow_config_change)
    finally:
        if own_ray:
            stop_private_ray()


def _train(cfg: Config, resume: bool | str, on_step: Callable[[int, Actors], None] | None, overwrite: bool,
           allow_config_change: bool) -> dict:
    from tqdm.auto import tqdm

    t_start = time.perf_counter()

    out = Path(cfg.output_dir)
    ckpt = checkpoint.prepare_output(out, resume, overwrite)
    if ckpt is not None:  # verified and compared before anything starts
        ckpt = checkpoint.resume_point(out, "auto" if resume == "auto" else "latest")
        checkpoint.check_config(ckpt, cfg, allow_config_change)
    model_path = resolve_model(cfg.model.path, cfg.train.seed)
    check_metric(cfg)
    state = checkpoint.trainer_state(ckpt) if ckpt else {"step": 0}
    log_dir = out.resolve() / "logs"
    actors, log_file, (tokenizer, train_set, eval_set, named_sets, monitor) = _start(cfg, model_path, state["step"],
                                                                                    log_dir)
    steps = total_steps(cfg, len(train_set))
    batch_for_step = lambda step: [train_set[i] for i in batch_indices(  # noqa: E731
        step, cfg.train.batch_size, len(train_set), cfg.train.seed, cfg.data.shuffle)]
    rollouts = RolloutScheduler(actors, cfg, batch_for_step, steps)
    try:
        if ckpt:
            try:
                ray.get([lr.load.remote(str(ckpt)) for lr in actors.learners])
            except checkpoint.CheckpointError as e:  # raised in a learner: drop Ray's remote traceback
                raise checkpoint.CheckpointError(str(getattr(e, "cause", e))) from None
        logger = MetricsLogger(cfg, out, resume_step=state["step"] if ckpt else None, wandb_id=state.get("wandb_id"))
        if monitor is not None:  # before any push: the engines still hold the base weights
            monitor.start(actors, out, resume=ckpt is not None)
        if ckpt and cfg.engines_follow_student:  # engines loaded the base from disk; a resumed learner has moved on
            rollouts.push(version=state["step"])
        summary = {"steps": steps, "start_step": state["step"], "train_examples": len(train_set),
                   "eval_examples": len(eval_set), "checkpoint": str(ckpt) if ckpt else None}
        start = {}  # the step-0 record, on the base weights
        if state["step"] == 0:
            if eval_set or named_sets:
                summary["eval_before"] = evaluate_all(actors.engines, eval_set, named_sets, tokenizer, cfg)
                start["eval"] = summary["eval_before"]
            if monitor is not None:
                start["monitor"] = monitor.measure()
            if gate.applies(cfg):
                start["gate"] = gate.teacher_gate(actors, train_set, tokenizer, cfg)
        if start:
            logger.log(0, start)
        if "gate" in start:
            gate.enforce(start["gate"], cfg)

        saving = None  # a checkpoint being written in the background
        skipped_in_a_row = 0  # train.on_nonfinite=skip
        bar = tqdm(range(state["step"], steps), initial=state["step"], total=steps, desc=cfg.train.mode,
                   disable=not cfg.logging.progress, dynamic_ncols=True)
        for step in bar:
            timings, record = {}, {}
            t_step = time.perf_counter()
            with timed(timings, "rollout"):
                if cfg.train.distills:
                    samples, record["rollout"] = rollouts.take(step)
                else:  # SFT: the demonstrations are the targets; nothing to sample
                    samples = [Sample(ex.student_ids, ex.demo_ids) for ex in batch_for_step(step)]
            rollouts.sleep()
            with timed(timings, "learner"):
                try:  # rank 0 exports the weights; async: maybe still, next to its step (see RolloutScheduler)
                    holds = [rollouts.exporting] + [None] * (len(actors.learners) - 1)
                    calls = [lr.step.remote(part, hold) for lr, part, hold in
                             zip(actors.learners, shard(samples, len(actors.learners)), holds)]
                    if cfg.train.distills:
                        rollouts.prefetch(step)  # async: the next steps' generation runs while the learner steps
                    per_rank = ray.get(calls)
                except RayActorError as e:
                    if saving is not None:  # a checkpoint saved before the failed step is still good: publish it
                        summary["checkpoint"] = _finish_if_saved(saving, cfg.checkpoint.keep_last)
                        saving = None
                    raise LearnerFailed(
                        f"a learner rank died at step {step + 1} ({type(e).__name__}). Last complete checkpoint: "
                        f"{summary['checkpoint'] or 'none'}; continue with `sdft train ... --resume`."
                    ) from e
                metrics = StepMetrics.merge(per_rank)
                record.update(metrics.as_dict())
            skip = bool(metrics.skipped) and cfg.train.on_nonfinite == "skip"  # the update was not applied
            skipped_in_a_row = skipped_in_a_row + 1 if skip else 0
            if skip:
                record.update({k: None for k, v in metrics.as_dict().items() if not math.isfinite(v)})
                logging.getLogger(__name__).warning("step %d skipped: %s", step + 1, metrics.describe_nonfinite())
            if (not metrics.finite() and not skip) or skipped_in_a_row > MAX_CONSECUTIVE_SKIPS:
                if saving is not None:  # saved before this step: still good
                    summary["checkpoint"] = _finish_if_saved(saving, cfg.checkpoint.keep_last)
                    saving = None
                raise TrainingDiverged(
                    f"step {step + 1} produced non-finite values ({metrics.describe_nonfinite()})"
                    + (f", {skipped_in_a_row} skipped steps in a row" if skipped_in_a_row else "") + "; the weights are "
                    f"not saved. Last good checkpoint: {summary['checkpoint'] or 'none'}. Try a lower train.lr or "
                    "train.grad_clip, more train.warmup_steps, or check the data; resume with `sdft train ... "
                    "--resume` from a good checkpoint.")
            with timed(timings, "sync"):
                if not cfg.engines_follow_student:  # dft: the engines keep sampling as the frozen teacher
                    sync = {}
                elif cfg.async_.max_staleness and not cfg.sync.check_greedy:
                    # Overlap: this step's weights load into the engines while the learner runs the next step;
                    # the record carries the push that finished meanwhile (the previous version's).
                    sync = rollouts.wait_push()
                    rollouts.push_async(version=step + 1)
                else:
                    sync = rollouts.push(version=step + 1)
                    if cfg.sync.check_greedy:
                        sync["greedy_match"] = check_sync(actors, train_set)
            record["sync"] = sync
            record["timing_s"] = {**timings, "step": time.perf_counter() - t_step}
            record["elapsed_s"] = time.perf_counter() - t_start  # since train() began: start-up included
            record["learner_tokens_per_s"] = record["tokens"] / timings["learner"]
            record["idle"] = idle_ratios(record, len(actors.engines))
            done = step + 1
            due_eval = (cfg.eval.every and done % cfg.eval.every == 0) or done == steps
            due_monitor = monitor is not None and monitor.due(done, steps)
            if due_eval or due_monitor:
                with rollouts.student_weights(version=done):  # dft: the engines hold the student's weights meanwhile
                    if due_eval:
                        record["eval"] = summary["eval_after"] = evaluate_all(
                            actors.engines, eval_set, named_sets, tokenizer, cfg)
                    if due_monitor:
                        record["monitor"] = monitor.measure()
            logger.log(done, record)
            bar.set_postfix({k: "skipped" if record[k] is None else f"{record[k]:.4f}" for k in ("loss", "kl")})
            if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or (done == steps and cfg.checkpoint.final):
                if saving is not None:
                    summary["checkpoint"] = str(checkpoint.finish(saving, cfg.checkpoint.keep_last))
                saving = checkpoint.start(actors.learners, out, done, cfg, {"wandb_id": logger.wandb_id})
            if monitor is not None and monitor.over_limit(record):
                summary["checkpoint"] = _save_now(saving, actors, out, done, cfg, {"wandb_id": logger.wandb_id})
                raise ForgettingLimit(monitor.stop_message(done, record, summary["checkpoint"]))
            summary["last"] = record
            if on_step is not None:
                on_step(done, actors)
        rollouts.wait_push()
        if saving is not None:
            summary["checkpoint"] = str(checkpoint.finish(saving, cfg.checkpoint.keep_last))
        logger.finish()
        return summary
    finally:
        actors.shutdown()
        logging.getLogger().removeHandler(log_file)
