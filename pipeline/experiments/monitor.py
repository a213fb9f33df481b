"""Live forgetting monitor (`monitor:`): how far the student has moved from the base model where the base was
already competent.

At the start the engines (still the base) answer a fixed set of general prompts greedily, once; the answers are
kept in OUTPUT/monitor_base.json so a resumed run measures against the same ones. Every `monitor.every` steps:
`kl_to_base`, the mean per-token KL(base || student) on those (prompt, base answer) sequences, computed on the
learner, and `general_accuracy`, the current engines' greedy answers scored with eval.metric.

`actors.forward.token_kl_sum` is the one KL-to-base computation: the learner's `kl_to_base` (live, here) and
`sdft compare`'s `checkpoint_kl_to_base` (a saved checkpoint against the base) both use it.
"""

from __future__ import annotations

import json
import time
from itertools import zip_longest
from pathlib import Path

BASE_FILE = "monitor_base.json"

Sequences = list[tuple[list[int], list[int]]]  # (prompt ids, answer ids)


def submit_learner_kl(actors, cfg, sequences: Sequences, base_contexts: list[list[int]] | None = None):
    """`Learner.kl_to_base` on rank 0 alone (its ObjectRef); under ZeRO-3 every rank joins, since its forwards
    gather the parameters."""
    ranks = actors.learners if cfg.train.zero_stage == 3 else actors.learners[:1]
    return [lr.kl_to_base.remote(sequences, base_contexts) for lr in ranks][0]


class ForgettingMonitor:
    def __init__(self, cfg, tokenizer):
        """The general prompts, loaded and tokenized with the training data, before any learner starts (a bad source
        fails fast)."""
        from ..data import load_examples, tokenize_examples

        self.cfg, self.tokenizer = cfg, tokenizer
        sources = [load_examples(s, cfg.data) for s in cfg.monitor.data]
        self.rows = [ex for group in zip_longest(*sources) for ex in group if ex is not None][: cfg.monitor.size]
        tokenize_examples(self.rows, tokenizer, cfg)
        self.actors, self.sequences = None, []

    def start(self, actors, output_dir: Path, resume: bool) -> None:
        """The base answers: from OUTPUT/monitor_base.json when resuming, else from the engines, which must still
        hold the base weights (before the first push)."""
        from actors.rollout import generate_sharded

        self.actors = actors
        prompts = [ex.student_ids for ex in self.rows]
        path = output_dir / BASE_FILE
        saved = json.loads(path.read_text()) if resume and path.exists() else {}
        if saved.get("prompts") != prompts:  # a fresh run, or the monitor set changed
            max_new = self.cfg.eval.max_new_tokens or self.cfg.rollout.max_new_tokens
            outs = generate_sharded(actors.engines, prompts, max_new_tokens=max_new, temperature=0.0,
                                   stall_timeout_s=self.cfg.ray.stall_timeout_s)
            saved = {"prompts": prompts, "answers": [o.token_ids for o in outs]}
            path.write_text(json.dumps(saved))
        self.sequences = list(zip(prompts, saved["answers"]))

    def due(self, step: int, last_step: int) -> bool:
        return step % self.cfg.monitor.every == 0 or step == last_step

    def measure(self) -> dict:
        """{"kl_to_base", "general_accuracy"} of the learner's and the engines' current weights, and the seconds
        it took (what the monitor costs the run)."""
        import ray

        from .evaluation import score_groups

        t0 = time.perf_counter()
        kl = submit_learner_kl(self.actors, self.cfg, self.sequences)  # the learner works while the engines generate
        scored = score_groups(self.actors.engines, {"monitor": ([ex.student_ids for ex in self.rows], self.rows)},
                        self.tokenizer, self.cfg)
        return {"kl_to_base": ray.get(kl), "general_accuracy": scored["monitor"]["accuracy"],
                "seconds": time.perf_counter() - t0}

    def over_limit(self, record: dict) -> bool:
        limit = self.cfg.monitor.max_kl
        return limit is not None and "monitor" in record and record["monitor"]["kl_to_base"] > limit

    def stop_message(self, step: int, record: dict, checkpoint: str) -> str:
        kl = record["monitor"]["kl_to_base"]
        return (f"forgetting limit: after step {step} the mean per-token KL to the base model on the monitor's "
                f"general prompts is {kl:.4g} > monitor.max_kl={self.cfg.monitor.max_kl:g}; checkpoint {checkpoint}. "
                "Lower train.lr or add replay of prior-skill data, or raise monitor.max_kl and continue with "
                "`sdft train ... --resume`.")
