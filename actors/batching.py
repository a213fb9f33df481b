"""A learner rank's micro-batches: a fixed number of sequences each, or (`train.micro_batch_tokens`) as many whole
sequences as fit a token budget, in the step's order.

Under ZeRO-3 every forward gathers parameters with a collective, and under ZeRO 1-2 gradients are reduced at the
accumulation boundary, so every rank must run the same number of micro-batches: ranks agree on the largest count
and the others split their largest micro-batches until they have as many (possible: every rank holds as many
sequences as the others, so no count is above that).
"""

from __future__ import annotations


def by_count(n: int, size: int) -> list[list[int]]:
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def by_tokens(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive runs of indices whose lengths sum to at most `budget`; a longer sequence stands alone."""
    groups: list[list[int]] = []
    total = budget + 1  # forces a new group at the first index
    for i, length in enumerate(lengths):
        if total + length > budget:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += length
    return groups


def split_to(groups: list[list[int]], count: int, lengths: list[int]) -> list[list[int]]:
    """`groups` split until there are `count` of them: the one with the most tokens (of those with more than one
    sequence) in two halves, each time; order kept."""
    groups = [list(g) for g in groups]
    while len(groups) < count:
        i = max((j for j, g in enumerate(groups) if len(g) > 1), key=lambda j: sum(lengths[k] for k in groups[j]))
        g = groups[i]
        groups[i : i + 1] = [g[: len(g) // 2], g[len(g) // 2 :]]
    return groups
