"""Typed run configuration: YAML file + dotted command-line overrides, validated before anything starts.

Defaults follow the SDFT paper's recipe (SPEC §1) except where a small CPU run needs otherwise; the
YAML files in `configs/` say so where they differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# The official SDFT code's teacher template, byte for byte: {x} is the prompt, {c} the demonstration.
TEACHER_TEMPLATE = (
    "\n{x}\n\nThis is an example for a response to the question:\n{c}\n\n"
    "Now answer with a response of your own, including the thinking process.\n"
)

# `sdft train` without a config: SDFT on the embedded toy world. configs/default.yaml is the tiny random-model
# smoke config the pipeline tests use.
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "toy.yaml"


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file and key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class ModelConfig(_Section):
    path: str = "tiny:llama"  # HF folder, hub id, or tiny:llama / tiny:qwen2
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    max_model_len: int = Field(1024, gt=0)
    trust_remote_code: bool = False


class DataConfig(_Section):
    train: str = "configs/data/tiny.jsonl"  # JSONL file, a `datasets.save_to_disk` folder, or hf:<name>
    eval: str | None = None  # same forms; None: hold out `eval_fraction` of train
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    eval_size: int | None = Field(None, gt=0)  # cap on eval examples
    split: str = "train"  # split name for hub datasets
    prompt_field: str = "prompt"
    demonstration_field: str = "demonstration"
    answer_field: str | None = "answer"  # reference for eval; falls back to the demonstration
    teacher_template: str = TEACHER_TEMPLATE
    shuffle: bool = True


class RolloutConfig(_Section):
    max_new_tokens: int = Field(256, gt=0)
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    samples_per_prompt: int = Field(1, ge=1)
    num_engines: int = Field(1, ge=1)
    enforce_eager: bool = True
    gpu_memory_utilization: float = Field(0.5, gt=0.0, le=1.0)
    cpu_kv_cache_gib: int = Field(1, ge=1)


class TeacherConfig(_Section):
    kind: Literal["ema", "frozen", "live"] = "ema"
    ema_alpha: float = Field(0.01, gt=0.0, le=1.0)  # phi <- alpha*theta + (1-alpha)*phi


class LossConfig(_Section):
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "topk", "sampled"] = "forward_kl"
    jsd_beta: float = Field(0.5, ge=0.0, le=1.0)  # 0 -> forward KL, 1 -> reverse KL
    temperature: float = Field(1.0, gt=0.0)
    skip_first_tokens: int = Field(3, ge=0)
    is_correction: bool = True
    is_cap: float = Field(2.0, gt=0.0)
    topk: int = Field(64, ge=1)
    backend: Literal["torch", "triton", "fused_linear"] = "torch"
    chunk_size: int = Field(1024, ge=1)  # fused_linear tokens per chunk


class TrainConfig(_Section):
    mode: Literal["sdft", "sft"] = "sdft"
    steps: int | None = Field(None, gt=0)  # None: derived from epochs
    epochs: float = Field(1.0, gt=0.0)
    batch_size: int = Field(32, gt=0)  # prompts per optimizer step (effective batch)
    micro_batch_size: int = Field(8, gt=0)  # sequences per forward/backward
    lr: float = Field(5e-5, gt=0.0)
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float = Field(1.0, gt=0.0)
    zero_stage: Literal[0, 1, 2, 3] = 0
    gradient_checkpointing: bool = False
    seed: int = 0

    @model_validator(mode="after")
    def _micro_divides(self):
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.batch_size ({self.batch_size}) must be a multiple of train.micro_batch_size "
                f"({self.micro_batch_size})"
            )
        return self


class EvalConfig(_Section):
    every: int = Field(0, ge=0)  # steps between evals; 0: only before and after training
    max_new_tokens: int | None = Field(None, gt=0)  # None: rollout.max_new_tokens
    metric: str = "exact_match"  # exact_match | regex | contains | a callable "package.module:function"
    regex: str | None = None  # with metric=regex: group 1 (or the match) is compared to the reference
    # Named extra eval sets (name -> data source, same forms as data.train), scored with eval.metric and
    # logged as eval.<name>.accuracy / eval.<name>.exact_match; e.g. the prior skills, to measure retention.
    sets: dict[str, str] = Field(default_factory=dict)
    prior: list[str] = Field(default_factory=list)  # names in `sets` averaged into eval.prior_accuracy / prior_exact
    teacher: bool = False  # also score the eval set *with* its demonstration in context (teacher_accuracy)
    # The headline prior-skill number of `sdft compare`: eval.metric (prior_accuracy) or exact match (prior_exact)
    prior_metric: Literal["metric", "exact_match"] = "metric"
    size: int | None = Field(None, gt=0)  # cap on examples per named set

    @model_validator(mode="after")
    def _prior_in_sets(self):
        missing = [n for n in self.prior if n not in self.sets]
        if missing:
            raise ValueError(f"eval.prior names {missing} that are not in eval.sets ({sorted(self.sets)})")
        return self


class CheckpointConfig(_Section):
    every: int = Field(0, ge=0)  # 0: only at the end
    keep_last: int = Field(2, ge=1)


class LoggingConfig(_Section):
    wandb: bool = True  # offline when WANDB_API_KEY is unset
    project: str = "sdft"
    run_name: str | None = None
    progress: bool = True


class RayConfig(_Section):
    address: str | None = None  # None: join RAY_ADDRESS if set, else start a local instance
    num_cpus: int | None = None  # local instance only
    placement: Literal["disaggregated", "colocated"] = "disaggregated"
    learner_ranks: int = Field(1, ge=1)  # M DeepSpeed data-parallel ranks (one GPU each on GPU clusters)
    learner_cpus: float = Field(1.0, gt=0.0)
    rollout_cpus: float = Field(1.0, gt=0.0)
    # Extra Ray resources each learner / rollout bundle asks for, e.g. {"learner_node": 1} to pin roles to nodes.
    learner_resources: dict[str, float] = {}
    rollout_resources: dict[str, float] = {}
    engine_max_restarts: int = Field(3, ge=0)  # a crashed rollout engine is restarted and re-synced


class AsyncConfig(_Section):
    # 0: strict on-policy (generate, train, sync). k >= 1: generation runs up to k weight versions ahead of the
    # learner, overlapping with its steps; the truncated IS weight corrects for the lag.
    max_staleness: int = Field(0, ge=0)


class SyncConfig(_Section):
    backend: Literal["auto", "object_store", "nccl", "ipc"] = "auto"  # auto: object_store on CPU
    check_greedy: bool = False  # after every sync, assert vLLM greedy == learner greedy (debug)


class Config(_Section):
    output_dir: str = "runs/default"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    rollout: RolloutConfig = RolloutConfig()
    teacher: TeacherConfig = TeacherConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    ray: RayConfig = RayConfig()
    sync: SyncConfig = SyncConfig()
    async_: AsyncConfig = Field(AsyncConfig(), alias="async")

    @property
    def sequences_per_step(self) -> int:
        return self.train.batch_size * (self.rollout.samples_per_prompt if self.train.mode == "sdft" else 1)

    @model_validator(mode="after")
    def _compatible(self):
        if self.loss.backend == "fused_linear" and self.train.zero_stage == 3:
            raise ValueError("loss.backend=fused_linear needs the full lm_head on each rank: use train.zero_stage <= 2")
        per_rank = self.ray.learner_ranks * self.train.micro_batch_size
        if self.sequences_per_step % per_rank:
            raise ValueError(
                f"{self.sequences_per_step} sequences per step (train.batch_size x rollout.samples_per_prompt) cannot "
                f"be split into {self.ray.learner_ranks} learner rank(s) x micro-batches of "
                f"{self.train.micro_batch_size}: adjust train.batch_size / train.micro_batch_size / ray.learner_ranks"
            )
        if self.sync.check_greedy and self.train.zero_stage == 3 and self.ray.learner_ranks > 1:
            raise ValueError("sync.check_greedy generates on learner rank 0 alone: not with ZeRO-3 over several ranks")
        if self.ray.placement == "colocated" and self.async_.max_staleness:
            raise ValueError("ray.placement=colocated shares each GPU between learner and engine, so nothing can "
                             "overlap: set async.max_staleness=0 or use ray.placement=disaggregated")
        if self.train.mode == "sft" and self.async_.max_staleness:
            raise ValueError("async.max_staleness applies to SDFT rollouts; SFT has none: set it to 0")
        if self.loss.backend != "torch" and self.loss.divergence in ("topk", "sampled"):
            raise ValueError(f"loss.divergence={self.loss.divergence} is implemented in torch only: set loss.backend=torch")
        return self


def _parse_override(item: str) -> tuple[list[str], object]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=1e-5")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (check the spelling; see pipeline/config.py for valid keys)")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read YAML (default: DEFAULT_CONFIG, configs/toy.yaml), apply `a.b=value` overrides, validate."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        keys, value = _parse_override(item)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k} is not a section")
        node[keys[-1]] = value
    source = f"{path}" + (f" (with overrides {' '.join(overrides)})" if overrides else "")
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None
