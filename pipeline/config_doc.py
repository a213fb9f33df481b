"""The configuration reference (docs/config.md), generated from the pydantic models in `pipeline/config.py`.

    python -m pipeline.config_doc           # rewrite docs/config.md
    python -m pipeline.config_doc --check   # exit 1 if docs/config.md differs from what the models say

Every key's type, constraints, default and `description` come from `Config.model_fields`, walked recursively;
a section is any field whose type is a config model, named by its alias (`async` for `async_`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import types
import typing
from pathlib import Path

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from .config import Config

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "config.md"

HEADER = """\
# Configuration reference

Generated from `pipeline/config.py` by `python -m pipeline.config_doc` (also printed by `sdft config`); do not
edit by hand. A config is a YAML file of these sections; any key can be overridden on the command line as
`section.key=value` (e.g. `sdft train my.yaml train.lr=1e-5 rollout.max_new_tokens=64`). Unknown keys and values
outside the constraints are rejected before anything starts, naming the file and the key.
"""


def _name(key: str, field: FieldInfo) -> str:
    return field.alias or key


def _is_section(field: FieldInfo) -> bool:
    ann = field.annotation
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _type_name(ann) -> str:
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if ann is type(None):
        return "None"
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(ann, "__name__", str(ann))


_BOUNDS = ((annotated_types.Gt, "gt", ">"), (annotated_types.Ge, "ge", ">="),
           (annotated_types.Lt, "lt", "<"), (annotated_types.Le, "le", "<="))


def _constraints(field: FieldInfo) -> list[str]:
    out = []
    for meta in field.metadata:
        for cls, attr, sign in _BOUNDS:
            if isinstance(meta, cls):
                out.append(f"{sign} {getattr(meta, attr)}")
    return out


def _default(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    return json.dumps(value, ensure_ascii=False)


def _code(text: str) -> str:
    return f"`{text}`"


def _cell(text: str) -> str:
    """Markdown table cell: one line, `|` escaped everywhere, HTML-looking `<x` escaped outside code spans."""
    text = " ".join(text.split("\n")).replace("|", "\\|")
    parts = text.split("`")
    for i in range(0, len(parts), 2):
        parts[i] = re.sub(r"<(?=[A-Za-z/!])", "&lt;", parts[i])
    return "`".join(parts)


def _sections(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, type[BaseModel]]]:
    """(dotted name, description, model) for `model` itself and every nested section, depth first."""
    out = []
    for key, field in model.model_fields.items():
        if _is_section(field):
            name = prefix + _name(key, field)
            out.append((name, field.description or "", field.annotation))
            out.extend(_sections(field.annotation, name + "."))
    return out


def _table(model: type[BaseModel], prefix: str) -> list[str]:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for key, field in model.model_fields.items():
        if _is_section(field):
            continue
        kind = _code(_type_name(field.annotation))
        bounds = _constraints(field)
        if bounds:
            kind += ", " + ", ".join(bounds)
        rows.append("| " + " | ".join(_cell(c) for c in (
            _code(prefix + _name(key, field)), kind, _code(_default(field)), field.description or "")) + " |")
    return rows


def render() -> str:
    """The Markdown reference of every config key: one table per section."""
    lines = [HEADER]
    sections = _sections(Config)
    links = ["[top level](#top-level)"] + [f"[`{name}`](#{name.replace('.', '')})" for name, _, _ in sections]
    lines.append("Sections: " + ", ".join(links) + ".\n")
    lines.append("## top level\n")
    lines += _table(Config, "")
    for name, description, model in sections:
        lines.append(f"\n## {name}\n")
        if description:
            lines.append(description[0].upper() + description[1:] + ".\n")
        lines += _table(model, name + ".")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.config_doc", description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if docs/config.md is not what render() gives")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        if not DOC_PATH.exists() or DOC_PATH.read_text() != text:
            print(f"{DOC_PATH} is stale: run `python -m pipeline.config_doc` to regenerate it", file=sys.stderr)
            return 1
        print(f"{DOC_PATH} is up to date")
        return 0
    DOC_PATH.parent.mkdir(parents=True, exist_ok=True)
    DOC_PATH.write_text(text)
    print(f"wrote {DOC_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
