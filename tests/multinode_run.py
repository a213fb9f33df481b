"""Run by tests/test_multinode.py in its own process: a 3-node Ray cluster on this machine (head + a
"learner" node + a "rollout" node, told apart by custom resources), a short run across it, and where each
actor landed, printed as JSON."""

import json
import os
import sys

# Keep every address on loopback: without this Ray rewrites 127.0.0.1 to the host's address when connecting.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.run.driver import train  # noqa: E402


def main(config: str, out: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1",
                                                             "include_dashboard": False,
                                                             "dashboard_port": 0})
    learner_node = cluster.add_node(num_cpus=1, resources={"learner_node": 1}, node_ip_address="127.0.0.1")
    rollout_node = cluster.add_node(num_cpus=1, resources={"rollout_node": 1}, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    placed = {}

    def where(step, actors):
        placed["learners"] = [n["node_id"] for n in ray.get([lr.node.remote() for lr in actors.learners])]
        placed["engines"] = [n["node_id"] for n in ray.get([e.node.remote() for e in actors.engines])]

    try:
        cfg = load_config(config, [
            f"output_dir={out}", "train.steps=2", "train.batch_size=4", "train.micro_batch_size=2",
            "rollout.max_new_tokens=8", "data.eval_size=2", "eval.max_new_tokens=4", "logging.progress=false",
            "ray.learner_resources={learner_node: 1}", "ray.rollout_resources={rollout_node: 1}",
        ])
        summary = train(cfg, on_step=where)
        print("RESULT " + json.dumps({
            **placed, "learner_node": learner_node.node_id, "rollout_node": rollout_node.node_id,
            "head_node": cluster.head_node.node_id, "steps": summary["steps"], "checkpoint": summary["checkpoint"],
        }))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
