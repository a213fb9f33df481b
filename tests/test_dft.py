"""Teacher-context rollouts and the DFT baseline (the official code's generate_from_teacher with a fixed teacher)."""

from pathlib import Path

import pytest
import torch

from pipeline.config import load_config

SMOKE = str(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml")  # the tiny-model smoke config


def _cfg(*overrides):
    return load_config(SMOKE, ["logging.progress=false", "train.batch_size=4", "train.micro_batch_size=2",
                               "rollout.max_new_tokens=12", "eval.max_new_tokens=8", *overrides])


def test_dft_preset_is_a_frozen_teacher_sampling_on_its_own_context():
    cfg = _cfg("train.mode=dft")
    assert (cfg.teacher.kind, cfg.rollout.context) == ("frozen", "teacher")
    assert cfg.train.distills and not cfg.engines_follow_student
    assert cfg.is_cap is None  # the sampler is the teacher's context: no IS weight, as the official code
    sdft = _cfg()
    assert sdft.engines_follow_student and sdft.is_cap == sdft.loss.is_cap
    ema = _cfg("rollout.context=teacher")  # the student samples on the teacher context: engines follow it
    assert ema.engines_follow_student and ema.is_cap is None


def test_dft_preset_overrides_the_configs_teacher():
    # compare runs every method from one config, which names the SDFT teacher (ema)
    cfg = _cfg("train.mode=dft", "teacher.kind=ema", "rollout.context=student")
    assert (cfg.teacher.kind, cfg.rollout.context) == ("frozen", "teacher")
    assert load_config(SMOKE).teacher.kind == "ema"


def _reference_loss(model_dir: str, samples, skip: int) -> float:
    """float64: per sequence the token mean of KL(teacher || student) over the loss mask, then the batch mean;
    the teacher is the initial model on the teacher context, no IS weight."""
    from transformers import AutoModelForCausalLM

    from kernels.reference import forward_kl

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()

    def logits(prompt, y):
        seq = torch.tensor([prompt + y])
        return model(seq).logits[0, len(prompt) - 1:-1]

    per_seq = []
    with torch.no_grad():
        for s in samples:
            kl = forward_kl(logits(s.student_ids, s.completion_ids), logits(s.teacher_ids, s.completion_ids))
            per_seq.append(kl[skip:].mean())
    return float(torch.stack(per_seq).mean())


@pytest.mark.slow
def test_dft_loss_equals_a_float64_reference(ray_session, tiny_model):
    from actors.learner import Learner
    from actors.net import free_port

    from samples import learner_samples

    samples = learner_samples()  # sampling logprobs far below the learner's: an IS weight would double the loss

    def first_loss(*overrides):
        cfg = _cfg("train.lr=1e-2", "train.warmup_steps=0", "loss.skip_first_tokens=1", *overrides)
        actor = ray_session.remote(Learner).options(num_cpus=1).remote(cfg, tiny_model, 10,
                                                                      master_port=free_port())
        try:
            return ray_session.get(actor.step.remote(samples)).as_dict()
        finally:
            ray_session.kill(actor)

    dft = first_loss("train.mode=dft")
    want = _reference_loss(tiny_model, samples, skip=1)
    assert dft["loss"] == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert dft["is_weight_mean"] == 1.0
    # the same batch as SDFT with a frozen teacher applies the IS weight: the reference above would not hold
    sdft = first_loss("train.mode=sdft", "teacher.kind=frozen")
    assert sdft["loss"] != pytest.approx(want, rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_dft_samples_on_the_teacher_context_and_eval_sees_the_student(ray_session, tiny_model, tmp_path, lora):
    from actors.launcher import launch
    from pipeline.data import batch_indices, load_splits
    from pipeline.run.driver import check_sync
    from pipeline.run.rollouts import Rollouts, sample_seeds
    from transformers import AutoTokenizer

    cfg = _cfg("train.mode=dft", f"output_dir={tmp_path}", "train.lr=5e-2", "train.warmup_steps=0",
               "train.grad_clip=100", *(["model.lora.r=8", "train.lr=2e-1"] if lora else []))
    tok = AutoTokenizer.from_pretrained(tiny_model)
    train_set, _ = load_splits(cfg, tok)
    batch = lambda step: [train_set[i] for i in batch_indices(step, 4, len(train_set), 0, True)]  # noqa: E731
    actors = launch(cfg, tiny_model, 10)
    try:
        engine, rollouts = actors.engines[0], Rollouts(actors, cfg, batch, 10)
        prompts = [ex.student_ids for ex in train_set[:4]]
        greedy = lambda: [o.token_ids for o in ray_session.get(  # noqa: E731
            engine.generate.remote(prompts, max_new_tokens=8, temperature=0.0))]
        base = greedy()

        samples, stats = rollouts.take(0)
        # the completions are the engine's samples on the teacher context, with the step's seeds
        regen = ray_session.get(engine.generate.remote(
            [ex.teacher_ids for ex in batch(0)], seeds=sample_seeds(cfg.train.seed, 0, 4), max_new_tokens=12,
            temperature=1.0))
        assert [s.completion_ids for s in samples] == [o.token_ids for o in regen]
        assert [s.student_ids for s in samples] == [ex.student_ids for ex in batch(0)]
        assert stats["staleness_max"] == 0

        for step in range(3):  # the learner moves; the engines are not synced (the frozen teacher samples)
            ray_session.get(actors.learner.step.remote(rollouts.take(step)[0] if step else samples))
        assert ray_session.get(engine.node.remote())["weight_version"] == 0 and greedy() == base
        learner_greedy = ray_session.get(actors.learner.greedy.remote(prompts, 8))
        assert learner_greedy != base  # the student moved, so the checks below can tell the two apart

        with rollouts.student_weights(version=3):  # eval sees the student ...
            assert check_sync(actors, train_set, n=4, max_new_tokens=8) == 1.0
        assert greedy() == base  # ... and the engines sample as the initial model again afterwards
        assert ray_session.get(engine.node.remote())["weight_version"] == 0
    finally:
        actors.shutdown()
