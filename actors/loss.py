"""The SDFT and SFT losses over flattened completion tokens, as the official code computes them; free of
orchestration.

Completion tokens of a micro-batch are flattened to N rows; `seq_index[t]` says which sequence row t
belongs to. The per-token divergence comes from `kernels` (the learner picks the kernel); this module adds
the masks, the truncated importance-sampling weight and the reduction: token-mean per sequence, then the
IS-weighted mean over sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenLayout:
    """Where the N flattened completion tokens sit: their sequence and their position inside it."""

    seq_index: torch.Tensor  # [N] long
    position: torch.Tensor  # [N] long, 0-based position within the completion
    num_seqs: int

    @classmethod
    def from_lengths(cls, lengths: list[int], device=None) -> "TokenLayout":
        lens = torch.tensor(lengths, dtype=torch.long, device=device)
        seq_index = torch.repeat_interleave(torch.arange(len(lengths), device=device), lens)
        starts = torch.cumsum(lens, 0) - lens
        return cls(seq_index, torch.arange(int(lens.sum()), device=device) - starts[seq_index], len(lengths))

    def per_sequence_mean(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked token-mean of `values` within each sequence -> [num_seqs] (0 for a fully masked sequence)."""
        mask = mask.to(values.dtype)
        sums = values.new_zeros(self.num_seqs).index_add(0, self.seq_index, values * mask)
        counts = values.new_zeros(self.num_seqs).index_add(0, self.seq_index, mask)
        return sums / counts.clamp(min=1.0)


def valid_mask(token_ids: torch.Tensor, layout: TokenLayout, eos_id: int | None) -> torch.Tensor:
    """True up to and including each sequence's first EOS; False after it."""
    if eos_id is None:
        return torch.ones_like(token_ids, dtype=torch.bool)
    is_eos = (token_ids == eos_id).long()
    per_seq = torch.zeros(layout.num_seqs, dtype=torch.long, device=token_ids.device).index_add(0, layout.seq_index, is_eos)
    eos_before_seq = torch.cumsum(per_seq, 0) - per_seq
    eos_before_token = torch.cumsum(is_eos, 0) - is_eos  # EOS strictly before each token, over the whole batch
    return (eos_before_token - eos_before_seq[layout.seq_index]) == 0


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per row, in float32, without a [N, V] log-softmax tensor."""
    logits = logits.float()
    return logits.gather(1, token_ids[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def importance_weights(
    logp_train: torch.Tensor, logp_rollout: torch.Tensor, mask: torch.Tensor, layout: TokenLayout, cap: float
) -> torch.Tensor:
    """Per sequence w = mean_t min(exp(logp_train - logp_rollout), cap), detached."""
    ratio = torch.exp(logp_train.detach().float() - logp_rollout.float()).clamp(max=cap)
    return layout.per_sequence_mean(ratio, mask).detach()


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, what backward() is called on
    divergence: torch.Tensor  # detached scalar: mean per-token divergence over loss tokens
    is_weights: torch.Tensor  # [num_seqs] detached
    num_tokens: int


def sdft_loss(
    per_token: torch.Tensor,
    logp_train: torch.Tensor,
    completion_ids: torch.Tensor,
    rollout_logprobs: torch.Tensor | None,
    layout: TokenLayout,
    *,
    eos_id: int | None,
    skip_first_tokens: int = 0,
    is_cap: float | None = 2.0,
    token_clip: float | None = None,
) -> LossOutput:
    """SDFT loss on the student's own samples.

    per_token: [N] divergence from `kernels` (differentiable w.r.t. the student); logp_train: [N] the student's
    log-prob of each sampled token (for the IS weight); rollout_logprobs: [N] vLLM's log-prob of the same token.
    token_clip: each token's divergence clipped at it (a clipped token gives no gradient); None: off.
    """
    if token_clip is not None:
        per_token = per_token.clamp(max=token_clip)
    valid = valid_mask(completion_ids, layout, eos_id)
    loss_mask = valid & (layout.position >= skip_first_tokens)
    if is_cap is not None and rollout_logprobs is not None:  # over the loss mask, as the official code does
        weights = importance_weights(logp_train, rollout_logprobs, loss_mask, layout, is_cap)
    else:
        weights = torch.ones(layout.num_seqs, device=per_token.device)
    return reduce_loss(layout.per_sequence_mean(per_token, loss_mask), weights, per_token, loss_mask)


def reduce_loss(per_seq, weights, per_token, loss_mask) -> LossOutput:
    n = int(loss_mask.sum())
    mean_div = (per_token.detach() * loss_mask).sum() / max(n, 1)
    return LossOutput((per_seq * weights).mean(), mean_div, weights, n)


def sft_loss(logits: torch.Tensor, target_ids: torch.Tensor, layout: TokenLayout, *, eos_id: int | None) -> LossOutput:
    """Negative log-likelihood of the demonstration tokens; token-mean per sequence, then batch mean."""
    nll = -token_logprobs(logits, target_ids)
    mask = valid_mask(target_ids, layout, eos_id)
    per_seq = layout.per_sequence_mean(nll, mask)
    return reduce_loss(per_seq, torch.ones_like(per_seq), nll, mask)
