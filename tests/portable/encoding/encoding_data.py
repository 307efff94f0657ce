"""Loader for the encoding spec's test vectors, tests/data/encoding_vectors.json (see docs/encoding-spec.md)."""

import json
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "data"


def load_vectors():
    return json.loads((DATA / "encoding_vectors.json").read_text(encoding="utf-8"))
