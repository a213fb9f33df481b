"""The docs a newcomer reads: README's first screen, its links, and the generated config reference."""

import re
import subprocess
import sys
from pathlib import Path

from pydantic import BaseModel

from pipeline import config_doc
from pipeline.config import Config

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for key, field in model.model_fields.items():
        name = prefix + (field.alias or key)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _keys(ann, name + ".")
        else:
            out.append(name)
    return out


def test_config_reference_is_up_to_date():
    doc = ROOT / "docs" / "config.md"
    assert doc.exists(), "docs/config.md is missing: run `python -m pipeline.config_doc`"
    assert doc.read_text() == config_doc.render(), (
        "docs/config.md is stale (pipeline/config.py changed): run `python -m pipeline.config_doc`"
    )


def test_every_config_key_is_documented():
    text = config_doc.render()
    keys = _keys(Config)
    assert "async.max_staleness" in keys and "output_dir" in keys and len(keys) > 50
    missing = [k for k in keys if f"| `{k}` |" not in text]
    assert not missing, f"keys missing from the config reference: {missing}"
    for section in ("model", "data", "rollout", "teacher", "loss", "train", "eval", "checkpoint", "logging",
                    "ray", "sync", "async"):
        assert f"\n## {section}\n" in text


def test_every_config_key_has_a_description():
    def walk(model, prefix=""):
        for key, field in model.model_fields.items():
            assert field.description, f"{prefix}{field.alias or key} has no description"
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                walk(field.annotation, prefix + (field.alias or key) + ".")

    walk(Config)


def test_check_flag_reports_a_stale_reference(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(config_doc, "DOC_PATH", tmp_path / "config.md")
    assert config_doc.main(["--check"]) == 1
    assert "python -m pipeline.config_doc" in capsys.readouterr().err
    assert config_doc.main([]) == 0
    assert config_doc.main(["--check"]) == 0


def test_check_flag_from_the_command_line():
    r = subprocess.run([sys.executable, "-m", "pipeline.config_doc", "--check"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_readme_first_screen_has_the_commands():
    head = "\n".join(README.read_text().splitlines()[:30])
    for cmd in ("make demo", "make test", "sdft train"):
        assert cmd in head, f"README's first 30 lines do not mention `{cmd}`"


def test_readme_relative_links_exist():
    text = README.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    broken = []
    for link in links:
        if re.match(r"^[a-z][a-z0-9+.-]*:", link) or link.startswith("#"):
            continue  # URLs and in-page anchors
        if not (ROOT / link.split("#", 1)[0]).exists():
            broken.append(link)
    assert not broken, f"README links to files that do not exist: {broken}"


def test_docs_relative_links_exist():
    broken = []
    for doc in sorted((ROOT / "docs").glob("*.md")):
        for link in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"^[a-z][a-z0-9+.-]*:", link) or link.startswith("#"):
                continue
            if not (doc.parent / link.split("#", 1)[0]).exists():
                broken.append(f"{doc.name}: {link}")
    assert not broken, f"docs link to files that do not exist: {broken}"
