"""What a model directory is: the official layout, a backend's converted directory, or an ONNX export.

One detection, used by `dsv4.load` and by the CLI, so both read a directory the same way:
- an ONNX export has a `manifest.json` whose `format` is "dsv4-onnx" (written by `export.manifest`) and
  the graph `model.onnx` beside it; a `manifest.json` of any other format is someone else's file and is
  ignored, so a checkpoint directory that happens to hold one is still a checkpoint;
- a checkpoint has `config.json` and `*.safetensors`; its config's `dsv4_format: {"backend": name}`
  marks a directory a converter wrote for that backend (the backend checks its tensors as it loads).
The format name lives here, not in `export`, because `portable` may not import `export`; the export
writes the same constant.
"""

from __future__ import annotations

import json
from pathlib import Path

MANIFEST = "manifest.json"
EXPORT_FORMAT = "dsv4-onnx"
EXPORT_GRAPH = "model.onnx"
CONVERTED_KEY = "dsv4_format"


class LayoutError(FileNotFoundError):
    """A directory that holds no loadable model; the message names what is missing."""


def _json_field(path: Path, key: str):
    """`key` of the JSON object in `path`, or None when the file is absent, unreadable or not an object
    (reading the file itself, e.g. `ModelConfig.from_file`, says what is wrong with it)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return data.get(key) if isinstance(data, dict) else None


def is_export(path) -> bool:
    """`path` holds a dsv4 ONNX export's manifest (by its format field; the graph is checked by `backend_of`)."""
    return _json_field(Path(path) / MANIFEST, "format") == EXPORT_FORMAT


def backend_of(path) -> str | None:
    """The backend `path` was written for ("onnx" for an export, the converter's backend for a converted
    directory), or None for the official layout, which every backend but onnx loads.  Raises LayoutError
    when `path` is none of these."""
    d = Path(path)
    if is_export(d):
        if not (d / EXPORT_GRAPH).is_file():
            raise LayoutError(f"{d}: {MANIFEST} describes a dsv4 ONNX export but {EXPORT_GRAPH} is missing "
                              f"(copy the whole export directory)")
        return "onnx"
    if not (d / "config.json").is_file():
        raise LayoutError(f"{d} has no config.json; a model directory is a checkpoint (config.json + "
                          f"*.safetensors + tokenizer.json) or an ONNX export ({MANIFEST} + {EXPORT_GRAPH})")
    if not any(d.glob("*.safetensors")):
        raise LayoutError(f"{d} has config.json but no *.safetensors weights")
    fmt = _json_field(d / "config.json", CONVERTED_KEY)
    return fmt.get("backend") if isinstance(fmt, dict) else None
