"""Accuracy on the official SDFT tasks, by the rules of the official eval scripts (Continual-Intelligence/
Self-Distillation @ 0570f07), quirks included, so that numbers compare with the paper's.

* tool use (eval_tooluse.py): the predicted action names (every `Action: NAME`) must equal the gold ones as a
  multiset, and the `Action Input: {...}` JSON blocks, merged into one dict, must equal the gold inputs merged the
  same way. Kept on purpose: a later call overwrites an earlier call's key (on both sides); the non-greedy `{.*?}`
  stops at the first `}`, so a nested object breaks its block, which is then skipped like any block that is not
  JSON; values compare with their types (1 != "1").
* science: the text after the last `<answer>` up to the next `</answer>`, stripped, must equal the answer letter
  exactly (a bare "C" with no tags counts; "c" does not).

Both are called as fn(completion_text, example) -> float (see evaluation.make_scorer). For tool use,
example.answer is the JSON text `pipeline/convert.py` writes: a list of {"Action": str, "Action_Input": str}.
"""

from __future__ import annotations

import json
import re
from collections import Counter

from ..data import Example
from ..errors import EvalError

_ACTION = re.compile(r"Action:\s*(\w+)")
_ACTION_INPUT = re.compile(r"Action Input:\s*({.*?})", re.DOTALL)


def predicted_actions(text: str) -> list[str]:
    return _ACTION.findall(text)


def predicted_inputs(text: str) -> dict:
    """Every Action Input block that parses, merged in order (a later key wins)."""
    merged: dict = {}
    for block in _ACTION_INPUT.findall(text):
        try:
            merged.update(json.loads(block))
        except json.JSONDecodeError:
            continue
    return merged


def gold_calls(example: Example) -> tuple[list[str], dict]:
    """The gold action names and merged inputs; an input that does not parse is skipped, as the official script does."""
    try:
        calls = json.loads(example.answer)
        actions = [call["Action"] for call in calls]
    except (ValueError, TypeError, KeyError):
        raise EvalError(f"{example.where}: the answer is not a JSON list of {{\"Action\", \"Action_Input\"}} calls; "
                        "convert the data with `sdft data convert --from official-tooluse`") from None
    inputs: dict = {}
    for call in calls:
        try:
            inputs.update(json.loads(call.get("Action_Input")))
        except (ValueError, TypeError):
            continue
    return actions, inputs


def tooluse(text: str, example: Example) -> float:
    actions, inputs = gold_calls(example)
    return float(Counter(predicted_actions(text)) == Counter(actions) and predicted_inputs(text) == inputs)


def science_answer(text: str) -> str:
    return text.split("<answer>")[-1].split("</answer>")[0].strip()


def science(text: str, example: Example) -> float:
    return float(science_answer(text) == example.answer)


TASK_METRICS = {"tooluse": tooluse, "science": science}
