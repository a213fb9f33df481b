"""Learner input for the tests that drive a Learner directly: random prompts, demonstrations and completions over
the tiny model's vocabulary (ids 3..379), each completion ending in EOS."""

import torch

from actors.messages import Sample


def learner_samples(n: int = 4, logprob: float = -6.0) -> list[Sample]:
    """`n` samples whose rollout log-probs are all `logprob` (NaN makes the IS weight, and so the step, non-finite)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        x = torch.randint(3, 380, (4 + i,), generator=g).tolist()
        c = torch.randint(3, 380, (3,), generator=g).tolist()
        y = torch.randint(3, 380, (5 + i % 2,), generator=g).tolist() + [2]  # 2 = <|im_end|> (EOS)
        out.append(Sample(student_ids=x, completion_ids=y, teacher_ids=c + x, logprobs=[logprob] * len(y)))
    return out
