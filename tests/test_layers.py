"""The layers, read from the imports (ast, nothing is imported): benchmarks -> pipeline -> actors -> kernels.

pipeline/config.py and pipeline/errors.py are the bottom of the project: every layer may import them, so they import
nothing else of it (config.py only errors.py, whose ConfigError it raises). actors/ and kernels/ import nothing else
from pipeline/: the typed Config crosses Ray as it is."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "actors", "kernels")
SHARED = {"pipeline.config", "pipeline.errors"}


def _imports(path: Path) -> set[str]:
    """Absolute names of the project modules `path` imports, anywhere in it (function bodies too)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package if node.level else ""
            module = ".".join(p for p in (base, node.module) if p)
            found.add(module)
            found |= {f"{module}.{a.name}" for a in node.names if (ROOT / module.replace(".", "/") / a.name).exists()
                      or (ROOT / module.replace(".", "/") / f"{a.name}.py").exists()}
    return {m for m in found if m.split(".")[0] in PACKAGES}


def _modules(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py"))


def test_imports_are_resolved():
    assert _imports(ROOT / "pipeline" / "config.py") == {"pipeline.errors"}
    assert "actors.weight_sync" in _imports(ROOT / "actors" / "launcher.py")
    assert "pipeline.errors" in _imports(ROOT / "pipeline" / "cli.py")


def test_config_and_errors_are_leaves():
    assert _imports(ROOT / "pipeline" / "errors.py") == set()
    assert _imports(ROOT / "pipeline" / "config.py") <= {"pipeline.errors"}


def test_actors_and_kernels_import_only_config_and_errors_from_pipeline():
    bad = {f"{p.relative_to(ROOT)}: {m}" for p in _modules("actors", "kernels") for m in _imports(p)
           if m.split(".")[0] == "pipeline" and m not in SHARED}
    assert not bad, f"below pipeline/, only {sorted(SHARED)} may be imported: {sorted(bad)}"


def test_kernels_import_nothing_above_them():
    bad = {f"{p.relative_to(ROOT)}: {m}" for p in _modules("kernels") for m in _imports(p)
           if m.split(".")[0] == "actors"}
    assert not bad, sorted(bad)
