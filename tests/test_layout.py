"""The repository uses the src layout: the package lives in src/dsv4 and nothing at the root is importable
as part of it, so tests exercise the installed package and may share module names across folders."""

import re
from pathlib import Path

import dsv4

ROOT = Path(__file__).resolve().parents[1]


def test_package_lives_in_src():
    assert (ROOT / "src" / "dsv4" / "__init__.py").is_file()
    assert not (ROOT / "__init__.py").exists() and not (ROOT / "portable").exists()


def test_tests_are_a_package_and_import_helpers_relatively():
    assert all((d / "__init__.py").is_file() for d in (ROOT / "tests").rglob("*")
               if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py")))
    for f in (ROOT / "tests").rglob("*.py"):
        assert not re.search(r"^\s*sys\.path\.insert\(", f.read_text(), re.M), f


def test_an_editable_install_points_into_src():
    if "site-packages" in dsv4.__file__:            # a regular install: nothing to check about the clone
        return
    assert Path(dsv4.__file__).resolve().parent == ROOT / "src" / "dsv4"
