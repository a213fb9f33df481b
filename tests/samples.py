"""Learner input for the tests that drive a Learner directly: random prompts, demonstrations and completions over
the tiny model's vocabulary (ids 3..379), each completion ending in EOS."""

import torch

from actors.messages import Sample


def learner_samples(n: int = 4, logprob: float = -6.0) -> list[Sample]:
    """`n` samples whose rollout log-probs are all `logprob` (NaN makes the IS weight, and so the step, non-finite)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        x = torch.randint(3, 380, (4 + i,), generator=g).tolist()
        c = torch.randint(3, 380, (3,), generator=g).tolist()
        y = torch.randint(3, 380, (5 + i % 2,), generator=g).tolist() + [2]  # 2 = <|im_end|> (EOS)
        out.append(Sample(student_ids=x, completion_ids=y, teacher_ids=c + x, logprobs=[logprob] * len(y)))
    return out


def learner_metrics(ray, model: str, config: str, *overrides: str, steps: int = 2) -> list[dict]:
    """`steps` steps of a Learner actor on `learner_samples()` (the tiny model, `config` + `overrides`); their
    metrics. Step 2's loss is computed on the weights step 1 updated: equal losses mean equal gradients."""
    from actors.learner import Learner
    from actors.net import free_port
    from pipeline.config import load_config

    cfg = load_config(config, ["train.batch_size=4", "train.micro_batch_size=2", "train.lr=1e-2",
                               "train.warmup_steps=0", "loss.skip_first_tokens=1", *overrides])
    actor = ray.remote(Learner).options(num_cpus=1, runtime_env={"env_vars": {"TRITON_INTERPRET": "1"}}).remote(
        cfg, model, 10, master_port=free_port())
    try:
        return [ray.get(actor.step.remote(learner_samples())).as_dict() for _ in range(steps)]
    finally:
        ray.kill(actor)


def two_rank_steps(out, config: str, *overrides: str) -> list[dict]:
    """The step records of a 2-step run of `config` with two learner ranks (half a CPU each) and one engine."""
    import json

    from pipeline.config import load_config
    from pipeline.run.driver import train

    train(load_config(config, [f"output_dir={out}", "logging.progress=false", "logging.wandb=false", "train.steps=2",
                               "train.micro_batch_size=2", "train.lr=1e-2", "train.warmup_steps=0",
                               "rollout.max_new_tokens=12", "eval.every=0", "checkpoint.final=false",
                               "ray.learner_ranks=2", "ray.learner_cpus=0.5", *overrides]))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]
