"""Teacher-quality gate (`gate:`), before step 1: SDFT distills what the model does *with* the demonstration into
the model *without* it, so the first must be better. On a seeded sample of training rows the engines (still the
base weights) answer greedily with the demonstration in context (teacher) and without (student), scored like eval
(eval.metric against the row's reference); the learner gives the mean per-token KL(teacher || student) on the
student's answers. A teacher no better than the student by more than `gate.min_margin` stops the run."""

from __future__ import annotations

import random

from ..errors import TeacherGateFailed


def applies(cfg) -> bool:
    """On for distillation from the start; SFT has no teacher, and a resumed run passed the gate when it began."""
    return cfg.gate.enabled and cfg.train.mode != "sft"


def teacher_gate(actors, train_set: list, tokenizer, cfg) -> dict:
    """{"teacher_accuracy", "student_accuracy", "teacher_student_kl", "passed", "rows"} (logged as gate/...);
    prints the table. `enforce` decides what a failure means."""
    import ray

    from actors.rollout import generate_sharded

    from .evaluation import score_groups
    from .monitor import submit_learner_kl

    pick = random.Random(cfg.train.seed).sample(range(len(train_set)), min(cfg.gate.size, len(train_set)))
    rows = [train_set[i] for i in sorted(pick)]
    prompts, contexts = [ex.student_ids for ex in rows], [ex.teacher_ids for ex in rows]
    scored = score_groups(actors.engines, {"teacher": (contexts, rows), "student": (prompts, rows)}, tokenizer, cfg)
    max_new = cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens
    answers = generate_sharded(actors.engines, prompts, max_new_tokens=max_new, temperature=0.0,
                               stall_timeout_s=cfg.ray.stall_timeout_s)
    # Before step 1 every teacher kind is the base, so the learner's KL to the base behind the teacher context is
    # KL(teacher || student).
    kl = submit_learner_kl(actors, cfg, [(p, o.token_ids) for p, o in zip(prompts, answers)], base_contexts=contexts)
    teacher, student = scored["teacher"]["accuracy"], scored["student"]["accuracy"]
    result = {"teacher_accuracy": teacher, "student_accuracy": student, "teacher_student_kl": ray.get(kl),
              "passed": float(teacher > student + cfg.gate.min_margin), "rows": len(rows)}
    if cfg.logging.progress:
        print_gate(result, cfg)
    return result


def enforce(result: dict, cfg) -> None:
    """Stop a run whose teacher is no better than its student (unless gate.enforce is false)."""
    if result["passed"] or not cfg.gate.enforce:
        return
    raise TeacherGateFailed(
        f"teacher gate: with the demonstration in context the base model scores {result['teacher_accuracy']:.1%} "
        f"on {result['rows']} training rows, without it {result['student_accuracy']:.1%} (the teacher must be better "
        f"by more than gate.min_margin={cfg.gate.min_margin:g}): the model cannot use the demonstrations, so there "
        "is nothing to distill. Try a bigger model, a different data.teacher_template, or SFT (train.mode=sft)"
        + ("; no row was right either way, so also check that eval.metric can score these answers" if
           result["teacher_accuracy"] == result["student_accuracy"] == 0 else "")
        + "; set gate.enforce=false to train anyway.")


def print_gate(result: dict, cfg) -> None:
    from rich.console import Console
    from rich.table import Table

    verdict = ("[green]pass[/green]" if result["passed"]
               else "[red]FAIL[/red]" + ("" if cfg.gate.enforce else " (gate.enforce=false: training anyway)"))
    t = Table(title=f"teacher gate: {verdict} ({result['rows']} training rows, greedy)", title_justify="left")
    t.add_column("context")
    t.add_column("accuracy", justify="right")
    t.add_row("teacher (with the demonstration)", f"{100 * result['teacher_accuracy']:.1f} %")
    t.add_row("student (prompt only)", f"{100 * result['student_accuracy']:.1f} %")
    t.add_row("KL(teacher ‖ student) per token", f"{result['teacher_student_kl']:.4f}")
    Console(highlight=False).print(t)
