"""The weight path on CPU goes through vLLM's own weight-transfer API, as the GPU backends do: the engine's worker
holds sdft's object-store transfer engine (registered with vLLM's factory), and a push is exactly
start_weight_update → update_weights per bucket → finish_weight_update on it; vLLM's in-place reload restores the
base weights. Real Ray, vLLM (CPU) and DeepSpeed, the tiny model."""

from pathlib import Path

import pytest

from pipeline.config import load_config
from samples import learner_samples

SMOKE = str(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml")

pytestmark = pytest.mark.slow


def _record_transfer_calls(engine) -> list[str]:
    """Wrap the worker's transfer engine so that each call of the update lifecycle is recorded on the actor; returns
    the transfer engine's class name (one per worker)."""

    def patch(actor):
        actor.transfer_calls = calls = []

        def wrap(worker):
            transfer = worker.weight_transfer_engine
            for name in ("start_weight_update", "update_weights", "finish_weight_update"):
                def recorded(*args, _call=getattr(transfer, name), _name=name, **kwargs):
                    calls.append(_name)
                    return _call(*args, **kwargs)

                setattr(transfer, name, recorded)
            return type(transfer).__name__

        return actor.llm.collective_rpc(wrap)

    return engine.__ray_call__.remote(patch)


def test_cpu_push_runs_vllms_weight_transfer_lifecycle_and_restore_base_reloads(ray_session, tiny_model):
    from actors.launcher import launch

    cfg = load_config(SMOKE, ["train.batch_size=4", "train.micro_batch_size=2", "train.lr=2e-2",
                              "train.warmup_steps=0"])
    actors = launch(cfg, tiny_model, 10)
    try:
        engine, learner = actors.engines[0], actors.learner
        prompts = [s.student_ids for s in learner_samples()]

        def engine_greedy():
            outs = ray_session.get(engine.generate.remote(prompts, max_new_tokens=8, temperature=0.0))
            return [o.token_ids for o in outs]

        base = engine_greedy()
        assert ray_session.get(_record_transfer_calls(engine)) == ["ObjectStoreWeightTransferEngine"]
        for _ in range(3):  # enough for the student's greedy output to move
            assert ray_session.get(learner.step.remote(learner_samples())).finite()
        student = ray_session.get(learner.greedy.remote(prompts, 8))
        assert student != base

        stats = actors.sync.push(version=3)
        calls = ray_session.get(engine.__ray_call__.remote(lambda actor: list(actor.transfer_calls)))
        assert calls[0] == "start_weight_update" and calls[-1] == "finish_weight_update"
        assert len(calls) > 2 and set(calls[1:-1]) == {"update_weights"}
        assert stats["bytes"] > 0 and stats["load_s"] > 0
        assert engine_greedy() == student  # the engine now samples the learner's weights
        assert ray_session.get(engine.node.remote())["weight_version"] == 3

        actors.sync.restore_base()  # vLLM's in-place reload from model.path
        assert engine_greedy() == base
        assert ray_session.get(engine.node.remote())["weight_version"] == 0 and actors.sync.version == 0
    finally:
        actors.shutdown()
