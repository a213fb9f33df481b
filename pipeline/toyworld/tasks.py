"""The toy world: string skills with exact answers, a character-level tokenizer, and the data files.

Format (one token per character; the chat template of the toy tokenizer adds `<s>` and the ` => ` cue):

    student:  <s>shift: abc => bcd</s>
    teacher:  <s>shift: abc |demo: B-C-D => bcd</s>      (data.teacher_template = "{x} |demo: {c}")

* prior skills (in pretraining): copy, reverse, sort;
* new skills (never in pretraining, their names never appear there): shift (each letter +1, z -> a),
  swap (swap adjacent pairs), mirror (a <-> z, b <-> y, ...);
* "use the demo" pretraining rows: a random instruction name, a demonstration in *any form*
  (plain, UPPER, d-a-s-h, D.O.T, [brackets]) and the answer in the model's own form (lowercase, plain):
  the model learns to take the content from a demonstration and answer in its own words;
* knowledge: facts "where an entity lives", asked in three wordings (`home of zorb`, `where is zorb`,
  `zorb lives in` -> `kelp`). The *known* facts are pretrained in every wording (prior knowledge); the *new*
  facts never appear in pretraining: they are given only as demonstrations of the `home of` question, and the
  other two wordings are the paraphrased (out-of-distribution) check, like the paper's knowledge experiment.

The expert's demonstrations for the new skills are written in a foreign form (`B-C-D`): the content is
right, the form is not the model's. SFT imitates that form; the demonstration-conditioned teacher answers in
the model's own form. New-skill accuracy counts content (letters, case-insensitive: `content_match`); prior-
skill accuracy is exact (the skill as the base model does it, `exact_match`), and `content` is reported too.

`python -m pipeline.toyworld.tasks` (re)writes the committed data files under configs/data/toy/.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

LETTERS = string.ascii_lowercase
SYMBOLS = " :|=>-.[]"
SPECIALS = ["<pad>", "<s>", "</s>"]
CHARS = list(LETTERS) + list(string.ascii_uppercase) + list(SYMBOLS)
CHAT_TEMPLATE = (
    "<s>{% for message in messages %}{{ message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}{{ ' => ' }}{% endif %}"
)
TEACHER_TEMPLATE = "{x} |demo: {c}"
MIN_LEN, MAX_LEN = 3, 6

PRIOR_SKILLS = {
    "copy": lambda s: s,
    "reverse": lambda s: s[::-1],
    "sort": lambda s: "".join(sorted(s)),
}
NEW_SKILLS = {
    "shift": lambda s: "".join(LETTERS[(LETTERS.index(ch) + 1) % 26] for ch in s),
    "swap": lambda s: "".join(s[i + 1] + s[i] if i + 1 < len(s) else s[i] for i in range(0, len(s), 2)),
    "mirror": lambda s: "".join(LETTERS[25 - LETTERS.index(ch)] for ch in s),
}
SKILLS = {**PRIOR_SKILLS, **NEW_SKILLS}

# Knowledge: the question wordings; "home" is the one the new facts are taught with (strict).
QUESTIONS = {"home": "home of {e}", "where": "where is {e}", "lives": "{e} lives in"}
STRICT_QUESTION = "home"
N_KNOWN_FACTS, N_NEW_FACTS = 160, 64

# Forms a demonstration may come in; "plain" is the model's own form.
FORMS = {
    "plain": lambda s: s,
    "upper": lambda s: s.upper(),
    "dash": lambda s: "-".join(s),
    "updash": lambda s: "-".join(s.upper()),
    "dot": lambda s: ".".join(s.upper()),
    "bracket": lambda s: f"[{s}]",
}
EXPERT_FORM = "updash"  # how the expert writes the new-skill demonstrations


def rand_word(rng: random.Random, lo: int = MIN_LEN, hi: int = MAX_LEN) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def student_content(skill: str, s: str) -> str:
    return f"{skill}: {s}"


def with_demo(content: str, demo: str) -> str:
    return TEACHER_TEMPLATE.format(x=content, c=demo)


def teacher_content(skill: str, s: str, demo: str) -> str:
    return with_demo(student_content(skill, s), demo)


def as_text(content: str, answer: str | None = None) -> str:
    """Exactly what the tokenizer's chat template renders (+ the answer and </s>)."""
    text = f"<s>{content} => "
    return text if answer is None else f"{text}{answer}</s>"


def normalize(text: str) -> str:
    """The content of an answer: its letters, lowercased (form-insensitive)."""
    return "".join(ch for ch in text.lower() if ch in LETTERS)


def content_match(text: str, example) -> float:
    return float(normalize(text) == normalize(example.answer) and normalize(text) != "")


def question(kind: str, entity: str) -> str:
    return QUESTIONS[kind].format(e=entity)


def facts(seed: int = 7) -> tuple[dict[str, str], dict[str, str]]:
    """(known, new): entity -> the place it lives; fixed by the seed, disjoint, no entity is a skill name."""
    rng = random.Random(seed)
    entities: list[str] = []
    while len(entities) < N_KNOWN_FACTS + N_NEW_FACTS:
        e = rand_word(rng, 4, 6)
        if e not in entities and e not in SKILLS:
            entities.append(e)
    table = {e: rand_word(rng, 3, 5) for e in entities}
    known = dict(list(table.items())[:N_KNOWN_FACTS])
    return known, dict(list(table.items())[N_KNOWN_FACTS:])


KNOWN_FACTS, NEW_FACTS = facts()


# ---------------------------------------------------------------------------------------------- pretraining
def _random_substitution(rng: random.Random) -> dict:
    while True:
        perm = list(LETTERS)
        rng.shuffle(perm)
        mapping = dict(zip(LETTERS, perm))
        if all(mapping[c] != NEW_SKILLS["shift"](c) for c in LETTERS[:3]):  # never the +1 map
            return mapping


def pretrain_example(rng: random.Random) -> tuple[str, str]:
    """One pretraining (prompt content, answer); the mixture of the feasibility note (+ demonstration forms)."""
    u = rng.random()
    form = rng.choice(list(FORMS)) if rng.random() < 0.6 else "plain"
    if u < 0.32:  # prior skills, student format
        skill = rng.choice(list(PRIOR_SKILLS))
        s = rand_word(rng)
        return student_content(skill, s), PRIOR_SKILLS[skill](s)
    if u < 0.47:  # known facts, any wording, student format
        entity = rng.choice(list(KNOWN_FACTS))
        return question(rng.choice(list(QUESTIONS)), entity), KNOWN_FACTS[entity]
    if u < 0.53:  # facts in teacher format: a known fact, or an unknown entity whose answer only the demo has
        entity = rng.choice(list(KNOWN_FACTS)) if rng.random() < 0.5 else rand_word(rng, 4, 6)
        while entity in NEW_FACTS:
            entity = rand_word(rng, 4, 6)
        ans = KNOWN_FACTS.get(entity) or rand_word(rng, 3, 5)
        return with_demo(question(rng.choice(list(QUESTIONS)), entity), FORMS[form](ans)), ans
    if u < 0.68:  # prior skills, teacher format, the right answer as the demo (in some form)
        skill = rng.choice(list(PRIOR_SKILLS))
        s = rand_word(rng)
        ans = PRIOR_SKILLS[skill](s)
        return teacher_content(skill, s, FORMS[form](ans)), ans
    # "use the demo": an unseen instruction; its answer is the demo's content, in the model's own form
    name = rand_word(rng, 3, 7)
    while name in SKILLS:
        name = rand_word(rng, 3, 7)
    s = rand_word(rng)
    if rng.random() < 0.7:
        mapping = _random_substitution(rng)
        ans = "".join(mapping[c] for c in s)
    else:
        ans = rand_word(rng)
    return teacher_content(name, s, FORMS[form](ans)), ans


# ---------------------------------------------------------------------------------------------- data files
DATA_DIR = Path(__file__).resolve().parents[2] / "configs" / "data" / "toy"


def _row(skill: str, s: str, form: str) -> dict:
    ans = SKILLS[skill](s)
    return {"prompt": student_content(skill, s), "demonstration": FORMS[form](ans), "answer": ans, "skill": skill}


def _fact_row(kind: str, entity: str, place: str, form: str) -> dict:
    return {"prompt": question(kind, entity), "demonstration": FORMS[form](place), "answer": place,
            "skill": f"facts:{kind}"}


def _replay(rng: random.Random, n: int, held_out: dict[str, set]) -> list[dict]:
    """Self-replay rows: prior-skill prompts (never a held-out string) with demos in the model's own form."""
    rows = []
    for _ in range(n):
        p = rng.choice(list(PRIOR_SKILLS))
        w = rand_word(rng)
        while w in held_out[p]:
            w = rand_word(rng)
        rows.append(_row(p, w, "plain"))
    return rows


def build_data(out: Path = DATA_DIR, seed: int = 1234, n_train: int = 512, n_eval: int = 100,
               replay_frac: float = 0.25) -> list[Path]:
    """Deterministic data files: per skill an eval set of held-out strings, per new skill train sets; the
    knowledge family's train / strict / paraphrased sets and the known-facts (prior knowledge) eval set."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def dump(name, rows):
        p = out / name
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        written.append(p)

    held_out: dict[str, set] = {}
    for skill in SKILLS:
        seen: set = set()
        while len(seen) < n_eval:
            seen.add(rand_word(rng))
        held_out[skill] = seen
        dump(f"{skill}_eval.jsonl", [_row(skill, s, EXPERT_FORM if skill in NEW_SKILLS else "plain")
                                      for s in sorted(seen, key=lambda w: (len(w), w))])
    for skill in NEW_SKILLS:
        words: list = []
        while len(words) < n_train:
            w = rand_word(rng)
            if w not in held_out[skill]:
                words.append(w)
        foreign = [_row(skill, w, EXPERT_FORM) for w in words]
        dump(f"{skill}_train.jsonl", foreign)  # the expert's demonstrations, foreign form
        dump(f"{skill}_plain_train.jsonl", [_row(skill, w, "plain") for w in words])  # demos in the model's form
        # self-replay: prior-skill prompts (their demos in the model's own form) mixed into the batches,
        # a quarter (`_replay`) or half (`_replay50`) of the rows
        for frac, suffix in ((replay_frac, "replay"), (0.5, "replay50")):
            mixed = foreign + _replay(rng, int(n_train * frac / (1 - frac)), held_out)
            rng.shuffle(mixed)
            dump(f"{skill}_{suffix}_train.jsonl", mixed)
    # knowledge: the new facts are taught with the strict wording (the train prompts *are* the strict eval:
    # the fact must be recalled without its demonstration, so facts_eval.jsonl is also the no-replay train
    # file); the other wordings are never trained
    paraphrases = [k for k in QUESTIONS if k != STRICT_QUESTION]
    taught = [_fact_row(STRICT_QUESTION, e, v, EXPERT_FORM) for e, v in NEW_FACTS.items()]
    dump("facts_eval.jsonl", taught)
    dump("facts_paraphrased_eval.jsonl", [_fact_row(k, e, v, EXPERT_FORM) for e, v in NEW_FACTS.items()
                                          for k in paraphrases])
    # self-replay for knowledge: prior-skill rows and the known facts of the entities *outside* the known-facts
    # eval set (their demos = the model's own answers), so retention is measured on facts never replayed
    wordings = list(QUESTIONS)
    known = list(KNOWN_FACTS.items())
    n_known_eval = n_eval - n_eval % len(wordings)
    half = len(taught) // 2
    replay_facts = [_fact_row(rng.choice(wordings), e, v, "plain") for e, v in known[n_known_eval:][:half]]
    mixed = taught + replay_facts + _replay(rng, len(taught) - len(replay_facts), held_out)
    rng.shuffle(mixed)
    dump("facts_replay50_train.jsonl", mixed)
    plain = {question(STRICT_QUESTION, e): _fact_row(STRICT_QUESTION, e, v, "plain") for e, v in NEW_FACTS.items()}
    dump("facts_plain_replay50_train.jsonl", [plain.get(r["prompt"], r) for r in mixed])  # demos in the model's form
    dump("known_facts_eval.jsonl", [_fact_row(wordings[i % len(wordings)], e, v, "plain")
                                    for i, (e, v) in enumerate(known[:n_known_eval])])
    return written


if __name__ == "__main__":
    for p in build_data():
        print(p)
