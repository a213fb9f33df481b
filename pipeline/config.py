"""Typed run configuration: YAML file + dotted command-line overrides, validated before anything starts.

Defaults follow the SDFT paper's recipe except where a small CPU run needs otherwise; the
YAML files in `configs/` say so where they differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError  # the one project import: errors.py is a leaf too

# The official SDFT code's teacher template, byte for byte: {x} is the prompt, {c} the demonstration.
TEACHER_TEMPLATE = (
    "\n{x}\n\nThis is an example for a response to the question:\n{c}\n\n"
    "Now answer with a response of your own, including the thinking process.\n"
)

# `sdft train` without a config: SDFT on the embedded toy world. configs/smoke.yaml is the tiny random-model
# smoke config the pipeline tests use.
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "toy.yaml"


MAX_CONSECUTIVE_SKIPS = 5  # train.on_nonfinite=skip: more than this many skipped steps in a row is divergence


class _Section(BaseModel):
    # allow_inf_nan=False: `train.lr=.inf` or `nan` is a typo, never a setting
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True, allow_inf_nan=False)


# LoRA ranks a vLLM engine can serve (`max_lora_rank` must be one of vllm.config.lora.MaxLoRARanks); an adapter of
# rank r runs in an engine started with the smallest of them >= r.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# All attention and MLP projections of Llama / Qwen / Mistral-style decoders.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRAConfig(_Section):
    r: int | None = Field(
        None, ge=1, description="LoRA rank; None: LoRA off (full fine-tuning). Set: only the adapter trains, the "
        "teacher is the same base with its own adapter, only the adapter is pushed to the engines (served with "
        "max_lora_rank = the smallest vLLM rank >= r); train.zero_stage 0 or 2, not 3",
    )
    alpha: float | None = Field(None, gt=0.0, description="LoRA scaling: the update is (alpha / r)·B·A; None: 2·r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input (training only)")
    target_modules: list[str] = Field(
        default_factory=lambda: list(LORA_TARGETS),
        description="names of the linear layers that get an adapter (peft's suffix match); each must exist in the "
        "model (checked when it is loaded)",
    )

    @property
    def enabled(self) -> bool:
        return self.r is not None

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.r

    @property
    def max_lora_rank(self) -> int:
        """The engines' `max_lora_rank`: the smallest rank vLLM supports that holds `r`."""
        return next(k for k in VLLM_LORA_RANKS if k >= self.r)

    @model_validator(mode="after")
    def _servable(self):
        if self.r is not None and self.r > VLLM_LORA_RANKS[-1]:
            raise ValueError(f"model.lora.r={self.r} is above the largest LoRA rank vLLM engines serve "
                             f"(max_lora_rank in {', '.join(map(str, VLLM_LORA_RANKS))}): use r <= {VLLM_LORA_RANKS[-1]}")
        if not self.target_modules:
            raise ValueError("model.lora.target_modules is empty: name at least one linear layer, e.g. q_proj")
        return self


class ModelConfig(_Section):
    path: str = Field(
        "tiny:llama",
        description="Hugging Face folder, hub id, `toy:base` (the toy world's base), `package:smollm2`, "
        "or `tiny:llama` / `tiny:qwen2` (small random-weight test models)",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights dtype of learner and engines; auto: bf16 on GPU, fp32 on CPU"
    )
    max_model_len: int = Field(
        1024, gt=0, description="context length of the vLLM engines; prompt + rollout.max_new_tokens must fit"
    )
    trust_remote_code: bool = Field(False, description="passed to the tokenizer, the HF model and vLLM")
    lora: LoRAConfig = Field(LoRAConfig(), description="LoRA: train a low-rank adapter instead of every weight")

    def resolved_dtype(self, on_gpu: bool) -> str:
        """The dtype name `auto` stands for on this device."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if on_gpu else "float32"


class DataConfig(_Section):
    train: str = Field(
        "configs/data/tiny.jsonl",
        description="training data: a JSONL file, a `datasets.save_to_disk` folder, or `hf:<hub name>`",
    )
    eval: str | None = Field(
        None, description="eval data, same forms as `train`; None: hold out `eval_fraction` of train"
    )
    eval_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="share of train held out for eval when `eval` is not set"
    )
    eval_size: int | None = Field(None, gt=0, description="cap on eval examples")
    split: str = Field("train", description="split name for hub datasets and `save_to_disk` dataset dicts")
    prompt_field: str = Field("prompt", description="row field holding the prompt (a string or chat messages)")
    demonstration_field: str = Field("demonstration", description="row field holding the expert demonstration")
    answer_field: str | None = Field("answer", description="reference for eval; falls back to the demonstration")
    teacher_template: str = Field(
        TEACHER_TEMPLATE,
        description="teacher context: {x} the prompt, {c} the demonstration, folded into the last user turn "
        "(default: the official SDFT template, byte for byte)",
    )
    shuffle: bool = Field(True, description="shuffle training rows each epoch (seeded by train.seed)")

    @field_validator("teacher_template")
    @classmethod
    def _template_fields(cls, v: str) -> str:
        """{x} and {c}, and no other field: a template without {c} would give the teacher the student's context."""
        import string

        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(v) if name is not None}
        except ValueError as e:
            raise ValueError(f"not a valid template ({e}); write a literal brace as {{{{ or }}}}") from None
        if fields - {"x", "c"}:
            raise ValueError(f"names {sorted(fields - {'x', 'c'})}: only {{x}} (the prompt) and {{c}} (the "
                             "demonstration) exist; write a literal brace as {{ or }}")
        if fields != {"x", "c"}:
            raise ValueError("must contain both {x} (the prompt) and {c} (the demonstration)")
        return v
    chat_template_kwargs: dict[str, object] = Field(
        default_factory=dict,
        description="extra arguments of the tokenizer's chat template for the student and teacher contexts, eval and "
        "eval.lm_eval (e.g. {enable_thinking: false} for Qwen3)",
    )
    strip_thinking: bool = Field(
        False, description="drop <think>…</think> blocks from demonstrations (a thinking model's traces as demos)"
    )


class RolloutConfig(_Section):
    max_new_tokens: int = Field(256, gt=0, description="longest sampled completion, in tokens")
    temperature: float = Field(1.0, gt=0.0, description="sampling temperature of the rollouts")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling threshold of the rollouts")
    samples_per_prompt: int = Field(1, ge=1, description="completions sampled per prompt (SDFT)")
    num_engines: int = Field(1, ge=1, description="vLLM rollout engines; prompts go to them round-robin")
    enforce_eager: bool = Field(True, description="run vLLM without graph capture / compilation (fast start-up)")
    gpu_memory_utilization: float = Field(
        0.5, gt=0.0, le=1.0, description="share of GPU memory a vLLM engine may take (GPU only)"
    )
    cpu_kv_cache_gib: int = Field(1, ge=1, description="KV cache of a CPU vLLM engine in GiB (VLLM_CPU_KVCACHE_SPACE)")
    context: Literal["student", "teacher"] = Field(
        "student",
        description="the prompt rollouts are sampled on: the student context (SDFT, on-policy) or the teacher "
        "context, demonstration included (the official code's generate_from_teacher; no IS weight then). With a "
        "frozen teacher the engines keep the initial weights, so the teacher itself samples (train.mode=dft)",
    )


class TeacherConfig(_Section):
    kind: Literal["ema", "frozen", "live"] = Field(
        "ema", description="teacher weights: EMA of the student, the initial weights, or the current student"
    )
    ema_alpha: float = Field(
        0.01, gt=0.0, le=1.0, description="EMA rate after every optimizer step: `phi <- alpha*theta + (1-alpha)*phi`"
    )
    placement: Literal["learner", "engines"] = Field(
        "learner",
        description="where the teacher scores the samples: the learner (a forward over the teacher context next to the "
        "student's) or vLLM engines (a prefill of teacher context + sample returning the teacher's top `topk` "
        "log-probs per position; the learner is left with the student's forward and backward). engines: the live "
        "teacher is the rollout engine that sampled (async: the sampling version); under LoRA the frozen teacher is "
        "the rollout engines' base and the EMA teacher a second adapter on them; full fine-tuning with frozen or ema "
        "uses a pool of `engines` teacher engines (ema: phi pushed every `sync_every` steps). SDFT only: the sft and dft "
        "baselines ignore it",
    )
    topk: int = Field(
        20, ge=-1, description="placement=engines: teacher log-probs kept per position (vLLM prompt_logprobs); the loss "
        "is the forward KL over them plus a tail bucket (loss.topk_tail); -1: the full vocabulary (small vocabularies)",
    )
    engines: int = Field(
        1, ge=1, description="placement=engines, full fine-tuning, frozen or ema teacher: vLLM teacher engines, "
        "bundles of their own (ray.rollout_cpus / GPUs, ray.rollout_resources), loaded from model.path",
    )
    sync_every: int = Field(
        1, ge=1, description="placement=engines, full fine-tuning, ema teacher: steps between pushes of phi to the "
        "teacher engines (1: exact; k: the teacher is up to k - 1 EMA updates behind)",
    )
    check_every: int = Field(
        0, ge=0, description="placement=engines: every this many steps, learner rank 0 also scores a few samples "
        "under its own teacher and logs teacher/logprob_gap (mean |engine - learner| log-prob of the sampled tokens; "
        "catches dtype, staleness and sync bugs); 0: never",
    )



class LossConfig(_Section):
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "topk", "sampled"] = Field(
        "forward_kl",
        description="per-token divergence: KL(teacher||student), KL(student||teacher), generalized JSD, "
        "teacher top-k + tail bucket, or a single-token estimator on the sample",
    )
    jsd_beta: float = Field(
        0.5, ge=0.0, le=1.0, description="JSD mixing with divergence=jsd: 0 -> forward KL, 1 -> reverse KL"
    )
    temperature: float = Field(1.0, gt=0.0, description="logits are divided by it before the divergence")
    skip_first_tokens: int = Field(3, ge=0, description="completion tokens masked out of the loss at the start")
    is_correction: bool = Field(
        True, description="weight each sequence by the truncated importance ratio train vs rollout logprobs"
    )
    is_cap: float = Field(2.0, gt=0.0, description="truncation of the per-token importance ratio")
    topk: int = Field(64, ge=1, description="teacher tokens kept by divergence=topk")
    topk_tail: bool = Field(
        True, description="teacher.placement=engines: the top-k forward KL has a tail bucket (k+1 categories: the "
        "teacher's remaining mass against the student's), without which a truncated top-k KL is biased; false: the "
        "sum over the k ids alone",
    )
    token_clip: float | None = Field(
        None, gt=0.0, description="clip each token's divergence at this value (no gradient from a clipped token); "
        "None: off",
    )
    backend: Literal["auto", "torch", "triton", "fused_linear"] = Field(
        "auto",
        description="divergence implementation: torch reference, Triton kernel, or fused lm_head + kernel in chunks; "
        "auto: triton on CUDA, torch on CPU (where Triton only runs interpreted) and for divergence=topk|sampled",
    )
    chunk_size: int = Field(1024, ge=1, description="fused_linear tokens per chunk")

    def resolved_backend(self, on_gpu: bool) -> str:
        if self.backend != "auto":
            return self.backend
        return "triton" if on_gpu and self.divergence not in ("topk", "sampled") else "torch"


class TrainConfig(_Section):
    mode: Literal["sdft", "sft", "dft"] = Field(
        "sdft",
        description="sdft; the sft baseline (NLL on the demonstrations); or the dft baseline (the official code's "
        "\"DFT\": sets teacher.kind=frozen and rollout.context=teacher, whatever the config says for them: the same "
        "loss on completions the frozen teacher samples with the demonstration in context)",
    )
    steps: int | None = Field(None, gt=0, description="optimizer steps; None: derived from epochs")
    epochs: float = Field(1.0, gt=0.0, description="passes over train when `steps` is not set")
    batch_size: int = Field(32, gt=0, description="prompts per optimizer step (effective batch)")
    micro_batch_size: int = Field(8, gt=0, description="sequences per forward/backward")
    micro_batch_tokens: int | None = Field(
        None, gt=0,
        description="micro-batches by a token budget instead of micro_batch_size: consecutive whole sequences whose "
        "student tokens (prompt + completion) sum to at most this (a longer one alone), as many micro-batches on every "
        "learner rank; the loss is the same per-sequence mean",
    )
    packing: bool = Field(
        False,
        description="the learner's forwards (student, teacher, SFT, KL to base) put a micro-batch's sequences in one "
        "row, position ids restarting per sequence, instead of right-padding each to the longest: no padding "
        "computed (metric pad_fraction); the same loss and gradients. On CUDA with flash-attn installed the learner "
        "then uses flash-attention 2 (variable-length)",
    )
    lr: float = Field(5e-5, gt=0.0, description="AdamW peak learning rate")
    lr_schedule: Literal["cosine", "constant"] = Field("cosine", description="learning-rate schedule after warm-up")
    warmup_steps: int = Field(10, ge=0, description="linear warm-up steps")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    grad_clip: float = Field(1.0, gt=0.0, description="gradient-norm clipping")
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="a step with a non-finite loss, IS weight or gradient: stop the run (nothing from it saved), or "
        f"skip its update (weights unchanged, the step logged with skipped=1; {MAX_CONSECUTIVE_SKIPS} in a row stop)",
    )
    on_collapse: Literal["stop", "warn"] = Field(
        "stop",
        description="a step whose loss and gradient norm are exactly 0 after steps where they were not (weights blown "
        "up into a constant output, e.g. a far too high train.lr), or whose parameter norm grew beyond "
        "train.max_param_growth: stop the run naming the last checkpoint, or warn",
    )
    max_param_growth: float | None = Field(
        10.0, gt=1.0,
        description="the parameters' norm (all of them, frozen ones included) may grow to this multiple of its value "
        "when the run (or resume) began; beyond it the run has collapsed (train.on_collapse). Fine-tuning moves it by "
        "a few percent; null: no bound",
    )
    zero_stage: Literal[0, 1, 2, 3] = Field(0, description="DeepSpeed ZeRO stage of the learner")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward of the student")
    seed: int = Field(0, description="seed of data order, sampling (engine i uses seed + i) and tiny models")

    @property
    def distills(self) -> bool:
        """sdft and dft sample completions and score them under the teacher; sft trains on the demonstrations."""
        return self.mode != "sft"

    @model_validator(mode="after")
    def _micro_divides(self):
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.batch_size ({self.batch_size}) must be a multiple of train.micro_batch_size "
                f"({self.micro_batch_size})"
            )
        return self


PAPER_SUITE = "paper"  # eval.lm_eval.tasks preset: the SDFT paper's six prior-capability benchmarks


class LmEvalConfig(_Section):
    tasks: list[str] = Field(
        default_factory=list,
        description="lm-evaluation-harness tasks run on the student through the vLLM engines: harness task or group "
        f"names, each optionally TASK:METRIC (the headline metric key), or the preset `{PAPER_SUITE}` (HellaSwag, MMLU, "
        "TruthfulQA mc1, Winogrande, HumanEval, IFEval with the paper's metric keys); empty: off",
    )
    include_path: str | None = Field(
        None, description="a folder of task YAMLs of your own, searched before the harness's tasks"
    )
    limit: float | None = Field(
        None, gt=0, description="examples per task: a count (>= 1) or a fraction (< 1); None: all"
    )
    every: int = Field(0, ge=0, description="steps between suite runs; 0: at the end of training only")
    before: bool = Field(True, description="also run it on the base weights before step 1 (the base row)")
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples; None: each task's own default")
    apply_chat_template: bool = Field(
        False, description="format the harness's prompts with the model's chat template (data.chat_template_kwargs)"
    )
    allow_code_execution: bool = Field(
        False, description="let tasks run the model's code (HumanEval); off unless you trust the sandbox"
    )

    @field_validator("limit")
    @classmethod
    def _whole_count(cls, v):
        if v is not None and v >= 1 and v != int(v):
            raise ValueError("a count of examples (>= 1) must be whole; a fraction must be below 1")
        return v


class EvalConfig(_Section):
    every: int = Field(0, ge=0, description="steps between evals; 0: only before and after training")
    max_new_tokens: int | None = Field(
        None, gt=0, description="greedy completion length at eval; None: rollout.max_new_tokens"
    )
    metric: str = Field(
        "exact_match", description='exact_match | regex | contains | tooluse | science (the official SDFT eval rules) | a '
        'callable "package.module:function"'
    )
    regex: str | None = Field(
        None, description="with metric=regex: group 1 (or the match) is compared to the reference"
    )
    sets: dict[str, str] = Field(
        default_factory=dict,
        description="named extra eval sets (name -> data source, same forms as data.train), scored with eval.metric "
        "and logged as `eval.<name>.accuracy` / `eval.<name>.exact_match`; e.g. the prior skills, to measure retention",
    )
    prior: list[str] = Field(
        default_factory=list, description="names in `sets` averaged into eval.prior_accuracy / prior_exact"
    )
    teacher: bool = Field(
        False, description="also score the eval set *with* its demonstration in context (teacher_accuracy)"
    )
    prior_metric: Literal["metric", "exact_match"] = Field(
        "metric",
        description="the headline prior-skill number of `sdft compare`: eval.metric (prior_accuracy) or exact "
        "match (prior_exact)",
    )
    size: int | None = Field(None, gt=0, description="cap on examples per named set")
    lm_eval: LmEvalConfig = Field(
        LmEvalConfig(), description="the prior-capability suite through lm-evaluation-harness (`lm_eval/*`)"
    )

    @model_validator(mode="after")
    def _prior_in_sets(self):
        missing = [n for n in self.prior if n not in self.sets]
        if missing:
            raise ValueError(f"eval.prior names {missing} that are not in eval.sets ({sorted(self.sets)})")
        return self


class MonitorConfig(_Section):
    enabled: bool = Field(
        False, description="measure forgetting live: every `every` steps the mean per-token KL(base || student) on "
        "the base model's own greedy answers to general prompts (monitor/kl_to_base, on learner rank 0) and the "
        "student's greedy accuracy on them (monitor/general_accuracy, eval.metric)",
    )
    data: list[str] = Field(
        default_factory=list,
        description="the general prompts: a data source or a list of them (same forms as eval.sets values; a row's "
        "answer, else its demonstration, is the reference of the accuracy); several sources are interleaved row by "
        "row before `size`",
    )
    size: int = Field(64, ge=1, description="cap on monitor prompts")
    every: int = Field(25, gt=0, description="steps between measurements (also at step 0 and after the last step)")
    max_kl: float | None = Field(
        None, gt=0.0, description="stop the run (after saving a checkpoint) when monitor/kl_to_base exceeds it; "
        "None: never",
    )

    @field_validator("data", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _has_data(self):
        if self.enabled and not self.data:
            raise ValueError("monitor.enabled needs monitor.data: general prompts the base model already handles, "
                             "e.g. the eval.prior sets")
        return self


class GateConfig(_Section):
    enabled: bool = Field(
        True, description="before step 1 (not with train.mode=sft, not on resume), check on `size` training rows "
        "that the base model answers better with the demonstration in context (teacher) than without (student), "
        "greedy, scored with eval.metric; logged as gate/teacher_accuracy, gate/student_accuracy, "
        "gate/teacher_student_kl",
    )
    size: int = Field(32, ge=1, description="training rows the gate scores (a seeded sample)")
    min_margin: float = Field(
        0.0, ge=0.0, lt=1.0, description="the teacher's accuracy must exceed the student's by more than this"
    )
    enforce: bool = Field(True, description="stop the run when the gate fails; false: report it and train anyway")


class CheckpointConfig(_Section):
    every: int = Field(0, ge=0, description="steps between checkpoints; 0: none before the end")
    keep_last: int = Field(2, ge=1, description="checkpoints kept in the output folder; older ones are deleted")
    final: bool = Field(True, description="write a checkpoint after the last step (false: only every `every` "
                        "steps, e.g. for benchmarks)")


class LoggingConfig(_Section):
    wandb: bool = Field(True, description="log to wandb; offline when WANDB_API_KEY is unset")
    project: str = Field("sdft", description="wandb project")
    run_name: str | None = Field(None, description="wandb run name; None: wandb picks one")
    progress: bool = Field(True, description="show a progress bar")


class RayConfig(_Section):
    address: str | None = Field(
        None, description="Ray cluster to join; None: join RAY_ADDRESS if set, else start a local instance"
    )
    num_cpus: int | None = Field(None, description="CPUs of the local instance (local instance only)")
    placement: Literal["disaggregated", "colocated"] = Field(
        "disaggregated",
        description="learner ranks and engines in bundles of their own, or learner rank i and engine i sharing "
        "one bundle (one GPU; the engine sleeps while the learner trains)",
    )
    learner_ranks: int = Field(
        1, ge=1, description="M DeepSpeed data-parallel ranks (one GPU each on GPU clusters)"
    )
    learner_cpus: float = Field(1.0, gt=0.0, description="CPUs per learner rank")
    rollout_cpus: float = Field(1.0, gt=0.0, description="CPUs per rollout engine")
    learner_threads: int | None = Field(
        None, ge=1, description="torch threads of each learner rank; None: learner_cpus, except on one CPU-only node "
        "in strict mode, where learner and engines take turns: then all the run's CPUs, split among the ranks. More "
        "threads than the cores left next to running engines (async): they wait passively (OMP_WAIT_POLICY)")
    rollout_threads: int | None = Field(
        None, ge=1, description="threads of each vLLM engine on CPU; None: rollout_cpus, or in strict mode on one "
        "CPU-only node all the run's CPUs, split among the engines")
    learner_resources: dict[str, float] = Field(
        default_factory=dict,
        description='extra Ray resources each learner bundle asks for, e.g. {"learner_node": 1} to pin the role to '
        "nodes",
    )
    rollout_resources: dict[str, float] = Field(
        default_factory=dict, description="extra Ray resources each rollout bundle asks for"
    )
    autoscaling: bool = Field(
        False, description="the cluster starts nodes on demand (Ray autoscaler, KubeRay): a bundle that no node holds "
        "now is waited for (ray.placement_timeout_s) instead of refused at once",
    )
    placement_timeout_s: float = Field(
        120.0, gt=0.0, description="how long the actors' bundles may wait for room on the cluster (with "
        "ray.autoscaling: long enough for new nodes to start)",
    )
    engine_max_restarts: int = Field(
        3, ge=0, description="a crashed rollout engine is restarted (up to this many times) and re-synced"
    )
    stall_timeout_s: float = Field(
        1800.0, ge=0.0, description="an engine whose call (generation, teacher scoring, a weight push, eval, the "
        "monitor, lm-eval) or a learner whose step or weight export makes no progress for this long is treated as dead "
        "(engine: killed, restarted, re-synced and asked again; learner: the run stops naming the last checkpoint), "
        "with a line on the console; 0: wait forever",
    )


class AsyncConfig(_Section):
    max_staleness: int = Field(
        0,
        ge=0,
        description="0: strict on-policy (generate, train, sync). k >= 1: generation runs up to k weight versions "
        "ahead of the learner, overlapping with its steps; the truncated IS weight corrects for the lag",
    )


class SyncConfig(_Section):
    backend: Literal["auto", "object_store", "nccl", "ipc"] = Field(
        "auto",
        description="weight path learner -> engines; auto: object_store on CPU, nccl (disaggregated) or ipc "
        "(colocated; nccl when ZeRO-3 spans several learner ranks) on GPU",
    )
    check_greedy: bool = Field(
        False, description="after every sync, assert vLLM greedy == learner greedy (debug)"
    )


class Config(_Section):
    output_dir: str = Field(
        "runs/default", description="where metrics.jsonl, checkpoints and logs go (`sdft train --output`)"
    )
    model: ModelConfig = Field(ModelConfig(), description="the model trained (student and teacher start from it)")
    data: DataConfig = Field(DataConfig(), description="training and eval data, and the teacher context")
    rollout: RolloutConfig = Field(RolloutConfig(), description="sampling from the student in the vLLM engines")
    teacher: TeacherConfig = Field(TeacherConfig(), description="which weights the teacher uses")
    loss: LossConfig = Field(LossConfig(), description="the per-token SDFT loss")
    train: TrainConfig = Field(TrainConfig(), description="optimizer, batch and the DeepSpeed learner")
    eval: EvalConfig = Field(EvalConfig(), description="greedy evaluation without demonstrations")
    monitor: MonitorConfig = Field(
        MonitorConfig(), description="live forgetting monitor: KL to the base model on general prompts"
    )
    gate: GateConfig = Field(GateConfig(), description="before step 1: does the demonstration help the model")
    checkpoint: CheckpointConfig = Field(CheckpointConfig(), description="checkpoints under the output folder")
    logging: LoggingConfig = Field(LoggingConfig(), description="wandb and the console")
    ray: RayConfig = Field(RayConfig(), description="the Ray cluster and actor placement")
    sync: SyncConfig = Field(SyncConfig(), description="pushing the student's weights to the engines")
    async_: AsyncConfig = Field(
        AsyncConfig(), alias="async", description="overlapping generation with learner steps"
    )

    @property
    def sequences_per_step(self) -> int:
        return self.train.batch_size * (self.rollout.samples_per_prompt if self.train.distills else 1)

    @property
    def engines_follow_student(self) -> bool:
        """False when the frozen teacher samples on its own context (dft): the engines keep the initial weights
        and get the student's only for eval (as the official code, which never syncs vLLM in that mode)."""
        return not (self.rollout.context == "teacher" and self.teacher.kind == "frozen")

    @property
    def teacher_on_engines(self) -> bool:
        """teacher.placement=engines, in SDFT (the sft baseline has no teacher; dft keeps the learner's)."""
        return self.teacher.placement == "engines" and self.train.mode == "sdft"

    @property
    def teacher_pool(self) -> bool:
        """Teacher engines of their own: full fine-tuning with a teacher the rollout engines do not hold."""
        return self.teacher_on_engines and not self.model.lora.enabled and self.teacher.kind != "live"

    @property
    def is_cap(self) -> float | None:
        """Truncation of the IS weight; None: no weight. Off for teacher-context rollouts (as the official code):
        the sampler there is not the student on its own context, so the ratio would measure the context gap."""
        return self.loss.is_cap if self.loss.is_correction and self.rollout.context == "student" else None

    @model_validator(mode="before")
    @classmethod
    def _dft_preset(cls, data):
        """train.mode=dft means teacher.kind=frozen and rollout.context=teacher, whatever the config says for them
        (`sdft compare` runs every method from one config)."""
        if not isinstance(data, dict) or (data.get("train") or {}).get("mode") != "dft":
            return data
        data = {**data}
        for section, key, value in (("teacher", "kind", "frozen"), ("rollout", "context", "teacher")):
            given = data.get(section) or {}
            data[section] = {**(given.model_dump() if isinstance(given, BaseModel) else given), key: value}
        return data

    @model_validator(mode="after")
    def _compatible(self):
        if self.model.lora.enabled and self.train.zero_stage == 3:
            raise ValueError("LoRA with train.zero_stage=3 is not supported; use 0 or 2")
        if self.model.lora.enabled and self.sync.backend in ("nccl", "ipc"):
            raise ValueError(f"model.lora pushes only the adapter, through the object store: sync.backend="
                             f"{self.sync.backend} does not apply; leave it at auto")
        if self.model.lora.enabled and self.loss.backend == "fused_linear" and "lm_head" in self.model.lora.target_modules:
            raise ValueError("loss.backend=fused_linear reads the lm_head weight itself, so an adapter on lm_head would be "
                             "left out: remove lm_head from model.lora.target_modules or use loss.backend=torch|triton")
        if self.loss.backend == "fused_linear" and self.train.zero_stage == 3:
            raise ValueError("loss.backend=fused_linear needs the full lm_head on each rank: use train.zero_stage <= 2")
        per_rank = self.ray.learner_ranks * self.train.micro_batch_size
        if self.sequences_per_step % per_rank:
            raise ValueError(
                f"{self.sequences_per_step} sequences per step (train.batch_size x rollout.samples_per_prompt) cannot "
                f"be split into {self.ray.learner_ranks} learner rank(s) x micro-batches of "
                f"{self.train.micro_batch_size}: adjust train.batch_size / train.micro_batch_size / ray.learner_ranks"
            )
        # Checked here, before Ray starts, rather than once every actor is up. auto picks nccl in this layout
        # (actors/weight_sync `resolve_backend`), so only an explicit ipc is refused.
        if self.sync.backend == "ipc" and self.train.zero_stage == 3 and self.ray.learner_ranks > 1:
            raise ValueError("sync.backend=ipc shares the whole model from rank 0's memory; with ZeRO-3 over several "
                             "ranks use sync.backend=nccl (bucketed gather) or train.zero_stage<=2")
        if self.sync.check_greedy and self.train.zero_stage == 3 and self.ray.learner_ranks > 1:
            raise ValueError("sync.check_greedy generates on learner rank 0 alone: not with ZeRO-3 over several ranks")
        if self.ray.placement == "colocated" and self.async_.max_staleness:
            raise ValueError("ray.placement=colocated shares each GPU between learner and engine, so nothing can "
                             "overlap: set async.max_staleness=0 or use ray.placement=disaggregated")
        if self.train.mode == "sft" and self.async_.max_staleness:
            raise ValueError("async.max_staleness applies to SDFT rollouts; SFT has none: set it to 0")
        if self.teacher_on_engines:
            self._engine_teacher()
        if self.loss.backend not in ("auto", "torch") and self.loss.divergence in ("topk", "sampled"):
            raise ValueError(f"loss.divergence={self.loss.divergence} is implemented in torch only: set loss.backend=torch")
        return self


    def _engine_teacher(self) -> None:
        """teacher.placement=engines: the engines return the teacher's top-k log-probs of the raw model, so the loss
        is the forward KL on the teacher's support, at temperature 1."""
        if self.loss.divergence != "forward_kl":
            raise ValueError(f"teacher.placement=engines scores the teacher's top-k only (vLLM cannot return log-probs "
                             f"at the student's tokens): loss.divergence={self.loss.divergence} needs the full "
                             "distributions; use loss.divergence=forward_kl or teacher.placement=learner")
        if self.loss.temperature != 1.0:
            raise ValueError("teacher.placement=engines: vLLM's prompt log-probs are at temperature 1, so "
                             f"loss.temperature={self.loss.temperature} cannot apply; set it to 1 or use "
                             "teacher.placement=learner")
        if self.loss.backend == "fused_linear":
            raise ValueError("teacher.placement=engines needs no teacher hidden states: use loss.backend=auto, torch "
                             "or triton")
        if self.rollout.context != "student":
            raise ValueError("teacher.placement=engines scores rollouts sampled on the student context: set "
                             "rollout.context=student")
        if self.model.lora.enabled and "lm_head" in self.model.lora.target_modules:
            raise ValueError("teacher.placement=engines: vLLM's prompt log-probs leave out an lm_head adapter (vLLM "
                             "issue #51594): remove lm_head from model.lora.target_modules or use teacher.placement=learner")


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


MAX_YAML_NODES = 100_000  # a config is hundreds of nodes; aliases that expand beyond this are a YAML bomb


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML keeps the last silently) and aliases that
    expand beyond MAX_YAML_NODES nodes (counted on the node graph, before anything is expanded)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one section (first on line {seen[key] + 1}); keep one",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None and _expanded_size(node, {}) > MAX_YAML_NODES:
            raise yaml.constructor.ConstructorError(
                None, None, f"its anchors and aliases expand to more than {MAX_YAML_NODES} nodes; write the values out",
                node.start_mark)
        return node


def _expanded_size(node, memo: dict) -> int:
    """Nodes of the document with every alias expanded, computed once per shared node (no expansion happens)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a cycle counts once
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(n, memo) for n in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    else:
        size = 1
    memo[id(node)] = min(size, MAX_YAML_NODES + 1)
    return memo[id(node)]


def _read_yaml(path: Path) -> dict:
    """The config file's top-level mapping; anything else is one line naming the file and what to fix."""
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist; give the path of a YAML file")
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; give the path of a YAML file (e.g. {path}/config.yaml)")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file (byte {e.start} is not UTF-8); give a YAML config") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"{where}: not valid YAML ({what})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections (model:, data:, train:, ...), "
                          f"got {type(raw).__name__}")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read YAML (default: DEFAULT_CONFIG, configs/toy.yaml), apply `a.b=value` overrides, validate."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    raw = _read_yaml(path)
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
