"""Run by tests/test_two_hosts.py inside the head's network namespace: joins the two-host cluster (RAY_ADDRESS), trains
a few steps with a learner rank on each host and the engine on the worker, the greedy check after every sync, and
prints where each actor ran (the node's address) as JSON."""

import json
import sys

import ray

from pipeline.config import load_config
from pipeline.run.driver import train


def main(config: str, out: str) -> None:
    ray.init()  # RAY_ADDRESS: the head, on its namespace's address
    address = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    placed = {}

    def where(step, actors):
        placed["learners"] = [address[n["node_id"]] for n in ray.get([lr.node.remote() for lr in actors.learners])]
        placed["engines"] = [address[n["node_id"]] for n in ray.get([e.node.remote() for e in actors.engines])]

    try:
        cfg = load_config(config, [
            f"output_dir={out}", "train.steps=2", "train.batch_size=4", "train.micro_batch_size=1",
            "rollout.max_new_tokens=8", "data.eval_size=2", "eval.max_new_tokens=4", "logging.progress=false",
            "logging.wandb=false", "ray.learner_ranks=2", "ray.learner_resources={learner_slot: 1}",
            "ray.rollout_resources={worker: 1}", "sync.check_greedy=true",
        ])
        summary = train(cfg, on_step=where)
        print("RESULT " + json.dumps({**placed, "steps": summary["steps"], "checkpoint": summary["checkpoint"]}))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
