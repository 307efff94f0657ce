"""The command that installs one of dsv4's optional extras (mlx, cuda, onnx, serve, dev) for the way this
copy of dsv4 was installed; every "not installed" message (backends, convert, export, serve, parity) uses
`install_command`.

Why not `pip install 'dsv4[mlx]'`: dsv4 is not on a package index, so that command fails.  pip records
how it installed a distribution in the distribution's `direct_url.json` (PEP 610), and that decides:
* from a directory (a clone), editable or not: install the same directory again with the extra,
  `pip install -e '/path/to/clone[mlx]'` (without `-e` when it was not editable);
* anything else (a wheel file, a VCS URL, an index): install what the extra requires, read from the
  installed metadata with the markers evaluated for this machine, e.g. `pip install 'mlx[cpu]>=0.25'`;
* no installed metadata at all (imported straight from a source tree): the editable install of the
  nearest directory above the package that has a `pyproject.toml`.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import shlex
from pathlib import Path
from urllib.parse import unquote, urlparse

DIST = "dsv4"
PACKAGE_DIR = Path(__file__).resolve().parent.parent


def install_command(extra: str) -> str:
    """The shell command (copy-paste ready) that adds `extra` to this installation."""
    dist = _distribution()
    origin = _direct_url(dist) if dist is not None else None
    if origin is not None and "dir_info" in origin and origin.get("url", "").startswith("file:"):
        editable = "-e " if origin["dir_info"].get("editable") else ""
        return f"pip install {editable}{_with_extra(unquote(urlparse(origin['url']).path), extra)}"
    if dist is not None:
        return "pip install " + " ".join(shlex.quote(r) for r in _requirements(dist, extra))
    return f"pip install -e {_with_extra(str(_source_tree()), extra)}"


def _distribution():
    """The installed dsv4 distribution; where several are on the path (an `egg-info` left in a source
    checkout shadows the real one when Python runs from there), the one pip recorded an origin for."""
    found = list(metadata.distributions(name=DIST))
    return next((d for d in found if _direct_url(d) is not None), found[0] if found else None)


def _direct_url(dist) -> dict | None:
    try:
        data = json.loads(dist.read_text("direct_url.json") or "null")
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _with_extra(path: str, extra: str) -> str:
    """`'path[extra]'`, quoted for the shell (the brackets are a glob to most shells)."""
    return shlex.quote(f"{path}[{extra}]")


def _requirements(dist, extra: str) -> list[str]:
    """The requirements `extra` adds on this machine (self-references such as `dsv4[mlx,cuda]` expanded),
    without their markers."""
    from packaging.requirements import Requirement
    out: list[str] = []
    for line in dist.requires or []:
        req = Requirement(line)
        in_extra = req.marker is not None and req.marker.evaluate({"extra": extra})
        if not in_extra or req.marker.evaluate({"extra": ""}):
            continue                     # not in the extra on this machine, or needed without it
        if req.name == DIST:
            for sub in sorted(req.extras):
                out += [r for r in _requirements(dist, sub) if r not in out]
            continue
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        out.append(f"{req.name}{extras}{req.specifier}")
    return out


def _source_tree() -> Path:
    return next((p for p in (PACKAGE_DIR, *PACKAGE_DIR.parents) if (p / "pyproject.toml").is_file()),
                PACKAGE_DIR)
