"""Bucketed weight gathering (actors/weight_sync/gather.py) on real DeepSpeed, CPU + gloo.

Two ranks run ZeRO-3: rank 0 broadcasts each gathered bucket tensor by tensor while rank 1, which
joins every gather, receives into buffers sized from `full_shapes` only, as a rollout engine would.
Both ranks run this file as a script (`python tests/test_gather.py zero3 RANK 2 PORT OUT`) and
save what they saw; the tests compare it with an identical model that never saw DeepSpeed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from actors.net import free_port

ROOT = Path(__file__).resolve().parent.parent
SMALL = 6000  # bytes: several buckets, and the 8 KiB embedding / MLP matrices stand alone
HUGE = 1 << 40  # everything in one bucket


def _tiny_llama(tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # every rank and the reference build the same weights
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ---- the ranks (run as a script) -------------------------------------------------------------------------
def _engine_module(stage: int, rank: int, world: int, port: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    model = _tiny_llama()
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0  # else these tiny tensors would never be partitioned
    config = {  # the shape of Learner._ds_config
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    return engine.module


def _zero3_rank(rank: int, world: int, port: int, out: Path) -> None:
    import torch.distributed as dist
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from actors.weight_sync.gather import full_shapes, iter_buckets, state_dict_copy

    module = _engine_module(3, rank, world, port)
    params = dict(module.named_parameters())

    def partitioned() -> bool:  # every parameter back to its 1/world slice, the full tensor freed
        return all(p.numel() == 0 and p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in params.values())

    param_name = {id(p): n for n, p in params.items()}  # a tied alias maps to its parameter's name
    canon = {n: param_name[id(t)] for n, t in module.state_dict(keep_vars=True).items() if id(t) in param_name}
    res = {"partitioned_before": partitioned(), "meta": full_shapes(module), "runs": {}, "canon": canon}
    meta = res["meta"]
    for bucket_bytes in (SMALL, HUGE):
        buffers = [torch.empty(shape, dtype=dtype) for _, dtype, shape in meta]  # what a receiver knows up front
        i, buckets = 0, []
        for bucket in iter_buckets(module, zero3=True, bucket_bytes=bucket_bytes):
            gathered = sorted(n for n, p in params.items() if p.ds_status == ZeroParamStatus.AVAILABLE)
            buckets.append({"names": [n for n, _ in bucket], "gathered": gathered,
                            "shapes": [(t.dtype, tuple(t.shape)) for _, t in bucket],
                            "bytes": [_nbytes(t) for _, t in bucket]})
            for _, t in bucket:  # rank 0 sends inside the gather; rank 1 receives in metadata order
                if rank == 0:
                    dist.broadcast(t.contiguous(), src=0)
                else:
                    dist.broadcast(buffers[i], src=0)
                i += 1
        received = {name: buf for (name, _, _), buf in zip(meta, buffers)} if rank == 1 else None
        res["runs"][bucket_bytes] = {"buckets": buckets, "received": received, "sent": i}
    res["partitioned_after"] = partitioned()
    res["copy"] = state_dict_copy(module, zero3=True, bucket_bytes=SMALL)
    res["copy_bf16"] = state_dict_copy(module, zero3=True, bucket_bytes=SMALL, dtype=torch.bfloat16)
    res["partitioned_end"] = partitioned()
    torch.save(res, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _zero0_rank(rank: int, world: int, port: int, out: Path) -> None:
    import torch.distributed as dist

    from actors.weight_sync.gather import iter_buckets, state_dict_copy

    module = _engine_module(0, rank, world, port)
    ptrs = {n: p.data_ptr() for n, p in module.state_dict(keep_vars=True).items()}
    same = [(n, t.data_ptr() == ptrs[n]) for b in iter_buckets(module, zero3=False, bucket_bytes=SMALL) for n, t in b]
    cast = [(n, t.dtype, t.data_ptr() == ptrs[n])
            for b in iter_buckets(module, zero3=False, bucket_bytes=SMALL, dtype=torch.float64) for n, t in b]
    copy = state_dict_copy(module, zero3=False, bucket_bytes=SMALL)
    res = {"same": same, "cast": cast, "copy": copy,
           "copy_shares": [t.data_ptr() in ptrs.values() for t in copy.values()]}
    torch.save(res, out / f"rank{rank}.pt")
    dist.destroy_process_group()


# ---- the tests -------------------------------------------------------------------------------------------
def _launch(jobs: dict[str, int], out: Path) -> dict[str, list[dict]]:
    """Run every job (mode -> number of ranks of this file) at once, each its own process group; every
    process is reaped, also on failure or timeout. Returns what each rank saved, per mode."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = []  # (mode, rank, process, log)
    try:
        for mode, world in jobs.items():
            (out / mode).mkdir(parents=True)
            port = free_port("127.0.0.1")
            for rank in range(world):
                log = open(out / mode / f"rank{rank}.log", "w")
                procs.append((mode, rank, log, subprocess.Popen(
                    [sys.executable, __file__, mode, str(rank), str(world), str(port), str(out / mode)],
                    cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)))
        for *_, p in procs:
            p.wait(timeout=180)
    finally:
        for _, _, log, p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    failed = [f"{mode} rank {rank} (exit {p.returncode}):\n{(out / mode / f'rank{rank}.log').read_text()[-3000:]}"
              for mode, rank, _, p in procs if p.returncode != 0]
    assert not failed, "\n\n".join(failed)  # every failed rank: the first error is often on the peer
    return {mode: [torch.load(out / mode / f"rank{r}.pt", weights_only=False) for r in range(world)]
            for mode, world in jobs.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The two-rank ZeRO-3 job and the one-rank ZeRO-0 job, run side by side."""
    return _launch({"zero3": 2, "zero0": 1}, tmp_path_factory.mktemp("gather"))


@pytest.fixture(scope="module")
def reference():
    """Full state dict of the same model without DeepSpeed."""
    return _tiny_llama().state_dict()


@pytest.fixture(scope="module")
def zero3(runs):
    return runs["zero3"]


def _assert_equal(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_names_and_metadata_without_deepspeed(reference):
    from actors.weight_sync.gather import full_shapes, hf_names

    model = _tiny_llama()
    names = hf_names(model)
    assert names == list(reference) and "lm_head.weight" in names  # tied, but vLLM's CPU worker needs it too
    assert not any("rotary_emb" in n for n in names)  # non-persistent buffer, not in state_dict
    assert full_shapes(model) == [(n, t.dtype, tuple(t.shape)) for n, t in reference.items()]
    assert [d for _, d, _ in full_shapes(model, torch.bfloat16)] == [torch.bfloat16] * len(names)

    untied = _tiny_llama(tie=False)
    assert hf_names(untied) == list(untied.state_dict()) and hf_names(untied)[-1] == "lm_head.weight"


def test_buckets_without_deepspeed(reference):
    from actors.weight_sync.gather import iter_buckets, state_dict_copy

    model = _tiny_llama()
    buckets = list(iter_buckets(model, zero3=False, bucket_bytes=SMALL))
    assert len(buckets) > 3
    assert all(sum(_nbytes(t) for _, t in b) <= SMALL or len(b) == 1 for b in buckets)
    assert any(len(b) == 1 and _nbytes(b[0][1]) > SMALL for b in buckets)  # the oversized ones stand alone
    params = model.state_dict(keep_vars=True)
    assert all(t.data_ptr() == params[n].data_ptr() and not t.requires_grad for b in buckets for n, t in b)
    with pytest.raises(ValueError):
        next(iter_buckets(model, zero3=False, bucket_bytes=0))

    sd = state_dict_copy(model, zero3=False, bucket_bytes=SMALL, dtype=torch.bfloat16)  # no process group: rank 0
    _assert_equal(sd, {k: v.to(torch.bfloat16) for k, v in reference.items()})


def test_zero3_metadata_without_gathering(zero3, reference):
    want = [(n, t.dtype, tuple(t.shape)) for n, t in reference.items()]
    for res in zero3:
        assert res["partitioned_before"]  # full_shapes ran on partitioned parameters
        assert res["meta"] == want


@pytest.mark.parametrize("bucket_bytes", [SMALL, HUGE])
def test_zero3_fake_receiver(zero3, reference, bucket_bytes):
    rank0, rank1 = (res["runs"][bucket_bytes] for res in zero3)
    names = [n for n, _, _ in zero3[0]["meta"]]
    buckets = rank0["buckets"]
    assert buckets == rank1["buckets"]  # both ranks walked the same buckets: the gathers line up
    assert len(buckets) == 1 if bucket_bytes == HUGE else len(buckets) > 3
    assert [n for b in buckets for n in b["names"]] == names
    for b in buckets:
        assert sum(b["bytes"]) <= bucket_bytes or len(b["names"]) == 1
        # exactly this bucket is full while it is yielded (a tied alias is the parameter under its first name)
        assert b["gathered"] == sorted({zero3[0]["canon"][n] for n in b["names"] if n in zero3[0]["canon"]})
        assert b["shapes"] == [(d, s) for n, d, s in zero3[0]["meta"] if n in b["names"]]
    assert rank0["sent"] == rank1["sent"] == len(names)
    _assert_equal(rank1["received"], reference)


def test_zero3_state_dict_copy(zero3, reference):
    rank0, rank1 = zero3
    _assert_equal(rank0["copy"], reference)
    _assert_equal(rank0["copy_bf16"], {k: v.to(torch.bfloat16) for k, v in reference.items()})
    assert rank1["copy"] is None and rank1["copy_bf16"] is None
    assert all(res["partitioned_after"] and res["partitioned_end"] for res in zero3)  # nothing left gathered


def test_zero0_yields_parameters_without_copy(runs, reference):
    (res,) = runs["zero0"]
    assert res["same"] and all(same for _, same in res["same"])  # no cast: the parameters' own storage
    assert all(d == torch.float64 and not same for _, d, same in res["cast"])  # a cast copies
    _assert_equal(res["copy"], reference)
    assert not any(res["copy_shares"])  # state_dict_copy always copies


if __name__ == "__main__":
    mode, rank, world, port, out = sys.argv[1:]
    {"zero3": _zero3_rank, "zero0": _zero0_rank}[mode](int(rank), int(world), int(port), Path(out))
