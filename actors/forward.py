"""Model forwards aligned on completion tokens: the rows that predict y_t given context ⊕ y_<t.

Student and teacher score the same completion y behind different contexts (x, or teacher_ctx(x, c)); these
helpers return one row per completion token, flattened over the micro-batch, so the two line up row for row.
"""

from __future__ import annotations

from typing import Callable

import torch

from kernels.reference import forward_kl

from .loss import token_logprobs


def _pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def _sequences(contexts, completions) -> list[list[int]]:
    """context ⊕ completion[:-1]: position len(context)-1+t predicts completion token t."""
    return [c + y[:-1] for c, y in zip(contexts, completions)]


def _packed(contexts, completions, device) -> tuple[dict, torch.Tensor]:
    """Every sequence of the micro-batch in one row, no padding: `position_ids` restart at each sequence, which
    transformers turns into a block-diagonal causal mask (sdpa/eager; flash-attention's varlen path on GPU). Returns
    the model's inputs and the flat positions that predict the completion tokens, in order."""
    seqs = _sequences(contexts, completions)
    ids = torch.tensor([[t for s in seqs for t in s]], device=device)
    positions = torch.tensor([[p for s in seqs for p in range(len(s))]], device=device)
    starts = [0]
    for s in seqs[:-1]:
        starts.append(starts[-1] + len(s))
    keep = torch.tensor([start + len(c) - 1 + t for start, c, y in zip(starts, contexts, completions)
                         for t in range(len(y))], device=device)
    return {"input_ids": ids, "position_ids": positions, "use_cache": False}, keep


def attention_kwargs(packed: bool, on_gpu: bool) -> dict:
    """`from_pretrained` kwargs for the learner's models: flash-attention 2 where packed forwards run on a GPU with
    flash-attn installed (its variable-length kernel follows the real sequences, where sdpa applies the block-diagonal
    mask densely); otherwise transformers' default."""
    import importlib.util

    if packed and on_gpu and importlib.util.find_spec("flash_attn") is not None:
        return {"attn_implementation": "flash_attention_2"}
    return {}


def token_counts(contexts, completions, packed: bool) -> tuple[int, int]:
    """(real, computed) tokens of one forward over these sequences: padded, every row is as long as the longest."""
    lengths = [len(c) + len(y) - 1 for c, y in zip(contexts, completions)]  # the lengths of _sequences
    return sum(lengths), sum(lengths) if packed else len(lengths) * max(lengths)


def completion_logits(model, contexts: list[list[int]], completions: list[list[int]], pad_id: int,
                      packed: bool = False) -> torch.Tensor:
    """Logits at the positions that predict each completion token, flattened to [N, V].

    A full forward of the model (so ZeRO-3's parameter hooks and tied embeddings behave), with the LM head
    applied only to the completion positions (`logits_to_keep`: from the first one on when padded, exactly those
    when `packed`).
    """
    device = next(model.parameters()).device
    if packed:
        inputs, keep = _packed(contexts, completions, device)
        return model(**inputs, logits_to_keep=keep).logits[0]
    ids, mask = _pad(_sequences(contexts, completions), pad_id, device)
    first = min(len(c) for c in contexts) - 1
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=torch.arange(first, ids.shape[1])).logits
    return torch.cat([logits[i, len(c) - 1 - first : len(c) - 1 - first + len(y)]
                      for i, (c, y) in enumerate(zip(contexts, completions))])


def decoder(model) -> torch.nn.Module:
    """The transformer under the LM head (its output is the final hidden states) of an HF causal LM, a peft model
    or a DeepSpeed engine around either. An HF model's `base_model` is that body; a peft model's `base_model` is
    its LoRA wrapper (whose forward is the whole causal LM), so go through the model it wraps: the LoRA layers sit
    inside it, and the active adapter (or `disable_adapter()`) still applies."""
    inner = model.module if isinstance(getattr(model, "module", None), torch.nn.Module) else model
    if callable(getattr(inner, "get_base_model", None)):  # peft
        inner = inner.get_base_model()
    return inner.base_model


def completion_hidden(model, contexts: list[list[int]], completions: list[list[int]], pad_id: int,
                      packed: bool = False) -> torch.Tensor:
    """Final hidden states at the same positions, [N, H], for the fused-linear kernels (ZeRO <= 2)."""
    device = next(model.parameters()).device
    if packed:
        inputs, keep = _packed(contexts, completions, device)
        return decoder(model)(**inputs).last_hidden_state[0, keep]
    ids, mask = _pad(_sequences(contexts, completions), pad_id, device)
    hidden = decoder(model)(input_ids=ids, attention_mask=mask).last_hidden_state
    return torch.cat([hidden[i, len(c) - 1 : len(c) - 1 + len(y)] for i, (c, y) in enumerate(zip(contexts, completions))])


@torch.no_grad()
def chunked_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """log softmax(hidden @ weight.T)[id] per row, chunk by chunk (never the full [N, V] logits)."""
    return torch.cat([
        token_logprobs(hidden[i : i + chunk] @ weight.T, ids[i : i + chunk]) for i in range(0, len(ids), chunk)
    ])


@torch.no_grad()
def token_kl_sum(model, base_logits: Callable[[list, list], torch.Tensor], sequences: list[tuple[list, list]],
                 pad_id: int, chunk: int, base_contexts: list[list[int]] | None = None,
                 packed: bool = False) -> tuple[float, int]:
    """Summed per-token KL(base || model) over the answer tokens of `sequences`, and the number of tokens.

    `model` reads each answer behind its prompt; `base_logits(contexts, answers)` gives the base's [N, V] logits on
    the same tokens (the frozen teacher, a base model through `completion_logits`, ...), behind `base_contexts` when
    given, else behind the same prompts. `chunk` sequences at a time bound the memory of the [N, V] logits."""
    contexts = base_contexts if base_contexts is not None else [p for p, _ in sequences]
    rows = [(p, a, c) for (p, a), c in zip(sequences, contexts) if a]  # an empty answer has no token to compare
    total, count = 0.0, 0
    for i in range(0, len(rows), chunk):
        prompts, answers, ctx = map(list, zip(*rows[i : i + chunk]))
        zm = completion_logits(model, prompts, answers, pad_id, packed)
        zb = base_logits(ctx, answers).to(zm.device)
        total += forward_kl(zm, zb).sum().item()  # KL(base || model): the base in the teacher's place
        count += zm.shape[0]
    return total, count
