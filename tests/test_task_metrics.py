"""The official SDFT eval rules on hand-made completions; every expectation is worked out from the rules in the
module docstring of pipeline/experiments/task_metrics.py, quirks included."""

import json

import pytest

from pipeline.data import Example
from pipeline.errors import EvalError
from pipeline.experiments.evaluation import make_scorer
from pipeline.experiments.task_metrics import (TASK_METRICS, gold_calls, predicted_actions, predicted_inputs, science,
                                               tooluse)


def gold(*calls: tuple[str, dict | str]) -> Example:
    """An example whose answer is the converter's JSON text of the gold calls (dict inputs JSON-encoded)."""
    answer = [{"Action": a, "Action_Input": i if isinstance(i, str) else json.dumps(i)} for a, i in calls]
    return Example(prompt="p", demonstration="d", answer=json.dumps(answer), where="eval.jsonl:3")


def calls(*pairs: tuple[str, str]) -> str:
    """A ReAct-style completion making the given calls (inputs as raw text)."""
    return "".join(f"Thought: I should call {a}.\nAction: {a}\nAction Input: {i}\n" for a, i in pairs)


AXOLOTL = gold(("getRandomAxolotlImage", {}))
TWO = gold(("getCardsByColor", {"color": "wild", "page": 1}), ("getCardBacks", {"locale": "enUS"}))


def test_single_call():
    assert tooluse(calls(("getRandomAxolotlImage", "{}")), AXOLOTL) == 1.0
    assert tooluse("I cannot help with that.", AXOLOTL) == 0.0


def test_two_calls_in_either_order():
    first, second = ("getCardsByColor", '{"color": "wild", "page": 1}'), ("getCardBacks", '{"locale": "enUS"}')
    assert tooluse(calls(first, second), TWO) == 1.0
    assert tooluse(calls(second, first), TWO) == 1.0
    assert tooluse(calls(first), TWO) == 0.0  # the second call is missing


def test_wrong_or_extra_action():
    assert tooluse(calls(("getAxolotlFacts", "{}")), AXOLOTL) == 0.0
    assert tooluse(calls(("getRandomAxolotlImage", "{}"), ("getRandomAxolotlImage", "{}")), AXOLOTL) == 0.0
    assert tooluse(calls(("getRandomAxolotlImage", "{}"), ("getAxolotlFacts", "{}")), AXOLOTL) == 0.0


def test_inputs_compare_with_types_and_keys():
    ex = gold(("getCardsByColor", {"color": "wild", "page": 1}))
    assert tooluse(calls(("getCardsByColor", '{"color": "wild", "page": 1}')), ex) == 1.0
    assert tooluse(calls(("getCardsByColor", '{"color": "wild", "page": "1"}')), ex) == 0.0  # 1 != "1"
    assert tooluse(calls(("getCardsByColor", '{"color": "wild"}')), ex) == 0.0  # a missing key
    assert tooluse(calls(("getCardsByColor", '{"color": "wild", "page": 1, "x": 0}')), ex) == 0.0  # an extra key


def test_empty_string_values_must_match():
    ex = gold(("searchAnime", {"query": "", "genre": "comedy"}))
    assert tooluse(calls(("searchAnime", '{"query": "", "genre": "comedy"}')), ex) == 1.0
    assert tooluse(calls(("searchAnime", '{"genre": "comedy"}')), ex) == 0.0
    assert tooluse(calls(("searchAnime", '{"query": " ", "genre": "comedy"}')), ex) == 0.0


def test_a_later_call_overwrites_an_earlier_key_on_both_sides():
    ex = gold(("getPage", {"page": 1}), ("getPage", {"page": 2}))
    assert gold_calls(ex) == (["getPage", "getPage"], {"page": 2})
    assert tooluse(calls(("getPage", '{"page": 1}'), ("getPage", '{"page": 2}')), ex) == 1.0
    assert tooluse(calls(("getPage", '{"page": 2}'), ("getPage", '{"page": 1}')), ex) == 0.0  # merged to page 1
    # Quirk: only the last value of a key counts, so a wrong first page still scores.
    assert tooluse(calls(("getPage", '{"page": 7}'), ("getPage", '{"page": 2}')), ex) == 1.0


def test_nested_input_is_dropped_by_the_non_greedy_block():
    # `{.*?}` stops at the inner "}", so the block is not JSON and is skipped: a nested gold input can never match.
    text = calls(("filterCards", '{"filter": {"color": "red"}}'))
    assert predicted_inputs(text) == {}
    assert tooluse(text, gold(("filterCards", {"filter": {"color": "red"}}))) == 0.0
    assert tooluse(text, gold(("filterCards", {}))) == 1.0


def test_unparseable_blocks_are_skipped():
    text = calls(("getRandomAxolotlImage", "{not json}"))
    assert predicted_actions(text) == ["getRandomAxolotlImage"] and predicted_inputs(text) == {}
    assert tooluse(text, AXOLOTL) == 1.0
    assert tooluse(calls(("getPage", "{page: 3}"), ("getPage", '{"page": 2}')),
                   gold(("getPage", {"page": 2}), ("getPage", {"page": 2}))) == 1.0
    # A gold input that is not JSON is skipped too, as the official script does.
    assert gold_calls(gold(("getPage", "page=2"))) == (["getPage"], {})


def test_a_bad_answer_is_an_error_naming_the_row():
    with pytest.raises(EvalError, match=r"eval.jsonl:3: the answer is not a JSON list.*official-tooluse"):
        tooluse("Action: x", Example(prompt="p", demonstration="d", answer="getAxolotlImage", where="eval.jsonl:3"))


def letter(answer: str) -> Example:
    return Example(prompt="p", demonstration="d", answer=answer, where="eval.jsonl:1")


def test_science():
    assert science("<reasoning>Mitochondria make ATP.</reasoning>\n<answer>\nC\n</answer>", letter("C")) == 1.0
    assert science("<reasoning>..</reasoning>\n<answer>\nC\n</answer>", letter("B")) == 0.0
    assert science("B", letter("B")) == 1.0 and science("B", letter("C")) == 0.0  # no tags: the whole text
    assert science("<answer>c</answer>", letter("C")) == 0.0  # exact, case included
    assert science("<answer>A</answer> on second thought <answer>D</answer>", letter("D")) == 1.0  # the last one
    assert science("The answer is C", letter("C")) == 0.0


def test_offered_by_name_and_through_make_scorer():
    assert TASK_METRICS == {"tooluse": tooluse, "science": science}
    scorer = make_scorer("pipeline.experiments.task_metrics:tooluse")
    assert scorer(calls(("getRandomAxolotlImage", "{}")), AXOLOTL) == 1.0
