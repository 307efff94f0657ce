"""Fixtures: the shipped demo model (`dsv4.load("demo")`), and the scripts it is made and graded with,
loaded from their files (they live outside the package): benchmarks/demo_eval.py and tools/train_demo.py
(both over tools/demo_corpus.py)."""

import importlib.util
import sys
from pathlib import Path

import pytest

import dsv4

ROOT = Path(__file__).resolve().parents[2]


def load_script(rel: str):
    """The module of the script at ROOT/rel (registered in sys.modules under its file name)."""
    path = ROOT / rel
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def demo():
    return dsv4.load("demo", context=1024)


@pytest.fixture(scope="session")
def grader():
    return load_script("benchmarks/demo_eval.py")


@pytest.fixture(scope="session")
def trainer():
    return load_script("tools/train_demo.py")
