"""The repository is self-contained: what docstrings and the README cite is in the repository."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {"tests/data", "docs", "dsv4.egg-info", "benchmarks/results"}


def _sources():
    for p in sorted(ROOT.rglob("*")):
        rel = p.relative_to(ROOT).as_posix()
        if p.suffix in (".py", ".md", ".toml") and not any(rel.startswith(s) for s in SKIP) and "/." not in rel:
            yield rel, p.read_text(encoding="utf-8")


def test_the_specs_and_the_plan_ship_in_docs():
    for name in ("model-spec.md", "encoding-spec.md", "architecture.md"):
        assert (ROOT / "docs" / name).stat().st_size > 5000, name
    readme = (ROOT / "README.md").read_text()
    assert all(f"docs/{n}" in readme for n in ("model-spec.md", "encoding-spec.md", "architecture.md"))


def test_nothing_cites_files_outside_the_repository():
    outside = re.compile(r"\.\./shared|/work/shared")
    bad = [rel for rel, text in _sources() if outside.search(text) and rel != "tests/test_docs.py"]
    assert bad == []


def test_cited_repository_files_exist():
    """Every `tests/…`, `docs/…` path and every bare `test_*.py` name a file mentions is really there."""
    test_files = {p.name for p in (ROOT / "tests").rglob("test_*.py")}
    missing = []
    for rel, text in _sources():
        for path in re.findall(r"\b((?:tests|docs)/[\w/.-]+\.(?:py|md|json))", text):
            if not (ROOT / path).exists():
                missing.append(f"{rel}: {path}")
        for name in re.findall(r"(?<![\w/])(test_\w+\.py)\b", text):
            if name not in test_files:
                missing.append(f"{rel}: {name}")
    assert missing == []
