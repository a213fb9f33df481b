"""sdft side by side with TRL's single-process SDFT trainer (`trl.experimental.sdft.SDFTTrainer`) on this machine.

    make bench-trl                     # builds TRL in .cache/trl-venv, then runs this with the defaults below
    python benchmarks/vs_trl.py [--models tiny,smollm2] [--reps 3] [--steps 8]
                                [--rows sdft-strict,sdft-async,trl-vllm,trl-hf] [--quick] [--out FILE]

Rows (the same SDFT semantics on both sides: forward KL(teacher || student) over the full vocabulary, EMA teacher
alpha 0.01, the first 3 completion tokens masked, one completion per prompt, temperature 1, AdamW lr 1e-4 with 2
warm-up steps then cosine, clipping 1.0, batch = micro-batch, fp32; TRL with one torch thread, sdft with its CPU
defaults: in strict mode learner and engine each get both cores, as they take turns, in async mode one each):

  sdft-strict  this repository, `async.max_staleness=0` (Ray: one vLLM engine actor + one DeepSpeed learner actor)
  sdft-async   the same with `async.max_staleness=1` (generation for step j overlaps the learner's step j - 1)
  trl-vllm     TRL SDFTTrainer, `use_vllm=True, vllm_mode="colocate"` (vLLM in the trainer's process, fp32 engine)
  trl-hf       TRL SDFTTrainer sampling with Hugging Face `generate`
  sdft-strict-engines, sdft-async-engines  (only with --rows) the same with `teacher.placement=engines` (top-20
               prompt log-probs on a teacher engine of its own, phi pushed every step; `ray.num_cpus=3` for its
               bundle): the learner runs the student's forward and backward only
  sft          (only with --rows) sdft's SFT baseline, `train.mode=sft`, same recipe: NLL of the demonstrations,
               weights pushed only for evals; the table then adds each SDFT row's s/step over SFT's
  sdft-strict-1t  (only with --rows) sdft strict with one thread per process instead of both cores per phase
  sdft-async-l2   (only with --rows) sdft async with two learner threads, waiting passively, and one engine
               thread (the learner shares a core with the engine while both run)
  floor-1t, floor-2t  (only with --rows) sdft's own learner and vLLM engine in one process with 1 or 2 threads,
               no Ray, no weight sync: generation then the learner step, the compute no layout removes. Its
               learner column is the async floor (one core each); generation + learner at 2 threads is the strict
               floor on two cores

Workloads: `tiny` = `tiny:llama` (the project's random tiny Llama) with 8 prompts x 32 new tokens per step on
configs/data/tiny.jsonl; `smollm2` = `package:smollm2` (SmolLM2-135M-Instruct) with 4 prompts x 32 new tokens on
configs/data/smollm2/facts_train.jsonl; `smollm2-8x64` the same with 8 prompts x 64 new tokens.

Every run is its own fresh Python process (`--worker ROW`; sdft rows with this interpreter, TRL rows with the TRL
venv's, see --trl-python), repetitions interleaved (A B C D A B C D ...) so drift in the machine's load hits every
row alike. Per run:

  s/step               wall time between consecutive optimizer-step completions, measured in the worker with
                       time.time() (sdft: the driver's `on_step` hook; TRL: a `TrainerCallback.on_step_end` added
                       last, after the EMA-teacher update). Steady state: the first --warmup-steps steps and the
                       last step (sdft writes its final checkpoint before the last hook) are left out.
  time to first step   from just before the parent starts the worker process to the end of the first optimizer
                       step (same clocks): interpreter start, imports, model loads, vLLM engine(s), Ray (sdft), the
                       first rollout and the first learner step. Both end before the weight sync that follows: TRL
                       syncs at the start of its next generation, after the hook; sdft's hook comes after the push,
                       so its first step's `timing_s.sync` is taken off.
  split                seconds per steady step. sdft: `timing_s.{rollout,learner,sync}` from metrics.jsonl (rollout
                       is the driver's wait for samples, near 0 when async hides it) and every numeric field of
                       `sync`. TRL: time inside `_generate` minus the weight sync, the weight sync, and the rest of
                       the step (forwards, backward, optimizer, EMA, Trainer bookkeeping) as "learner".

The table reports, per row, the median over repetitions (min-max) and the speed relative to TRL (steps/s of the row
over steps/s of TRL; > 1 means faster than TRL). Results and every run's raw timings go to --out (JSON); each
worker's output to a log next to it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "smoke.yaml"

WORKLOADS = {
    "tiny": dict(spec="tiny:llama", data="configs/data/tiny.jsonl", batch=8, max_model_len=256),
    "smollm2": dict(spec="package:smollm2", data="configs/data/smollm2/facts_train.jsonl", batch=4, max_model_len=512),
    "smollm2-8x64": dict(spec="package:smollm2", data="configs/data/smollm2/facts_train.jsonl", batch=8,
                         max_model_len=512, max_new_tokens=64),
}
ROWS = {
    "sdft-strict": "sdft strict (staleness 0)",
    "sdft-async": "sdft async (staleness 1)",
    "trl-vllm": "TRL SDFTTrainer + vLLM colocate",
    "trl-hf": "TRL SDFTTrainer + HF generate",
    # not in the default set: the teacher scored on vLLM engines (teacher.placement=engines, top-20; the EMA teacher
    # of full fine-tuning is a teacher engine of its own, hence a third CPU bundle: ray.num_cpus=3), and the SFT
    # baseline on the same data and recipe (NLL of the demonstrations: no rollouts, no teacher)
    "sdft-strict-engines": "sdft strict, teacher on engines",
    "sdft-async-engines": "sdft async, teacher on engines",
    "sft": "sft baseline (sdft's learner, no rollouts)",
    # other thread layouts than sdft's CPU default
    "sdft-strict-1t": "sdft strict, 1 thread per process",
    "sdft-async-l2": "sdft async, 2 learner threads (passive) + 1 engine thread",
    # the floor: sdft's learner and engine in one process, no Ray and no sync, taking turns (see _floor_worker)
    "floor-1t": "floor: generate + learner step in one process, 1 thread",
    "floor-2t": "floor: generate + learner step in one process, 2 threads",
}
DEFAULT_ROWS = ["sdft-strict", "sdft-async", "trl-vllm", "trl-hf"]
BASE_LABELS = {"trl-vllm": "TRL-vLLM", "trl-hf": "TRL-HF"}  # the rows speed is reported against
# The shared recipe; both sides get these values.
RECIPE = dict(max_new_tokens=32, lr=1e-4, warmup_steps=2, seed=0, skip_first_tokens=3, ema_alpha=0.01, grad_clip=1.0)


def worker_env() -> dict[str, str]:
    """Environment of every worker: one thread per process, vLLM in-process with a 1 GiB CPU KV cache, compiled
    kernels cached under .cache/ (the Makefile exports the same)."""
    env = dict(os.environ)
    cache = ROOT / ".cache"
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))
    env.setdefault("VLLM_CACHE_ROOT", str(cache / "vllm"))
    env.update({
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING",
        "WANDB_MODE": "disabled", "TRL_EXPERIMENTAL_SILENCE": "1", "PYTHONUNBUFFERED": "1",
    })
    return env


# ----------------------------------------------------------------------------------------------------- workers


def _sdft_config(row: str, spec: dict, out: Path):
    from pipeline.config import CheckpointConfig, load_config

    r, n = RECIPE, spec["batch"]
    overrides = [
        f"output_dir={out}", f"model.path={spec['model_spec']}", "model.dtype=float32",
        f"model.max_model_len={spec['max_model_len']}", f"data.train={spec['data']}", "data.eval_fraction=0",
        "eval.max_new_tokens=1", "logging.wandb=false", "logging.progress=false", "checkpoint.every=0",
        "train.mode=sdft", f"train.steps={spec['steps']}", f"train.batch_size={n}", f"train.micro_batch_size={n}",
        f"train.lr={r['lr']}", f"train.warmup_steps={r['warmup_steps']}", "train.lr_schedule=cosine",
        f"train.grad_clip={r['grad_clip']}", f"train.seed={r['seed']}", f"rollout.max_new_tokens={spec['max_new_tokens']}",
        "rollout.samples_per_prompt=1", "rollout.temperature=1.0", "rollout.top_p=1.0",
        "teacher.kind=ema", f"teacher.ema_alpha={r['ema_alpha']}", "loss.divergence=forward_kl",
        f"loss.skip_first_tokens={r['skip_first_tokens']}",
        f"async.max_staleness={1 if row.startswith('sdft-async') else 0}",
    ]
    overrides += {"sdft-strict-1t": ["ray.learner_threads=1", "ray.rollout_threads=1"],
                  "sdft-async-l2": ["ray.learner_threads=2", "ray.rollout_threads=1"]}.get(row, [])
    if row.endswith("-engines"):
        overrides += ["teacher.placement=engines", "ray.num_cpus=3"]
    if row == "sft":
        overrides.append("train.mode=sft")
    if "final" in CheckpointConfig.model_fields:  # the end-of-run checkpoint, when it can be turned off
        overrides.append("checkpoint.final=false")
    return load_config(SMOKE, overrides)


def _sdft_worker(row: str, spec: dict) -> dict:
    sys.path.insert(0, str(ROOT))
    from pipeline.config import CheckpointConfig
    from pipeline.run.driver import train

    out = Path(tempfile.mkdtemp(prefix=f"vs-trl-{row}-"))
    cfg = _sdft_config(row, spec, out)
    step_ends: list[float] = []
    try:
        train(cfg, on_step=lambda step, actors: step_ends.append(time.time()))
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    records = [rec for rec in records if "loss" in rec]
    split = []
    for rec in records:
        s = {k: rec["timing_s"][k] for k in ("rollout", "learner", "sync", "step") if k in rec["timing_s"]}
        s.update({f"sync.{k}": v for k, v in rec.get("sync", {}).items() if isinstance(v, (int, float))})
        split.append(s)
    # The first optimizer step ended before the strict-mode push that follows it (as TRL's ends before the weight
    # sync that starts its next generation).
    return {"step_ends": step_ends, "split": split, "losses": [rec["loss"] for rec in records],
            "first_step_end": step_ends[0] - split[0].get("sync", 0.0),
            "checkpoint_final_off": "final" in CheckpointConfig.model_fields}


def _floor_worker(row: str, spec: dict) -> dict:
    """The compute no layout removes: sdft's own learner (DeepSpeed, the same loss and EMA teacher) and vLLM engine
    in this one process, no Ray, no weight sync, taking turns: generate the step's completions, then the learner
    step on them, with `threads` torch/OpenMP threads. Its split is the learner's compute alone (the async floor
    on one core each) and generation alone."""
    sys.path.insert(0, str(ROOT))
    threads = 2 if row == "floor-2t" else 1
    os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TRITON_INTERPRET="1")
    import torch

    torch.set_num_threads(threads)
    from transformers import AutoTokenizer

    from actors.learner import Learner
    from actors.messages import Sample
    from actors.net import free_port
    from actors.rollout import RolloutEngine
    from pipeline.data import batch_indices, load_splits

    cfg = _sdft_config("sdft-strict", spec, Path(tempfile.mkdtemp(prefix="vs-trl-floor-")))
    train_set, _ = load_splits(cfg, AutoTokenizer.from_pretrained(spec["model_path"]))
    engine = RolloutEngine(spec["model_path"], cfg)
    learner = Learner(cfg, spec["model_path"], spec["steps"], master_port=free_port())
    step_ends, split, losses = [], [], []
    for step in range(spec["steps"]):
        batch = [train_set[i] for i in batch_indices(step, cfg.train.batch_size, len(train_set), cfg.train.seed,
                                                 cfg.data.shuffle)]
        t0 = time.perf_counter()
        outs = engine.generate([ex.student_ids for ex in batch], max_new_tokens=cfg.rollout.max_new_tokens,
                               temperature=cfg.rollout.temperature)
        t1 = time.perf_counter()
        m = learner.step([Sample(ex.student_ids, o.token_ids, ex.teacher_ids, o.logprobs) for ex, o in zip(batch, outs)])
        split.append({"rollout": t1 - t0, "learner": time.perf_counter() - t1})
        step_ends.append(time.time())
        losses.append(m.loss)
    return {"step_ends": step_ends, "split": split, "losses": losses, "threads": torch.get_num_threads()}


def _trl_worker(row: str, spec: dict) -> dict:
    import torch

    torch.set_num_threads(1)  # before anything else touches torch: with the default it runs far slower on 2 cores
    import datasets
    import trl.generation.vllm_generation as vllm_generation
    from transformers import AutoTokenizer, TrainerCallback
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    use_vllm = row == "trl-vllm"
    clock = {"generate": 0.0, "sync": 0.0, "sync_bytes": 0}

    if use_vllm:
        make_llm = vllm_generation.LLM

        def colocated_llm(**kwargs):
            # vllm-cpu in this process: eager, fp32 like the trainer, the single-process executor (TRL asks for
            # "external_launcher", which needs torch.distributed).
            kwargs.update(enforce_eager=True, dtype="float32", distributed_executor_backend="uni")
            return make_llm(**kwargs)

        def sync_weights(self):
            # TRL's colocate sync calls `model.load_weights` per parameter, which fails on vllm-cpu ("Parameter has
            # no weight_loader"; the CPU worker also prepacks linear weights). Same step through vLLM's
            # reload_weights with the HF-named state dict, as sdft's object-store backend does.
            t0 = time.perf_counter()
            state = self.model.state_dict()
            self.llm.collective_rpc("reload_weights",
                                    kwargs={"weights_iterator": list(state.items()), "is_checkpoint_format": True})
            self.llm.reset_prefix_cache()
            clock["sync"] += time.perf_counter() - t0
            clock["sync_bytes"] = sum(t.numel() * t.element_size() for t in state.values())

        vllm_generation.LLM = colocated_llm
        vllm_generation.VLLMGeneration.sync_weights = sync_weights

    rows = [json.loads(line) for line in (ROOT / spec["data"]).read_text().splitlines() if line.strip()]
    dataset = datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": x["prompt"]}] if isinstance(x["prompt"], str) else x["prompt"],
         "privileged_context": x["demonstration"]} for x in rows
    ])
    r, n = RECIPE, spec["batch"]
    out = Path(tempfile.mkdtemp(prefix=f"vs-trl-{row}-"))
    args = SDFTConfig(
        output_dir=str(out), report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, use_cpu=True,
        bf16=False, fp16=False, seed=r["seed"], max_steps=spec["steps"], per_device_train_batch_size=n,
        gradient_accumulation_steps=1, learning_rate=r["lr"], lr_scheduler_type="cosine",
        warmup_steps=r["warmup_steps"], weight_decay=0.0, max_grad_norm=r["grad_clip"], optim="adamw_torch",
        dataloader_pin_memory=False, model_init_kwargs={"dtype": "float32"},
        num_generations=1, max_prompt_length=None, max_completion_length=spec["max_new_tokens"], temperature=1.0,
        top_p=1.0, top_k=0, distillation_mode="full_logits", distillation_alpha=0.0,  # alpha 0: KL(teacher||student)
        distillation_is_clip=2.0, num_loss_tokens_to_skip=r["skip_first_tokens"], teacher_model_kind="ema",
        teacher_update_rate=r["ema_alpha"], teacher_sync_steps=1, teacher_prompt_template=spec["teacher_template"],
        use_vllm=use_vllm, vllm_mode="colocate", vllm_max_model_length=spec["max_model_len"],
    )
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"], padding_side="left", truncation_side="left")
    trainer = SDFTTrainer(model=spec["model_path"], args=args, train_dataset=dataset, processing_class=tokenizer)

    generate = trainer._generate

    def timed_generate(prompt_ids):
        t0 = time.perf_counter()
        try:
            return generate(prompt_ids)
        finally:
            clock["generate"] += time.perf_counter() - t0

    trainer._generate = timed_generate
    step_ends: list[float] = []
    split: list[dict] = []
    last = {"t": None, "generate": 0.0, "sync": 0.0}

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            now = time.time()
            if last["t"] is not None:
                step = now - last["t"]
                gen, sync = clock["generate"] - last["generate"], clock["sync"] - last["sync"]
                split.append({"rollout": gen - sync, "sync": sync, "learner": step - gen, "step": step,
                              "sync.bytes": clock["sync_bytes"]} if use_vllm else
                             {"rollout": gen, "learner": step - gen, "step": step})
            else:
                split.append({})
            step_ends.append(now)
            last.update(t=now, generate=clock["generate"], sync=clock["sync"])

    trainer.add_callback(StepClock())  # last in the list: runs after the EMA-teacher update of the step
    try:
        trainer.train()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"step_ends": step_ends, "split": split, "losses": losses, "torch_threads": torch.get_num_threads()}


def run_worker(row: str, spec_file: str, result_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    worker = {"sdft": _sdft_worker, "sft": _sdft_worker, "floor": _floor_worker, "trl": _trl_worker}[row.split("-")[0]]
    res = worker(row, spec)
    res["versions"] = _versions()
    Path(result_file).write_text(json.dumps(res))


# ------------------------------------------------------------------------------------------------ orchestration


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name, dists in {"torch": ["torch"], "vllm": ["vllm-cpu", "vllm"], "transformers": ["transformers"],
                        "trl": ["trl"], "ray": ["ray"], "deepspeed": ["deepspeed"]}.items():
        for dist in dists:
            try:
                out[name] = md.version(dist)
                break
            except md.PackageNotFoundError:
                continue
    return out


def missing_requirements(dist: str) -> list[str]:
    """Requirements of `dist` (no extras) that this interpreter does not satisfy; for the TRL venv's build."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    missing = []
    for spec in md.requires(dist) or []:
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            if req.specifier and not req.specifier.contains(md.version(req.name), prereleases=True):
                missing.append(f"{req.name}{req.specifier}")
        except md.PackageNotFoundError:
            missing.append(f"{req.name}{req.specifier}")
    return missing


def code_state() -> str:
    """The sdft code a run measures: HEAD, plus a digest of uncommitted changes outside benchmarks/ and the
    Makefile (another commit landing mid-benchmark shows up as two states in one table)."""
    def git(*a):
        return subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True).stdout

    head = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    diff = git("diff", "HEAD", "--", ".", ":(exclude)benchmarks", ":(exclude)Makefile")
    return f"{head}+{hashlib.sha1(diff.encode()).hexdigest()[:8]}" if diff else head


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _launch(python: str, row: str, model: str, rep: int, spec: dict, log_dir: Path, timeout: float) -> dict:
    log = log_dir / f"{model}-{row}-rep{rep}.log"
    with tempfile.TemporaryDirectory(prefix="vs-trl-") as tmp:
        spec_file, result_file = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_file.write_text(json.dumps(spec))
        cmd = [python, str(Path(__file__).resolve()), "--worker", row, "--spec", str(spec_file),
               "--result", str(result_file)]
        load, code = loadavg(), code_state()
        with log.open("w") as f:
            t_launch = time.time()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=worker_env(), stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)  # the worker's own session: it and whatever it started (Ray, vLLM)
                proc.wait()
                rc = "timeout"
        wall = time.time() - t_launch
        base = {"row": row, "model": model, "rep": rep, "loadavg_at_start": load, "code": code, "wall_s": wall,
                "log": str(log)}
        if rc != 0 or not result_file.exists():
            tail = log.read_text(errors="replace").splitlines()[-15:]
            return {**base, "ok": False, "error": f"exit {rc}", "log_tail": tail}
        res = json.loads(result_file.read_text())
    return {**base, "ok": True, "t_launch": t_launch, **res}


def summarize(run: dict, warmup: int) -> dict:
    """Steady-state s/step and split of one run, time to first step."""
    ends, n = run["step_ends"], len(run["step_ends"])
    steady = range(warmup, n - 1)  # 0-based: skip the first `warmup` steps and the last one
    out = {"ttfs_s": run.get("first_step_end", ends[0]) - run["t_launch"],
           "s_per_step": (ends[n - 2] - ends[warmup - 1]) / len(steady),
           "step_deltas": [b - a for a, b in zip(ends, ends[1:])]}
    keys = sorted({k for i in steady for k in run["split"][i]})
    out["split"] = {k: statistics.fmean(run["split"][i][k] for i in steady if k in run["split"][i]) for k in keys}
    return out


def _med(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def _split_text(split: dict) -> str:
    parts = [f"{split[k]:.3f}" if k in split else "–" for k in ("rollout", "learner", "sync")]
    text = " / ".join(parts)
    extra = []
    for k, v in sorted(split.items()):
        if not k.startswith("sync."):
            continue
        if k == "sync.bytes":
            extra.append(f"{v / 1e6:.1f} MB")
        elif k != "sync.seconds":
            extra.append(f"{k.removeprefix('sync.')} {v:.3f}")
    return text + (f" ({', '.join(extra)})" if extra else "")


def table(model: str, results: list[dict], rows: list[str], warmup: int) -> str:
    per_row = {}
    for row in rows:
        ok = [summarize(r, warmup) for r in results if r["row"] == row and r["ok"]]
        per_row[row] = ok
    med = {row: statistics.median(s["s_per_step"] for s in v) for row, v in per_row.items() if v}
    bases = [b for b in ("trl-vllm", "trl-hf") if b in med]
    head = ["row", "s/step median (min–max)", *[f"speed vs {BASE_LABELS[b]}" for b in bases],
            "time to first step s (min–max)", "split s/step: rollout / learner / sync (sync details)", "runs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 3) + ["---", "---:"]) + "|"]
    for row in rows:
        runs = per_row[row]
        n_fail = sum(1 for r in results if r["row"] == row and not r["ok"])
        if not runs:
            lines.append("| " + " | ".join([ROWS[row], "failed", *["–"] * (len(head) - 3), f"0/{n_fail}"]) + " |")
            continue
        s, lo, hi = _med([x["s_per_step"] for x in runs])
        t, tlo, thi = _med([x["ttfs_s"] for x in runs])
        split = {k: statistics.median(x["split"][k] for x in runs if k in x["split"])
                 for k in sorted({k for x in runs for k in x["split"]})}
        cells = [ROWS[row], f"{s:.3f} ({lo:.3f}–{hi:.3f})", *[f"{med[b] / s:.2f}×" for b in bases],
                 f"{t:.1f} ({tlo:.1f}–{thi:.1f})", _split_text(split), f"{len(runs)}/{len(runs) + n_fail}"]
        lines.append("| " + " | ".join(cells) + " |")
    if "sft" in med:  # the paper's cost question: each SDFT layout's step time against SFT's
        lines.append("\nSDFT / SFT s/step: " + ", ".join(f"{ROWS[r]} {med[r] / med['sft']:.2f}×"
                                                        for r in rows if r in med and r.startswith("sdft")))
    states = sorted({r["code"] for r in results if not r["row"].startswith("trl")})
    if len(states) > 1:
        lines.append(f"\nWARNING: the sdft code changed during this benchmark ({', '.join(states)}); rerun it.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,smollm2", help=f"comma-separated, of {sorted(WORKLOADS)}")
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"comma-separated, of {list(ROWS)}")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of s/step (the last one too)")
    p.add_argument("--quick", action="store_true", help="harness check: tiny only, 1 rep, 4 steps")
    p.add_argument("--out", default=str(ROOT / "runs" / "vs_trl" / "results.json"))
    p.add_argument("--trl-python", default=str(ROOT / ".cache" / "trl-venv" / "bin" / "python"))
    p.add_argument("--sdft-python", default=sys.executable)
    p.add_argument("--timeout", type=float, default=1200, help="seconds per worker run before it is killed")
    p.add_argument("--worker", choices=list(ROWS), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--missing-requirements", metavar="DIST", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.missing_requirements:
        print(" ".join(missing_requirements(args.missing_requirements)))
        return
    if args.worker:
        run_worker(args.worker, args.spec, args.result)
        return

    if args.quick:
        args.models, args.reps, args.steps = "tiny", 1, 4
    models, rows = args.models.split(","), args.rows.split(",")
    for name in models:
        if name not in WORKLOADS:
            p.error(f"unknown model {name!r}; choose from {sorted(WORKLOADS)}")
    for name in rows:
        if name not in ROWS:
            p.error(f"unknown row {name!r}; choose from {list(ROWS)}")
    if args.warmup_steps < 1:
        p.error("--warmup-steps must be at least 1 (the first step includes start-up)")
    if args.steps < args.warmup_steps + 2:
        p.error(f"--steps must be at least --warmup-steps + 2 = {args.warmup_steps + 2}")
    if any(r.startswith("trl") for r in rows) and not Path(args.trl_python).exists():
        p.error(f"{args.trl_python} does not exist: `make bench-trl` builds the TRL venv (or pass --trl-python)")

    sys.path.insert(0, str(ROOT))
    from pipeline.config import TEACHER_TEMPLATE
    from pipeline.models import resolve_model

    out = Path(args.out)
    log_dir = out.parent / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    trl_versions = json.loads(subprocess.run(
        [args.trl_python, "-c", "import json, importlib.metadata as m; print(json.dumps({d: m.version(d) for d in "
         "('trl', 'torch', 'transformers', 'vllm-cpu')}))"], capture_output=True, text=True, check=True,
    ).stdout) if any(r.startswith("trl") for r in rows) else {}
    versions = {**_versions(), "trl": trl_versions.get("trl", "not installed")}
    header = {"machine": machine(), "versions": versions, "trl_venv_versions": trl_versions,
              "code": code_state(), "loadavg_before": loadavg(), "recipe": RECIPE,
              "steps": args.steps, "reps": args.reps, "warmup_steps": args.warmup_steps}
    print(f"sdft vs TRL SDFTTrainer — {header['machine']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + f"; sdft {header['code']}")
    print(f"load average before: {header['loadavg_before']}")
    print(f"{args.steps} steps per run, steady state = steps {args.warmup_steps + 1}..{args.steps - 1}, "
          f"{args.reps} interleaved repetitions, logs in {log_dir}\n", flush=True)

    teacher_template = TEACHER_TEMPLATE.replace("{x}", "{prompt}").replace("{c}", "{privileged_context}")
    results, tables = [], {}
    for model in models:
        w = WORKLOADS[model]
        spec = {"model_spec": w["spec"], "model_path": resolve_model(w["spec"]), "data": w["data"],
                "batch": w["batch"], "max_model_len": w["max_model_len"], "steps": args.steps,
                "max_new_tokens": w.get("max_new_tokens", RECIPE["max_new_tokens"]),
                "teacher_template": teacher_template}
        model_results = []
        for rep in range(args.reps):
            for row in rows:
                python = args.trl_python if row.startswith("trl") else args.sdft_python
                res = _launch(python, row, model, rep, spec, log_dir, args.timeout)
                if res["ok"]:
                    s = summarize(res, args.warmup_steps)
                    print(f"  {model} rep {rep + 1}/{args.reps} {row:12} {s['s_per_step']:.3f} s/step, first step "
                          f"after {s['ttfs_s']:.1f} s (load {res['loadavg_at_start']})", flush=True)
                else:
                    print(f"  {model} rep {rep + 1}/{args.reps} {row:12} FAILED ({res['error']}), see {res['log']}:\n"
                          + "\n".join("      " + line for line in res["log_tail"]), flush=True)
                model_results.append(res)
        results += model_results
        w_desc = f"{w['batch']} prompts x {w.get('max_new_tokens', RECIPE['max_new_tokens'])} new tokens per step"
        tables[model] = (f"### {model} ({w['spec']}, {w_desc}; load average now {loadavg()})\n\n"
                         + table(model, model_results, rows, args.warmup_steps))
        print("\n" + tables[model] + "\n", flush=True)

    header["loadavg_after"] = loadavg()
    print(f"load average after: {header['loadavg_after']}")
    out.write_text(json.dumps({**header, "tables": tables, "runs": results}, indent=1))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
