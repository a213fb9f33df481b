import pytest

from pipeline.data import Example
from pipeline.experiments.evaluation import EvalError, make_scorer

EX = Example(prompt="add: 2+2", demonstration="4", answer="4", where="t:1")


def test_builtin_scorers():
    assert make_scorer("exact_match")(" 4 ", EX) == 1.0 and make_scorer("exact_match")("44", EX) == 0.0
    assert make_scorer("contains")("it is 4.", EX) == 1.0 and make_scorer("contains")("five", EX) == 0.0
    rx = make_scorer("regex", r"answer: (\d+)")
    assert rx("so the answer: 4", EX) == 1.0 and rx("answer: 5", EX) == 0.0 and rx("4", EX) == 0.0


def score_len(completion, example):  # used through "tests.test_evaluation:score_len"
    return float(len(completion) == len(example.answer))


def test_callable_scorer_and_errors():
    fn = make_scorer("tests.test_evaluation:score_len")
    assert fn("x", EX) == 1.0 and fn("xy", EX) == 0.0
    with pytest.raises(EvalError, match="cannot import"):
        make_scorer("tests.test_evaluation:nope")
    with pytest.raises(EvalError, match="needs eval.regex"):
        make_scorer("regex")
    with pytest.raises(EvalError, match="use exact_match"):
        make_scorer("bleu")
