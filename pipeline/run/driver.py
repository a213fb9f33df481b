"""The training run: `train` starts the actors, then runs the SDFT step as named stages —

    sample → learn → publish weights → evaluate / monitor → log → checkpoint

— each one call on `Run`, with recovery (a learner rank that died, non-finite steps, the checkpoint being written when
the run stops) behind those calls. Strictly on-policy by default; with async.max_staleness = k generation runs up to
k steps ahead (pipeline/run/rollouts.py). Learner ranks each take an equal slice of the step's samples.
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
from ray.exceptions import GetTimeoutError, RayActorError

from actors import watchdog
from actors.launcher import Actors, init_ray, launch, stop_private_ray
from actors.messages import Sample, StepMetrics

from ..config import MAX_CONSECUTIVE_SKIPS, Config
from ..data import Example, batch_indices, data_fingerprints, load_splits
from ..errors import ForgettingLimit, LearnerFailed, LearnerStalled, SyncMismatch, TrainingDiverged
from ..experiments import gate
from ..experiments.evaluation import check_metric, evaluate_all, load_eval_sets
from ..experiments.monitor import ForgettingMonitor
from ..models import check_context_length, resolve_model
from . import checkpoint
from .console import forget_log, log_to_file, print_header
from .lock import RunLock
from .rollouts import Rollouts
from .tracking import MetricsLogger


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


def idle_ratios(record: dict, num_engines: int) -> dict:
    """Share of the step's wall time each side spent waiting: the learner outside its step, the engines
    outside generation (engine-side seconds, so overlapped generation counts as busy)."""
    wall = record["timing_s"]["step"]
    busy = record.get("rollout", {}).get("busy_s", 0.0)
    return {"learner": max(0.0, 1 - record["timing_s"]["learner"] / wall),
            "rollout": max(0.0, 1 - busy / (wall * max(num_engines, 1)))}


def check_sync(actors: Actors, examples: list[Example], stall_timeout_s: float = 0, n: int = 2,
               max_new_tokens: int = 16) -> float:
    """vLLM greedy == learner (HF) greedy on a few prompts; raises if any engine disagrees."""
    prompts = [ex.student_ids for ex in examples[:n]]
    owners = [watchdog.Owner("learner rank 0", actors.learner, restarts=False)]
    owners += [watchdog.Owner(f"rollout engine {i}", e) for i, e in enumerate(actors.engines)]
    refs = [actors.learner.greedy.remote(prompts, max_new_tokens)]
    refs += [e.generate.remote(prompts, max_new_tokens=max_new_tokens, temperature=0.0) for e in actors.engines]
    want, *answers = watchdog.wait(refs, owners, stall_timeout_s, "the greedy check")
    for outs in answers:
        got = [o.token_ids for o in outs]
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
        with RunLock(Path(cfg.output_dir)):  # one writer per run folder, from before anything in it is touched
            return _train(cfg, resume, on_step, overwrite, allow_config_change)
    finally:
        if own_ray:
            stop_private_ray()


def _train(cfg: Config, resume: bool | str, on_step: Callable[[int, Actors], None] | None, overwrite: bool,
           allow_config_change: bool) -> dict:
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    out = Path(cfg.output_dir)
    prints = data_fingerprints(cfg)  # of the data as this run loads it: checked on resume, stored in checkpoints
    ckpt = checkpoint.prepare_output(out, resume, overwrite)
    if ckpt is not None:  # verified and compared before anything starts
        ckpt = checkpoint.resume_point(out, "auto" if resume == "auto" else "latest")
        checkpoint.check_config(ckpt, cfg, allow_config_change)
        checkpoint.check_data(ckpt, prints, allow_config_change)
    model_path = resolve_model(cfg.model.path, cfg.train.seed)
    check_context_length(model_path, cfg.model.max_model_len)
    check_metric(cfg)
    suite = _lm_eval_suite(cfg)
    state = checkpoint.trainer_state(ckpt) if ckpt else {"step": 0}
    actors, log_file, inputs = _start(cfg, model_path, state["step"], out.resolve() / "logs")
    run = None
    try:
        run = Run(cfg, actors, out, inputs, t_start, suite, prints)
        run.begin(ckpt, state)
        bar = tqdm(range(state["step"], run.steps), initial=state["step"], total=run.steps, desc=cfg.train.mode,
                   disable=not cfg.logging.progress, dynamic_ncols=True)
        for step in bar:  # the SDFT step
            record, timings, t_step = {}, {}, time.perf_counter()
            with timed(timings, "rollout"):
                samples = run.sample(step, record)
            with timed(timings, "learner"):
                run.learn(step, samples, record)
            with timed(timings, "sync"):
                record["sync"] = run.publish(version=step + 1)
            run.clock(record, timings, t_step)
            run.evaluate(step + 1, record)
            run.log(step + 1, record, bar)
            run.checkpoint(step + 1)
            run.stop_if_forgetting(step + 1, record)
            if on_step is not None:
                on_step(step + 1, actors)
        return run.end()
    except LearnerStalled as e:  # outside a step (a weight export, a save, a greedy check): name where to resume
        last = run.checkpoints.last if run is not None and run.checkpoints is not None else None
        raise LearnerFailed(f"{e} Last complete checkpoint: {last or 'none'}; continue with `sdft train ... "
                            "--resume`.") from None
    finally:
        actors.shutdown()
        logging.getLogger().removeHandler(log_file)


def _lm_eval_suite(cfg: Config):
    """eval.lm_eval's tasks, resolved and their datasets loaded before Ray starts; None when it is off."""
    if not cfg.eval.lm_eval.tasks:
        return None
    from ..experiments.harness import prepare_suite

    return prepare_suite(cfg.eval.lm_eval)


class Run:
    """The stages of one training run over its actors; `_train` calls them in order, once per step."""

    def __init__(self, cfg: Config, actors: Actors, out: Path, inputs: tuple, t_start: float, suite=None,
                 data_prints: dict | None = None):
        self.cfg, self.actors, self.out, self.t_start = cfg, actors, out, t_start
        self.suite = suite  # eval.lm_eval: the prior-capability suite (experiments/harness.py)
        self.data_prints = data_prints  # the data's fingerprints, stored in its checkpoints
        self.tokenizer, self.train_set, self.eval_set, self.named_sets, self.monitor = inputs
        self.steps = total_steps(cfg, len(self.train_set))
        self.rollouts = Rollouts(actors, cfg, self.batch, self.steps)
        self.weights = actors.sync  # the weight path's owner (actors/weight_sync)
        self.skipped_in_a_row = 0  # train.on_nonfinite=skip
        self.moved = False  # a step with a non-zero loss or gradient was seen (train.on_collapse)
        self.checkpoints: checkpoint.Checkpoints | None = None  # from `begin`, which knows the checkpoint resumed

    def batch(self, step: int) -> list[Example]:
        cfg = self.cfg
        return [self.train_set[i] for i in batch_indices(step, cfg.train.batch_size, len(self.train_set),
                                                         cfg.train.seed, cfg.data.shuffle)]

    # ---- before the first step --------------------------------------------------------------------------------
    def begin(self, ckpt: Path | None, state: dict) -> None:
        """Restore a checkpoint, open the metrics log and, on a fresh run, measure step 0 on the base weights (eval,
        the forgetting monitor, the teacher gate)."""
        cfg, actors = self.cfg, self.actors
        self.checkpoints = checkpoint.Checkpoints(actors.learners, self.out, cfg, last=ckpt)
        if ckpt:
            try:
                ray.get([lr.load.remote(str(ckpt)) for lr in actors.learners])
            except checkpoint.CheckpointError as e:  # raised in a learner: drop Ray's remote traceback
                raise checkpoint.CheckpointError(str(getattr(e, "cause", e))) from None
        # train.max_param_growth is measured against the weights this run starts from (a collective under ZeRO-3)
        self.param_norm0 = ray.get([lr.param_norm.remote() for lr in actors.learners])[0]
        self.logger = MetricsLogger(cfg, self.out, resume_step=state["step"] if ckpt else None,
                                    wandb_id=state.get("wandb_id"))
        if self.monitor is not None:  # before any push: the engines still hold the base weights
            self.monitor.start(actors, self.out, resume=ckpt is not None)
        if ckpt and cfg.engines_follow_student:  # engines loaded the base from disk; a resumed learner has moved on
            self.rollouts.wake()
            self.weights.push(version=state["step"])
            if actors.teacher_sync is not None:
                actors.teacher_sync.push(version=state["step"])
        self.summary = {"steps": self.steps, "start_step": state["step"], "train_examples": len(self.train_set),
                        "eval_examples": len(self.eval_set), "checkpoint": str(ckpt) if ckpt else None}
        start = {}  # the step-0 record, on the base weights
        if state["step"] == 0:
            if self.eval_set or self.named_sets:
                start["eval"] = self.summary["eval_before"] = self._eval()
            if self.suite is not None and cfg.eval.lm_eval.before:
                start["lm_eval"] = self.summary["lm_eval_before"] = self._lm_eval(0)
            if self.monitor is not None:
                start["monitor"] = self.monitor.measure()
            if gate.applies(cfg):
                start["gate"] = gate.teacher_gate(actors, self.train_set, self.tokenizer, cfg)
        if start:
            self.logger.log(0, start)
        if "gate" in start:
            gate.enforce(start["gate"], cfg)

    # ---- the step's stages ------------------------------------------------------------------------------------
    def sample(self, step: int, record: dict) -> list[Sample]:
        """The step's training sequences: the engines' samples (SDFT, DFT) or the demonstrations (SFT)."""
        if not self.cfg.train.distills:
            return [Sample(ex.student_ids, ex.demo_ids) for ex in self.batch(step)]
        samples, record["rollout"] = self.rollouts.take(step)
        return samples

    def learn(self, step: int, samples: list[Sample], record: dict) -> StepMetrics:
        """One optimizer step on every learner rank, each on its slice of the samples. Async mode: rank 0 may still
        be exporting the previous weights next to it (`hold`), and the next steps' generation runs meanwhile."""
        self.rollouts.sleep()
        ranks, every = self.actors.learners, self.cfg.teacher.check_every
        holds = [self.weights.hold] + [None] * (len(ranks) - 1)
        checks = [bool(every) and (step + 1) % every == 0] + [False] * (len(ranks) - 1)  # rank 0 alone
        calls = [lr.step.remote(part, hold, check) for lr, part, hold, check
                 in zip(ranks, shard(samples, len(ranks)), holds, checks)]
        if self.cfg.train.distills:
            self.rollouts.prefetch(step)
        try:
            metrics = StepMetrics.merge(ray.get(calls, timeout=self.cfg.ray.stall_timeout_s or None))
        except GetTimeoutError:
            raise LearnerFailed(
                f"a learner rank made no progress on step {step + 1} for {self.cfg.ray.stall_timeout_s:.0f}s "
                f"(ray.stall_timeout_s): the run stops. Last complete checkpoint: {self.checkpoints.last or 'none'}; "
                "continue with `sdft train ... --resume`.") from None
        except RayActorError as e:
            raise LearnerFailed(
                f"a learner rank died at step {step + 1} ({type(e).__name__}). Last complete checkpoint: "
                f"{self.checkpoints.settle() or 'none'}; continue with `sdft train ... --resume`.") from e
        values = metrics.as_dict()
        record.update({k: v for k, v in values.items() if k not in ("topk_mass", "logprob_gap")})
        if self.cfg.teacher_on_engines:  # wandb: teacher/topk_mass, teacher/seconds, teacher/logprob_gap
            teacher = {"topk_mass": values["topk_mass"], "seconds": record["rollout"].pop("teacher_s")}
            record["teacher"] = {**teacher, **({"logprob_gap": values["logprob_gap"]}
                                               if values["logprob_gap"] is not None else {})}
        self._check_finite(step, metrics, record)
        self._check_collapse(step, metrics)
        return metrics

    def _check_finite(self, step: int, metrics: StepMetrics, record: dict) -> None:
        """train.on_nonfinite=skip: a step whose update was dropped logs its non-finite values as None. A non-finite
        step that was applied, or too many skipped in a row, stops the run."""
        skip = bool(metrics.skipped) and self.cfg.train.on_nonfinite == "skip"
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skip else 0
        if skip:
            record.update({k: None for k, v in metrics.as_dict().items() if v is not None and not math.isfinite(v)})
            logging.getLogger(__name__).warning("step %d skipped: %s", step + 1, metrics.describe_nonfinite())
        if (not metrics.finite() and not skip) or self.skipped_in_a_row > MAX_CONSECUTIVE_SKIPS:
            in_a_row = self.skipped_in_a_row
            raise TrainingDiverged(
                f"step {step + 1} produced non-finite values ({metrics.describe_nonfinite()})"
                + (f", {in_a_row} skipped steps in a row" if in_a_row else "") + "; the weights are not saved. Last "
                f"good checkpoint: {self.checkpoints.settle() or 'none'}. Try a lower train.lr or train.grad_clip, "
                "more train.warmup_steps, or check the data; resume with `sdft train ... --resume` from a good "
                "checkpoint.")

    def _check_collapse(self, step: int, metrics: StepMetrics) -> None:
        """A diverged run whose values stayed finite (e.g. train.lr=1e6), which the non-finite guard cannot see: the
        parameters' norm grew beyond train.max_param_growth times its start, or loss and gradient are exactly 0 after
        steps where they were not (the weights no longer depend on the data)."""
        bound, growth = self.cfg.train.max_param_growth, metrics.param_norm / max(self.param_norm0, 1e-30)
        flat = metrics.loss == 0 and metrics.grad_norm == 0
        self.moved = self.moved or bool(metrics.loss or metrics.grad_norm)
        if bound is not None and growth > bound:
            message = (f"step {step + 1}: the parameters' norm grew {growth:.3g}x since the run began "
                       f"(train.max_param_growth={bound:g}): the model collapsed")
        elif flat and self.moved:
            message = (f"step {step + 1}: loss and gradient norm are exactly 0 after non-zero steps: the model "
                       "collapsed (its output no longer depends on the data)")
        else:
            return
        if self.cfg.train.on_collapse == "warn":
            logging.getLogger(__name__).warning(message)
            return
        raise TrainingDiverged(f"{message}. Last checkpoint: {self.checkpoints.settle() or 'none'}. Try a lower "
                               "train.lr or train.grad_clip; train.on_collapse=warn lets the run go on.")

    def publish(self, version: int) -> dict:
        """The learner's new weights to the engines. Async mode: they load next to the learner's next step, and the
        record carries the push that finished meanwhile (the previous version's). Strict: now, and with
        sync.check_greedy checked against the learner's greedy output. dft: the engines keep the frozen teacher."""
        cfg = self.cfg
        if self.actors.teacher_sync is not None and version % cfg.teacher.sync_every == 0:
            self.rollouts.push_teacher(version)
        if not cfg.engines_follow_student or not (cfg.train.distills or cfg.sync.check_greedy):
            return {}  # dft: the engines keep the frozen teacher; sft: nothing samples, eval pushes when it is due
        self.rollouts.wake()
        if cfg.async_.max_staleness and not cfg.sync.check_greedy:
            stats = self.rollouts.wait_weights()
            self.weights.start(version)
            return stats
        self.weights.start(version)
        stats = self.rollouts.wait_weights()
        if cfg.sync.check_greedy:
            stats["greedy_match"] = self.rollouts.again_after_crash(
                lambda: check_sync(self.actors, self.train_set, cfg.ray.stall_timeout_s))
        return stats

    def clock(self, record: dict, timings: dict, t_step: float) -> None:
        record["timing_s"] = {**timings, "step": time.perf_counter() - t_step}
        record["elapsed_s"] = time.perf_counter() - self.t_start  # since train() began: start-up included
        record["learner_tokens_per_s"] = record["tokens"] / timings["learner"]
        record["idle"] = idle_ratios(record, len(self.actors.engines))

    def evaluate(self, done: int, record: dict) -> None:
        """Eval every eval.every steps and at the end; the lm-evaluation-harness suite every eval.lm_eval.every steps and
        at the end; the forgetting monitor when it is due. All score the student (dft: the engines hold its weights
        meanwhile)."""
        due_eval = (self.cfg.eval.every and done % self.cfg.eval.every == 0) or done == self.steps
        every_lm = self.cfg.eval.lm_eval.every
        due_lm = self.suite is not None and ((every_lm and done % every_lm == 0) or done == self.steps)
        due_monitor = self.monitor is not None and self.monitor.due(done, self.steps)
        if due_eval or due_lm or due_monitor:
            again = self.rollouts.again_after_crash
            with self.rollouts.student_weights(version=done):
                if due_eval:
                    record["eval"] = self.summary["eval_after"] = again(self._eval)
                if due_lm:
                    record["lm_eval"] = self.summary["lm_eval_after"] = again(lambda: self._lm_eval(done))
                if due_monitor:
                    record["monitor"] = again(self.monitor.measure)

    def _eval(self) -> dict:
        return evaluate_all(self.actors.engines, self.eval_set, self.named_sets, self.tokenizer, self.cfg)

    def _lm_eval(self, step: int) -> dict:
        """The harness on the engines' current weights; the headline per task and their average go to metrics.jsonl
        and wandb (lm_eval/*), the harness's full results to OUTPUT/lm_eval/step_N.json."""
        from ..experiments.harness import run_suite, write_results

        result = run_suite(self.actors.engines, self.tokenizer, self.suite, self.cfg, quiet=True)
        write_results(result, self.out / "lm_eval" / f"step_{step:06d}.json", {"step": step})
        return {k: v for k, v in result.items() if k != "full"}

    def log(self, done: int, record: dict, bar) -> None:
        self.logger.log(done, record)
        bar.set_postfix({k: "skipped" if record[k] is None else f"{record[k]:.4f}" for k in ("loss", "kl")})
        self.summary["last"] = record

    def checkpoint(self, done: int) -> None:
        if self.checkpoints.due(done, self.steps):
            self.checkpoints.save(done, self._state())

    def _state(self) -> dict:
        """What a checkpoint's trainer_state.json holds besides the step: the wandb run, the data's fingerprints."""
        return {"wandb_id": self.logger.wandb_id, "data": self.data_prints}

    def stop_if_forgetting(self, done: int, record: dict) -> None:
        """monitor.max_kl_to_base: save a checkpoint of this step and stop."""
        if self.monitor is not None and self.monitor.over_limit(record):
            path = self.checkpoints.save_now(done, self._state())
            raise ForgettingLimit(self.monitor.stop_message(done, record, path))

    # ---- after the last step ----------------------------------------------------------------------------------
    def end(self) -> dict:
        self.rollouts.wait_weights()
        if self.actors.teacher_sync is not None:
            self.actors.teacher_sync.wait()
        self.summary["checkpoint"] = self.checkpoints.finish()
        self.logger.finish()
        return self.summary
