"""`sdft` command line: train and eval."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from .run.checkpoint import verify
from .config import DEFAULT_CONFIG, load_config
from .errors import CheckpointError, ConfigError, SdftError
from .models import check_model_folder

METHODS = ("sft", "dft", "sdft")  # train.mode values `sdft compare` runs


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sdft",
        description="Self-Distillation Fine-Tuning: the model conditioned on a demonstration teaches itself "
                    "without it, on its own samples (vLLM rollouts, DeepSpeed learner, Ray actors).",
    )
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train with SDFT (or the SFT baseline: train.mode=sft)",
                       description="Train from a YAML config. Extra key=value arguments override config keys, "
                                   "e.g. `sdft train configs/x.yaml train.lr=1e-5 rollout.max_new_tokens=64`.")
    t.add_argument("config", nargs="?", help=f"YAML config (default: {DEFAULT_CONFIG.relative_to(DEFAULT_CONFIG.parents[1])})")
    t.add_argument("--output", help="output folder for checkpoints and metrics.jsonl (overrides output_dir)")
    t.add_argument("--steps", type=int, help="number of optimizer steps (overrides train.steps)")
    t.add_argument("--resume", nargs="?", const="latest", metavar="{latest,auto}",
                   help="continue from the newest checkpoint in the output folder, refused if it does not match its "
                        "manifest; --resume=auto: from the newest intact one")
    t.add_argument("--allow-config-change", action="store_true",
                   help="resume even though the config differs from the checkpoint's in keys that change what a "
                        "step computes")
    t.add_argument("--overwrite", action="store_true",
                   help="start over in an output folder that holds a previous run (its metrics, checkpoints and "
                        "logs are deleted)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    e = sub.add_parser("eval", help="evaluate a checkpoint on the eval split of its config",
                       description="Generate greedily on the eval prompts (no demonstrations) and score them.")
    e.add_argument("checkpoint", help="a step_* folder written by `sdft train` (or any HF model folder)")
    e.add_argument("config", nargs="?", help="YAML config (default: the checkpoint's own config.yaml)")
    e.add_argument("--lm-eval", metavar="TASKS",
                   help="also run lm-evaluation-harness tasks on it through vLLM: comma-separated task names (each "
                        "optionally TASK:METRIC), the preset 'paper', or a folder of your own task YAMLs (all of them)")
    e.add_argument("--limit", type=float, help="with --lm-eval: examples per task (a count, or a fraction below 1)")
    e.add_argument("--output", help="with --lm-eval: the results JSON (default: RUN/lm_eval/<checkpoint>.json for a "
                                    "checkpoint of `sdft train`, ./lm_eval/<folder>.json otherwise)")
    e.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    c = sub.add_parser("compare", help="base vs SFT vs SDFT from the same base: table, results.json, plot",
                       description="Train every method of --methods from the same config (only train.mode "
                                   "differs) and compare new-skill accuracy and prior-skill retention.")
    c.add_argument("config", nargs="?", help="YAML config (default: the default of `sdft train`)")
    c.add_argument("--output", default="runs/compare", help="folder for the runs, results.json and compare.png")
    c.add_argument("--steps", type=int, help="optimizer steps per method (overrides train.steps)")
    c.add_argument("--methods", default="sft,sdft",
                   help="comma-separated, from sft, dft (the official code's DFT baseline), sdft (default: sft,sdft)")
    c.add_argument("--overwrite", action="store_true", help="replace the runs a previous compare left in --output")
    c.add_argument("--sequential", nargs="+", metavar="NAME=TRAIN,EVAL",
                   help="train the stages one after another (each from the previous weights); forgetting table")
    c.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    x = sub.add_parser("export", help="write a checkpoint's student as one HF model folder (LoRA: base + adapter merged)",
                       description="Write the student of a `sdft train` checkpoint as a plain HF model folder (config, "
                                   "safetensors, tokenizer) that transformers and vLLM load without peft; a LoRA "
                                   "checkpoint's adapter is merged into its base.")
    x.add_argument("checkpoint", help="a step_* folder written by `sdft train`")
    x.add_argument("--merge", metavar="OUT", required=True, help="output folder of the merged model")
    d = sub.add_parser("data", help="data tools: convert the SDFT paper's released data to sdft rows")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dc = dsub.add_parser("convert", help="the official release's tool-use or science data -> JSONL rows",
                         description="Convert the official SDFT release's data (datasets save_to_disk folders, or the "
                                     "folder holding train_data/ and eval_data/) to rows of prompt (chat messages), "
                                     "demonstration and answer, as its training and eval code take them.")
    dc.add_argument("source", help="a split folder, a JSON/JSONL file, or the release folder with train_data/, eval_data/")
    dc.add_argument("--from", dest="kind", required=True, choices=("official-tooluse", "official-science"))
    dc.add_argument("--output", required=True,
                    help="OUT.jsonl for one split; a folder (train.jsonl, eval.jsonl) for the release folder")
    sub.add_parser("config", help="print the config reference: every key, its type, default and meaning",
                   description="The reference generated from the typed config (the same text as docs/config.md).")
    return p


def _split_config_arg(config: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """argparse cannot tell an optional CONFIG from the first key=value; fix that up here."""
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        return None, [config, *overrides]
    return config, overrides


def _train(args) -> dict:
    from .run.console import print_summary
    from .run.driver import train

    config, overrides = _split_config_arg(args.config, args.overrides)
    resume, config, overrides = _resume_mode(args.resume, config, overrides)
    if args.output:
        overrides.append(f"output_dir={args.output}")
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    cfg = load_config(config, overrides)
    if resume and args.overwrite:
        raise ConfigError("--resume continues the run in the output folder, --overwrite deletes it: choose one")
    summary = train(cfg, resume=resume, overwrite=args.overwrite, allow_config_change=args.allow_config_change)
    print_summary(summary, cfg.output_dir)
    return summary


def _resume_mode(value: str | None, config: str | None, overrides: list[str]):
    """(None, "latest" or "auto"; config; overrides). In `--resume CONFIG` or `--resume key=value` argparse hands the
    next word to --resume as its value: it goes back to the positionals, as before --resume took a value."""
    if value in (None, "latest", "auto"):
        return value, config, overrides
    if value.endswith((".yaml", ".yml")) and config is None:
        return "latest", value, overrides
    if "=" in value:
        return "latest", config, [value, *overrides]
    raise ConfigError(f"--resume={value}: choose latest (the default) or auto")


def _eval(args) -> dict:
    from transformers import AutoTokenizer

    from actors.launcher import init_ray
    from actors.rollout import RolloutEngine, engine_env

    import ray

    from .data import load_splits
    from .experiments.evaluation import evaluate

    ckpt = Path(args.checkpoint)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt} is not a folder: give a step_* folder of `sdft train` or an HF model folder")
    if any((ckpt / f).exists() for f in ("trainer_state.json", "manifest.json", "config.yaml")):
        verify(ckpt)  # a checkpoint of `sdft train` (even one that lost a file): it must match its manifest
    config, overrides = _split_config_arg(args.config, args.overrides)
    if args.limit is not None and not args.lm_eval:
        raise ConfigError("--limit applies to --lm-eval: add --lm-eval TASKS")
    cfg, model_dir = _eval_config(ckpt, config, [*overrides, *_lm_eval_overrides(args)])
    check_model_folder(model_dir, str(ckpt))  # one line for a folder that holds no model
    suite = None
    if cfg.eval.lm_eval.tasks:
        from .experiments.harness import prepare_suite

        suite = prepare_suite(cfg.eval.lm_eval)  # before Ray: a bad task name or an offline hub dataset stops here
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    _, eval_set = load_splits(cfg, tokenizer)
    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    engine = ray.remote(RolloutEngine).options(
        num_cpus=cfg.ray.rollout_cpus, runtime_env={"env_vars": engine_env(cfg.rollout)}
    ).remote(str(model_dir), cfg, log_dir=str(_eval_log_dir(ckpt)))
    try:
        result = evaluate([engine], eval_set, tokenizer, cfg)
        if suite is not None:
            from .experiments.harness import run_suite, write_results

            scores = run_suite([engine], tokenizer, suite, cfg)
            path = write_results(scores, _lm_eval_output(ckpt, args.output), {"checkpoint": str(ckpt)})
            result["lm_eval"] = {**{k: v for k, v in scores.items() if k != "full"}, "results_file": str(path)}
    finally:
        ray.kill(engine)
    print(json.dumps({"checkpoint": str(ckpt), **result}, indent=1))
    return result


def _lm_eval_overrides(args) -> list[str]:
    """--lm-eval TASKS (names, a preset, or a folder of task YAMLs: all of them) and --limit as config keys."""
    if not args.lm_eval:
        if args.output:
            raise ConfigError("--output applies to --lm-eval: add --lm-eval TASKS")
        return []
    folder = Path(args.lm_eval)
    if folder.is_dir():
        names = sorted({_task_name(p) for p in folder.rglob("*.yaml")} - {None})
        if not names:
            raise ConfigError(f"--lm-eval {folder}: no task YAML (a file with a `task:` key) in that folder")
        tasks = [f"eval.lm_eval.include_path={folder}", f"eval.lm_eval.tasks={json.dumps(names)}"]
    else:
        tasks = [f"eval.lm_eval.tasks={json.dumps([t.strip() for t in args.lm_eval.split(',') if t.strip()])}"]
    return [*tasks, *([f"eval.lm_eval.limit={args.limit}"] if args.limit is not None else [])]


def _task_name(path: Path) -> str | None:
    import yaml

    try:  # the harness's YAMLs may use its own tags (!function): read the `task:` line only
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("task:"):
                name = yaml.safe_load(line.partition(":")[2])
                return name if isinstance(name, str) else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return None


def _lm_eval_output(ckpt: Path, output: str | None) -> Path:
    if output:
        return Path(output)
    if (ckpt / "trainer_state.json").exists():
        return ckpt.resolve().parent / "lm_eval" / f"{ckpt.name}.json"
    return Path("lm_eval") / f"{ckpt.resolve().name}.json"


def _eval_config(ckpt: Path, config: str | None, overrides: list[str]):
    """(config, model folder) of `sdft eval`. A checkpoint's own config may not make eval run code: the model's
    remote code and a metric that is a Python callable must come from the command line (or a config of yours)."""
    own_config = config is None and (ckpt / "config.yaml").exists()
    if own_config:
        config = str(ckpt / "config.yaml")
    model_dir = ckpt / "model" if (ckpt / "model" / "config.json").exists() else ckpt
    # nothing that executes or connects: remote code, and the cluster its run used (it would get your driver's pickles)
    guard = ["model.trust_remote_code=false", "ray.address=null"] if own_config else []
    # model/ of a LoRA run is base + adapter merged: a plain model, served without LoRA
    cfg = load_config(config, [*guard, *overrides, f"model.path={model_dir}", "model.lora.r=null"])
    if own_config and ":" in cfg.eval.metric and not any(o.startswith("eval.metric=") for o in overrides):
        raise CheckpointError(f"{config} sets eval.metric={cfg.eval.metric}, a Python callable, and a checkpoint's "
                              f"config may not run code: pass eval.metric={cfg.eval.metric} to use it")
    return cfg, model_dir


def _eval_log_dir(ckpt: Path) -> Path:
    """The engine's output joins its training run's logs; any other model folder gets a fresh temp folder."""
    if (ckpt / "trainer_state.json").exists():
        return ckpt.resolve().parent / "logs"
    import tempfile

    return Path(tempfile.mkdtemp(prefix="sdft-eval-logs-"))


def _compare(args) -> dict:
    from .experiments.compare import parse_stages, run_compare, run_sequential

    config, overrides = _split_config_arg(args.config, args.overrides)
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ConfigError(f"--methods {args.methods!r}: choose from {', '.join(METHODS)}")
    if args.sequential:
        try:
            stages = parse_stages(args.sequential)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return run_sequential(config, overrides, Path(args.output), methods, stages, args.overwrite)
    return run_compare(config, overrides, Path(args.output), methods, args.overwrite)


def _data(args) -> dict:
    from .convert import convert

    result = convert(args.kind, Path(args.source), Path(args.output))
    print(json.dumps(result, indent=1))
    return result


def _export(args) -> dict:
    from .export import export_merged

    out = export_merged(Path(args.checkpoint), Path(args.merge))
    result = {"checkpoint": str(args.checkpoint), "merged": str(out)}
    print(json.dumps(result, indent=1))
    return result


def _config(args) -> None:
    from .config_doc import render

    print(render())


def _last_step(metrics: Path) -> int:
    for line in reversed(metrics.read_text().splitlines() if metrics.exists() else []):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):  # a line cut short by the interrupt
            continue
    return 0


def _stopped(args, argv: list[str]) -> str:
    """Where Ctrl-C left a run (the last step logged, the last complete checkpoint) and how to go on."""
    import shlex

    from .run import console
    from .run.checkpoint import latest

    if args.command != "train" or console.current_log is None:
        return "sdft: stopped" + (" before training started" if args.command == "train" else "")
    out = console.current_log.parent.parent  # OUTPUT/logs/driver.log
    step = _last_step(out / "metrics.jsonl")
    again = shlex.join(["sdft", *(a for a in argv if a not in ("--resume", "--overwrite"))])
    ckpt = latest(out)
    if ckpt is None:
        return f"sdft: stopped at step {step}, before any checkpoint was saved; start over with `{again} --overwrite`"
    return f"sdft: stopped at step {step}; continue with `{again} --resume` (from {ckpt.name})"


def _save_traceback(e: BaseException) -> Path:
    """The full traceback, appended to the run's driver.log (a temp file when no run got that far)."""
    import tempfile
    import time
    import traceback

    from .run import console

    log = console.current_log
    if log is None or not log.parent.is_dir():
        fd, name = tempfile.mkstemp(prefix="sdft-error-", suffix=".log")
        os.close(fd)
        log = Path(name)
    with log.open("a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} sdft: unexpected error\n{''.join(traceback.format_exception(e))}")
    return log


def main(argv: list[str] | None = None) -> int:
    from .run import console
    from .models import first_line

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    # key=value overrides may come after --flags too (argparse alone stops collecting positionals there)
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if "=" not in a or a.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*getattr(args, "overrides", []), *extra]
    console.current_log = None
    previous = sigterm_as_interrupt()
    try:
        {"train": _train, "eval": _eval, "compare": _compare, "export": _export, "data": _data,
         "config": _config}[args.command](args)
    except SdftError as e:  # foreseen: one line, its prefix and exit code from the class (pipeline/errors.py)
        print(f"{e.prefix}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(_stopped(args, argv), file=sys.stderr)
        return 130
    except Exception as e:  # nobody foresaw it: the traceback goes to a file, the console gets one line
        cause = e.cause if isinstance(getattr(e, "cause", None), Exception) else e  # a Ray task's own exception
        print(f"sdft: unexpected error: {type(cause).__name__}: {first_line(cause)}; full traceback in "
              f"{_save_traceback(e)}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def sigterm_as_interrupt():
    """SIGTERM (a scheduler's stop, `kill`) takes Ctrl-C's path: actors stopped, one line naming where to resume.
    Installed again once Ray is up, whose native signal handler would otherwise print a stack and exit. Returns the
    handler it replaced."""
    return signal.signal(signal.SIGTERM, _interrupt)


if __name__ == "__main__":
    sys.exit(main())
