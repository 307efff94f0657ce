"""The repository is self-contained: what docstrings and the README cite is in the repository."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {"tests/data", "docs", "dsv4.egg-info", "benchmarks/results"}


def _files() -> list[str]:
    """The repository's own files: tracked or untracked but not ignored (the Node example's node_modules
    is not the repository's), every file outside git; never a virtual environment made in the checkout."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
        files = [rel for rel in out.splitlines() if (ROOT / rel).is_file()]
    except (OSError, subprocess.CalledProcessError):
        files = [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*") if p.is_file()]
    venvs = tuple(f"{cfg.parent.name}/" for cfg in ROOT.glob("*/pyvenv.cfg"))
    return sorted(rel for rel in files if not rel.startswith(venvs))


def _sources():
    for rel in _files():
        if Path(rel).suffix in (".py", ".md", ".toml") and not any(rel.startswith(s) for s in SKIP) \
                and "/." not in rel:
            yield rel, (ROOT / rel).read_text(encoding="utf-8")


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
