"""Scale-out on one machine: several learner ranks and engines in placement groups, async rollouts,
rollout-engine crashes, learner failures."""

import json
import os
import signal
from pathlib import Path

import pytest
import ray

from pipeline.config import load_config
from pipeline.driver import LearnerFailed, train

pytestmark = pytest.mark.slow

BASE = ["logging.progress=false", "train.batch_size=4", "train.micro_batch_size=2", "rollout.max_new_tokens=10",
        "eval.max_new_tokens=6", "data.eval_size=4", "train.lr=1e-2", "train.warmup_steps=0"]


SMOKE = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"  # tiny random model


def _cfg(out, *overrides):
    return load_config(SMOKE, [f"output_dir={out}", *BASE, *overrides])


def _records(out) -> list[dict]:
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _losses(out) -> list[float]:
    return [r["loss"] for r in _records(out) if "loss" in r]


def _threads(actors) -> dict[str, list]:
    """OMP_NUM_THREADS, MKL_NUM_THREADS, OMP_WAIT_POLICY and torch's thread count inside each learner rank and
    engine."""
    probe = lambda self: [os.environ["OMP_NUM_THREADS"], os.environ["MKL_NUM_THREADS"],  # noqa: E731
                          os.environ.get("OMP_WAIT_POLICY"), __import__("torch").get_num_threads()]
    return {role: ray.get([a.__ray_call__.remote(probe) for a in group])
            for role, group in (("learners", actors.learners), ("engines", actors.engines))}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, ray_session):
    """1 learner rank, 1 engine, strict on-policy: what the other layouts must reproduce. Also records the actors'
    thread counts (threads.json)."""
    out = tmp_path_factory.mktemp("reference")
    threads = {}
    train(_cfg(out, "train.steps=3", "train.zero_stage=2"), on_step=lambda step, actors: threads.update(_threads(actors)))
    (out / "threads.json").write_text(json.dumps(threads))
    return out


def test_cpu_threads_per_phase(reference_run):
    """Strict mode on one CPU-only node: learner and engine take turns, so each runs on both of the instance's 2
    CPUs, in OpenMP's and in MKL's pool (the async test checks the layout when they overlap)."""
    threads = json.loads((reference_run / "threads.json").read_text())
    assert threads == {"learners": [["2", "2", None, 2]], "engines": [["2", "2", None, 2]]}


def test_two_learner_ranks_two_engines_match_one_of_each(tmp_path, reference_run):
    where = {}

    def record_nodes(step, actors):
        where["learners"] = ray.get([lr.node.remote() for lr in actors.learners])
        where["engines"] = ray.get([e.node.remote() for e in actors.engines])
        where["pgs"] = [pg.id.hex() for pg in actors.placement_groups]

    cfg = _cfg(tmp_path, "train.steps=3", "train.zero_stage=2", "ray.learner_ranks=2", "rollout.num_engines=2",
               "ray.learner_cpus=0.5", "ray.rollout_cpus=0.5", "sync.check_greedy=true")
    train(cfg, on_step=record_nodes)
    assert [lr["rank"] for lr in where["learners"]] == [0, 1] and len(where["engines"]) == 2
    assert len({p["pid"] for p in where["learners"] + where["engines"]}) == 4  # four processes
    assert len(where["pgs"]) == 2  # disaggregated: a placement group per role
    # Data parallel over 2 ranks + rollouts over 2 engines = the same optimisation as 1 + 1.
    assert _losses(tmp_path) == pytest.approx(_losses(reference_run), rel=1e-4)
    assert all(r["sync"]["greedy_match"] == 1.0 for r in _records(tmp_path)[1:])


def test_lora_over_two_learner_ranks_keeps_the_ranks_in_step(tmp_path, ray_session):
    prompts = [[1, 87, 85, 263, 201], [1, 40, 41, 42]]
    per_step = []

    def both_ranks(step, actors):
        per_step.append(ray.get([lr.greedy.remote(prompts, 6) for lr in actors.learners]))

    cfg = _cfg(tmp_path, "train.steps=3", "train.zero_stage=2", "model.lora.r=8", "train.lr=5e-2",
               "ray.learner_ranks=2", "ray.learner_cpus=0.5", "sync.check_greedy=true")
    train(cfg, on_step=both_ranks)
    assert all(rank0 == rank1 for rank0, rank1 in per_step)  # data parallel: one adapter on both ranks
    assert all(r["sync"]["greedy_match"] == 1.0 for r in _records(tmp_path)[1:])  # and it is what vLLM serves
    assert len(set(_losses(tmp_path))) == 3


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_async_rollouts_bounded_staleness(tmp_path, ray_session, lora):
    threads = {}
    train(_cfg(tmp_path, "train.steps=4", "async.max_staleness=1", *(["model.lora.r=8", "train.lr=5e-2"] if lora else [])),
          on_step=lambda step, actors: threads.update(_threads(actors)))
    # they overlap: the engine keeps its CPU, the learner has both and yields while the engine generates
    assert threads == {"learners": [["2", "2", "PASSIVE", 2]], "engines": [["1", "1", None, 1]]}
    records = [r for r in _records(tmp_path) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    # step 1 is generated by version 0 = the learner's; later steps one version behind
    assert [r["rollout"]["staleness_max"] for r in records] == [0, 1, 1, 1]
    # the truncated IS weight sees the lag: off 1 once samples are stale (the learner moved at lr 1e-2)
    assert abs(records[0]["is_weight_mean"] - 1) < 1e-3
    assert any(abs(r["is_weight_mean"] - 1) > 1e-3 for r in records[1:])
    for r in records:
        assert 0 <= r["idle"]["learner"] <= 1 and 0 <= r["idle"]["rollout"] <= 1
        assert r["rollout"]["tokens_per_s"] > 0 and r["learner_tokens_per_s"] > 0
    # The push of version j overlaps the learner's step j + 1: each record carries the push that finished during
    # it (none during step 1: version 0 was loaded before the loop).
    assert records[0]["sync"] == {}
    for r in records[1:]:
        assert r["sync"]["bytes"] > 0 and r["sync"]["transport_s"] > 0 and r["sync"]["load_s"] > 0
    if not lora:
        # Full weights: the export of version j runs next to step j + 1, whose update waits for it. Pushes that block
        # instead (sync.check_greedy: each push loads, then the engines' greedy output is compared with the
        # learner's) give the engines the same versions at the same points: the same samples, the same losses.
        blocking = tmp_path / "blocking"
        train(_cfg(blocking, "train.steps=4", "async.max_staleness=1", "sync.check_greedy=true"))
        assert _losses(blocking) == [r["loss"] for r in records]
        assert all(r["sync"]["greedy_match"] == 1.0 for r in _records(blocking) if "loss" in r)


def test_killed_rollout_engine_is_restarted_and_resynced(tmp_path, reference_run):
    killed = []

    def kill_engine(step, actors):
        if step == 1:
            pid = ray.get(actors.engines[0].node.remote())["pid"]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    train(_cfg(tmp_path, "train.steps=3", "train.zero_stage=2", "sync.check_greedy=true"), on_step=kill_engine)
    records = [r for r in _records(tmp_path) if "loss" in r]
    assert killed and [r["step"] for r in records] == [1, 2, 3]  # no step lost or repeated
    assert records[-1]["rollout"]["engine_restarts"] >= 1
    assert all(r["sync"]["greedy_match"] == 1.0 for r in records)  # the restarted engine holds current weights
    # same seeds, same weights: the retried rollouts are the ones the uninterrupted run drew
    assert _losses(tmp_path) == pytest.approx(_losses(reference_run), rel=1e-4)


def test_learner_failure_ends_run_with_message_and_checkpoint(tmp_path, ray_session):
    def kill_learner(step, actors):
        if step == 2:
            os.kill(ray.get(actors.learner.node.remote())["pid"], signal.SIGKILL)

    with pytest.raises(LearnerFailed, match=r"step 3 .*step_000002.*--resume"):
        train(_cfg(tmp_path, "train.steps=4", "checkpoint.every=2"), on_step=kill_learner)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "step_000002" / "model")  # usable


def test_colocated_placement_shares_bundles(tmp_path, reference_run):
    groups = {}

    def record(step, actors):
        groups["n"] = len(actors.placement_groups)
        groups["bundles"] = actors.placement_groups[0].bundle_count

    train(_cfg(tmp_path, "train.steps=3", "train.zero_stage=2", "ray.placement=colocated", "ray.learner_cpus=0.5",
               "ray.rollout_cpus=0.5"), on_step=record)
    assert groups == {"n": 1, "bundles": 1}  # learner rank 0 and engine 0 share one bundle
    assert _losses(tmp_path) == pytest.approx(_losses(reference_run), rel=1e-4)
