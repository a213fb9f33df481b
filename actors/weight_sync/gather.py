"""The learner's full weights, one bucket of parameters at a time, for the weight sync.

Under ZeRO-3 each rank holds a 1/world slice of every parameter. Gathering the whole model at
once (``GatheredParameters(module.parameters())``) costs a full extra copy of it on every rank.
Here the model is walked in buckets of at most ``bucket_bytes``: every rank gathers one bucket
(the gather is a collective, so all ranks must walk the same buckets in the same order), rank 0
sends or copies it, the bucket is re-partitioned, and the next one is gathered. Peak extra memory
is one bucket.

A receiver must size its buffers before anything is sent (vLLM's ``WeightSource.metadata()``), so
``full_shapes`` describes every tensor without gathering: a partitioned ZeRO-3 parameter has an
empty ``shape`` but keeps its full one in ``ds_shape``.

Names and order are those of ``module.state_dict()`` (the HF checkpoint names for a HF model,
non-persistent buffers such as Llama's ``rotary_emb.inv_freq`` left out), tied aliases included:
``lm_head.weight`` is sent even when it is ``model.embed_tokens.weight``, because vLLM's CPU worker
keeps a separately prepacked copy of the LM head that a reload without it would leave stale.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

NamedTensor = tuple[str, torch.Tensor]


def _entries(module: torch.nn.Module) -> list[NamedTensor]:
    """``state_dict()``'s tensors in its order. ``keep_vars=True`` returns the Parameter objects themselves
    (no gather, no copy; under ZeRO-3 still partitioned), so tied names share one object."""
    return list(module.state_dict(keep_vars=True).items())


def _full_shape(t: torch.Tensor) -> torch.Size:
    return getattr(t, "ds_shape", t.shape)  # ZeRO-3 parameters keep their full shape in ds_shape


def _out_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    # Only floating-point tensors are cast: an integer buffer (a step counter, an index) keeps its dtype.
    return dtype if dtype is not None and t.is_floating_point() else t.dtype


def hf_names(module: torch.nn.Module) -> list[str]:
    """Names of the tensors sent for ``module``: ``state_dict()``'s, in its order."""
    return [name for name, _ in _entries(module)]


def full_shapes(module: torch.nn.Module, dtype: torch.dtype | None = None) -> list[tuple[str, torch.dtype, tuple]]:
    """``(name, dtype, full shape)`` of every tensor ``iter_buckets`` yields, in its order, without
    gathering anything. Pass the same ``dtype`` as to ``iter_buckets`` if it casts."""
    return [(n, _out_dtype(t, dtype), tuple(_full_shape(t))) for n, t in _entries(module)]


def _plan(entries: list[NamedTensor], bucket_bytes: int, dtype: torch.dtype | None) -> list[list[NamedTensor]]:
    """Consecutive runs of ``entries`` of at most ``bucket_bytes`` each; a larger tensor stands alone.

    A tensor counts at the larger of its stored and its yielded element size, so a bucket stays
    under the limit both while gathered and once cast."""
    buckets: list[list[NamedTensor]] = []
    current: list[NamedTensor] = []
    size = 0
    for name, t in entries:
        nbytes = _full_shape(t).numel() * max(t.element_size(), _out_dtype(t, dtype).itemsize)
        if current and size + nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append((name, t))
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


def iter_buckets(module: torch.nn.Module, *, zero3: bool, bucket_bytes: int,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 ) -> Iterator[list[NamedTensor]]:
    """Yield the module's full tensors as lists of ``(name, tensor)``, in ``full_shapes`` order.

    Each list holds at most ``bucket_bytes`` (a single larger tensor forms its own list).

    Every rank must run this generator to the end, in step: under ZeRO-3 each bucket is gathered
    with ``deepspeed.zero.GatheredParameters(bucket, modifier_rank=None)``, a collective. Ranks
    that send nothing just drain it::

        for _ in iter_buckets(module, zero3=True, bucket_bytes=n):
            pass

    The yielded tensors are only valid until the generator is advanced: under ZeRO-3 the bucket is
    re-partitioned then, so the consumer must send or copy them first. They are the module's own
    storage (detached, not cloned) unless ``dtype`` (floating-point tensors only) or ``device``
    changes them, in which case ``.to`` makes a copy. Do not modify them in place.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    if zero3:
        import deepspeed
    for bucket in _plan(_entries(module), bucket_bytes, dtype):
        if zero3:
            # Buffers are not partitioned by ZeRO-3 (no ds_id); GatheredParameters skips them.
            # modifier_rank=None: nothing is written back, the bucket is simply re-partitioned on exit.
            # Tied names share one Parameter: gather each once.
            distinct = list({id(t): t for _, t in bucket}.values())
            gathered = deepspeed.zero.GatheredParameters(distinct, modifier_rank=None)
        else:
            gathered = contextlib.nullcontext()
        with gathered:
            # detach() keeps autograd out of the cast; .to() returns the same tensor if nothing changes.
            yield [(n, t.detach().to(device=device, dtype=_out_dtype(t, dtype))) for n, t in bucket]


def state_dict_copy(module: torch.nn.Module, *, zero3: bool, bucket_bytes: int,
                    dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                    ) -> dict[str, torch.Tensor] | None:
    """The full state dict (names as ``hf_names``) copied to ``device`` on rank 0; None elsewhere.

    Every rank must call it under ZeRO-3 (see ``iter_buckets``); rank 0 copies each bucket while
    it is gathered, so besides the copy the peak is one bucket."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    out: dict[str, torch.Tensor] | None = {} if rank == 0 else None
    for bucket in iter_buckets(module, zero3=zero3, bucket_bytes=bucket_bytes):
        if out is not None:
            for name, t in bucket:  # copy=True: without ZeRO-3 these are the live parameters
                out[name] = t.to(device=device, dtype=_out_dtype(t, dtype), copy=True)
    return out
