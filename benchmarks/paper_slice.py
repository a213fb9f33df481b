"""The paper's experiment in miniature, for SmolLM2 on CPU (docs/results.md): writes

* configs/data/tooluse-slice/{train_data,eval_data}.json — tool-use rows in the official release's schema (the first
  upload's JSON lists: prompt, name, description, nl_documentation, instruction, golden_answer [{Action,
  Action_Input}], golden_response on train), over four small APIs, for `sdft data convert --from official-tooluse`;
* configs/lm_eval/smollm2-prior/ — a local prior-capability suite for lm-evaluation-harness (arithmetic and capitals
  as multiple choice, capitals as generation), paths relative to the project root.

Deterministic; rerun it to regenerate the committed files: `python benchmarks/paper_slice.py`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SLICE = ROOT / "configs" / "data" / "tooluse-slice"
SUITE = ROOT / "configs" / "lm_eval" / "smollm2-prior"

# The release's prompt template (every row holds the rendered prompt)
PROMPT = ("Your task is to answer the user's question using available tools. \nYou have access to the following "
          "tools:\nName: {name}\nDescription: {description}\nDocumentation:\n{doc}\nUse the following format:\n"
          "Thought: you should always think about what to do\nAction: the action to take, should be one of the tool "
          "names.\nAction Input: the input to the action, must be in JSON format. All of the action input must be "
          "realistic and from the user.\n\nBegin!\nQuestion: {question}")

APIS = {
    "Weather": ("Current weather and forecasts by city.",
                "getCurrentWeather: the weather now. Parameters: {\"city\": string}\n"
                "getForecast: the forecast. Parameters: {\"city\": string, \"days\": integer}"),
    "Currency": ("Exchange rates between currencies.",
                 "convertCurrency: convert an amount. Parameters: {\"from\": string, \"to\": string, \"amount\": number}"),
    "Axolotl": ("Collection of axolotl pictures and facts.",
                "getRandomAxolotlImage: a random picture. Parameters: {}\n"
                "searchAxolotlImages: pictures by color. Parameters: {\"color\": string}"),
    "Books": ("Search a library catalogue.",
              "searchBooks: books by title. Parameters: {\"title\": string}"),
}
CITIES = ["Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Rome", "Delhi", "Quito", "Seoul", "Dakar", "Perth", "Vienna"]
CURRENCIES = [("USD", "EUR"), ("EUR", "JPY"), ("GBP", "USD"), ("CHF", "EUR"), ("USD", "INR"), ("JPY", "GBP")]
COLORS = ["wild", "albino", "golden", "melanoid", "leucistic", "copper"]
TITLES = ["Dune", "Emma", "Ulysses", "Beloved", "Persuasion", "Middlemarch"]


def _calls(rng: random.Random) -> tuple[str, str, list[tuple[str, dict]]]:
    """(API name, question, [(action, input)])"""
    kind = rng.randrange(6)
    city = rng.choice(CITIES)
    if kind == 0:
        return "Weather", f"What is the weather like in {city} right now?", [("getCurrentWeather", {"city": city})]
    if kind == 1:
        days = rng.randint(2, 7)
        return "Weather", f"Can you give me the {days}-day forecast for {city}?", [("getForecast", {"city": city,
                                                                                                   "days": days})]
    if kind == 2:
        (a, b), amount = rng.choice(CURRENCIES), rng.choice([10, 25, 50, 100, 250])
        return "Currency", f"How much is {amount} {a} in {b}?", [("convertCurrency", {"from": a, "to": b,
                                                                                      "amount": amount})]
    if kind == 3:
        return "Axolotl", "Show me a random axolotl picture, please.", [("getRandomAxolotlImage", {})]
    if kind == 4:
        color = rng.choice(COLORS)
        return "Axolotl", f"I'd like to see pictures of {color} axolotls.", [("searchAxolotlImages", {"color": color})]
    title = rng.choice(TITLES)
    return "Books", f"Is the book {title} in the catalogue?", [("searchBooks", {"title": title})]


def tooluse_rows(n: int, seed: int, with_response: bool) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, question, calls = _calls(rng)
        description, doc = APIS[name]
        row = {"prompt": PROMPT.format(name=name, description=description, doc=doc, question=question), "name": name,
               "description": description, "nl_documentation": doc, "instruction": question,
               "golden_answer": [{"Action": a, "Action_Input": json.dumps(i)} for a, i in calls]}
        if with_response:
            row["golden_response"] = [f"Thought: I should call {a} with what the user gave.\nAction: {a}\n"
                                      f"Action Input: {json.dumps(i)}" for a, i in calls]
        rows.append(row)
    return rows


COUNTRIES = [("France", "Paris"), ("Italy", "Rome"), ("Japan", "Tokyo"), ("Germany", "Berlin"), ("Spain", "Madrid"),
             ("Egypt", "Cairo"), ("Russia", "Moscow"), ("China", "Beijing"), ("England", "London"),
             ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Ireland", "Dublin"),
             ("Poland", "Warsaw"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Canada", "Ottawa"),
             ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Thailand", "Bangkok")]


def _task(name: str, rows: list[dict], body: str) -> None:
    (SUITE / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (SUITE / f"{name}.yaml").write_text(
        f"# {name}: written by benchmarks/paper_slice.py; data path relative to the project root\n"
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: configs/lm_eval/smollm2-prior/{name}.jsonl\ntest_split: test\n{body}")


def prior_suite() -> None:
    SUITE.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    arith = []
    for _ in range(40):
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        choices = [a + b, a + b + rng.choice([1, 2, 10]), abs(a - b) + 1, a * b]
        order = rng.sample(range(4), 4)
        arith.append({"question": f"What is {a} plus {b}?", "choices": [str(choices[i]) for i in order],
                      "label": order.index(0)})
    _task("prior_arith", arith, 'output_type: multiple_choice\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
          'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n')
    capitals = [c for _, c in COUNTRIES]
    mc = []
    for country, capital in COUNTRIES:
        wrong = rng.sample([c for c in capitals if c != capital], 3)
        choices = rng.sample([capital, *wrong], 4)
        mc.append({"country": country, "choices": choices, "label": choices.index(capital)})
    _task("prior_capitals", mc, 'output_type: multiple_choice\n'
          'doc_to_text: "Question: What is the capital of {{country}}?\\nAnswer:"\ndoc_to_choice: "{{choices}}"\n'
          'doc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n')
    pattern = "|".join(capitals)
    _task("prior_capitals_gen", [{"country": c, "capital": k} for c, k in COUNTRIES],
          'output_type: generate_until\ndoc_to_text: "Q: What is the capital of {{country}}?\\nA:"\n'
          'doc_to_target: "{{capital}}"\ngeneration_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 16\n  do_sample: false\n'
          f'filter_list:\n  - name: city\n    filter:\n      - function: regex\n        regex_pattern: "({pattern})"\n'
          '      - function: take_first\nmetric_list:\n  - metric: exact_match\n')


def main() -> None:
    SLICE.mkdir(parents=True, exist_ok=True)
    (SLICE / "train_data.json").write_text(json.dumps(tooluse_rows(48, 1, True), indent=1) + "\n")
    (SLICE / "eval_data.json").write_text(json.dumps(tooluse_rows(24, 2, False), indent=1) + "\n")
    prior_suite()
    print(f"wrote {SLICE} and {SUITE}")


if __name__ == "__main__":
    main()
