"""train.micro_batch_tokens: micro-batches by a token budget (whole sequences, the step's order), as many on every
learner rank; the loss and gradients are those of micro-batches by count."""

from pathlib import Path

import pytest

from actors.batching import by_count, by_tokens, split_to
from samples import learner_metrics, two_rank_steps

SMOKE = str(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml")


def test_by_tokens_keeps_sequences_whole_and_in_order():
    lengths = [9, 11, 11, 13, 30, 2, 2]
    groups = by_tokens(lengths, 20)
    assert groups == [[0, 1], [2], [3], [4], [5, 6]]  # 30 > 20 stands alone
    assert [i for g in groups for i in g] == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in g) <= 20 for g in groups if len(g) > 1)
    assert by_count(5, 2) == [[0, 1], [2, 3], [4]]


def test_split_to_reaches_the_count_of_the_other_ranks():
    lengths = [5, 5, 5, 5, 40, 1]
    groups = split_to([[0, 1, 2, 3], [4, 5]], 4, lengths)
    assert len(groups) == 4 and [i for g in groups for i in g] == list(range(6))
    assert split_to([[0, 1]], 1, lengths) == [[0, 1]]
    assert len(split_to([[0, 1, 2, 3, 4, 5]], 6, lengths)) == 6  # down to one sequence each


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [["train.zero_stage=0"], ["train.zero_stage=3"],
                                       ["train.zero_stage=2", "train.packing=true"]],
                         ids=["zero0", "zero3", "zero2-packed"])
def test_token_budget_trains_like_micro_batches_by_count(ray_session, tiny_model, overrides):
    by_rows = learner_metrics(ray_session, tiny_model, SMOKE, *overrides)
    # learner_samples' student tokens are 9, 11, 11, 13: a budget of 20 makes micro-batches of 2, 1 and 1 sequences
    budget = learner_metrics(ray_session, tiny_model, SMOKE, *overrides, "train.micro_batch_tokens=20")
    for a, b in zip(by_rows, budget):  # (kl, a monitor, is each micro-batch's token mean: it follows the grouping)
        for key in ("loss", "grad_norm", "is_weight_mean", "tokens"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_ranks_with_different_budgets_run_as_many_micro_batches(ray_session, tmp_path):
    """Two ZeRO-3 ranks (every forward a collective) whose slices fit the budget in different numbers of
    micro-batches: the run completes and trains like micro-batches by count."""
    common = [SMOKE, "train.batch_size=8", "train.zero_stage=3"]
    by_rows = two_rank_steps(tmp_path / "rows", *common)
    budget = two_rank_steps(tmp_path / "budget", *common, "train.micro_batch_tokens=24")
    assert [r["loss"] for r in budget] == pytest.approx([r["loss"] for r in by_rows], rel=1e-4)
    assert [r["grad_norm"] for r in budget] == pytest.approx([r["grad_norm"] for r in by_rows], rel=1e-4)
