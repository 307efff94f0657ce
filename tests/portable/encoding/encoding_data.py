"""Loader for the spec vectors copied into tests/data (the project runs without ../shared)."""

import json
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "data"


def load_vectors():
    return json.loads((DATA / "encoding_vectors.json").read_text(encoding="utf-8"))
