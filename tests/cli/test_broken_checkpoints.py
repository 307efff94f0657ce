"""A corpus of broken checkpoints: `dsv4 generate` (reference and mlx), `dsv4 info` and `dsv4 info --check`
each fail on one `error:` line that names the problem (exit 3, no traceback), in the same words wherever
it is found, or succeed where the problem is beyond what they read.

What finds what: config.json, the safetensors headers and the tokenizer are read by every command; the
weights' values (NaN/Inf) by loading and by `info --check`; logits that overflow from finite numbers only
by running the model.
"""

import json
import os

import numpy as np
import pytest

from dsv4.portable.checkpoint import INDEX_NAME

from ..broken_checkpoints import edit_config, linked_copy, poke, raw, rewrite, write
from .cli_helpers import error_line

READ, VALUES, RUN = "read", "values", "run"
COMMANDS = ("generate/reference", "generate/mlx", "info", "info --check")
FOUND_BY = {READ: COMMANDS, VALUES: ("generate/reference", "generate/mlx", "info --check"),
            RUN: ("generate/reference", "generate/mlx")}


def config(**changes):
    return lambda d: edit_config(d, **changes)


def file(name, data: bytes):
    return lambda d: write(d, name, data)


def tensor(name, edit):
    """Change tensor `name`'s stored words/bytes in place: `edit(raw array)`."""
    def make(d):
        values = raw(d, name)
        edit(values)
        poke(d, name, values)
    return make


def shards(d):
    return sorted(p for p in d.glob("*.safetensors"))


def no_weights_but_a_directory(d):
    for f in shards(d) + [d / INDEX_NAME]:
        f.unlink()
    (d / "model.safetensors").mkdir()


def deep_header(d):
    header = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    write(d, shards(d)[0].name, len(header).to_bytes(8, "little") + header)


def truncated_shard(d):
    write(d, shards(d)[-1].name, shards(d)[-1].read_bytes()[:-1000])


def missing_shard(d):
    shards(d)[1].unlink()


def setitem(key, value):
    def edit(a):
        a[key] = value
    return edit


def fill(value):
    def edit(a):
        a[...] = value
    return edit


CASES = [
    # config.json: types before values, and files that are no JSON object
    ("compress-ratios-an-int", config(compress_ratios=5), READ,
     "config field 'compress_ratios': expected a list of integers, got an integer 5"),
    ("rope-scaling-a-string", config(rope_scaling="x"), READ,
     "config field 'rope_scaling': expected an object or null, got a string 'x'"),
    ("rope-dim-a-string", config(qk_rope_head_dim="64"), READ,
     "config field 'qk_rope_head_dim': expected an integer, got a string '64'"),
    ("rope-theta-negative", config(rope_theta=-1), READ,
     "config field 'rope_theta': must be a finite number > 1, got -1"),
    ("eps-null", config(rms_norm_eps=None), READ, "config field 'rms_norm_eps': expected a number, got null"),
    ("config-an-array", file("config.json", b"[1, 2]"), READ, "config.json: holds a list [1, 2], not a JSON object"),
    ("config-not-utf8", file("config.json", b'{"x": "\xff"}'), READ, "config.json: not UTF-8 text (byte 7 is 0xff)"),
    ("config-100k-deep", file("config.json", b"[" * 100_000 + b"]" * 100_000), READ,
     "config.json: JSON nested too deeply to be a config"),
    # safetensors files and headers
    ("tensor-missing", lambda d: rewrite(d, lambda t: t.pop("layers.3.attn.wkv.weight")), READ,
     ": 1 problem: missing: layers.3.attn.wkv.weight (expected F8_E4M3 [128, 256])"),
    ("tensor-wrong-dtype", lambda d: rewrite(d, lambda t: t.update({"norm.weight": ("F32", np.ones(256, np.float32))})),
     READ, ": 1 problem: wrong dtype: norm.weight: expected BF16, found F32"),
    ("safetensors-a-directory", no_weights_but_a_directory, READ,
     "neither model.safetensors.index.json nor any *.safetensors file (model.safetensors is not a file)"),
    ("header-100k-deep", deep_header, READ, "safetensors: bad header: header JSON is nested too deeply"),
    ("shard-truncated", truncated_shard, READ, "safetensors: truncated: its header needs"),
    ("shard-missing", missing_shard, READ, "safetensors', which does not exist ("),
    ("index-not-json", file(INDEX_NAME, b"{oops"), READ,
     f"{INDEX_NAME}: not a valid safetensors index (JSONDecodeError"),
    # values: NaN / Inf in float tensors, scales and FP8 codes
    ("nan-norm", tensor("norm.weight", setitem(3, 0x7FC0)), VALUES,
     ": 1 problem: non-finite: norm.weight: 1 of 256 values are NaN or Inf, the first at [3]"),
    ("inf-head", tensor("head.weight", fill(0x7F80)), VALUES,
     ": 1 problem: non-finite: head.weight: 262144 of 262144 values are NaN or Inf, the first at [0, 0]"),
    ("e8m0-scale-0xff", tensor("layers.1.attn.wq_a.scale", setitem((0, 1), 0xFF)), VALUES,
     ": 1 problem: non-finite: layers.1.attn.wq_a.scale: 1 of 2 values are NaN or Inf, the first at [0, 1]"),
    ("fp8-nan-code", tensor("layers.0.attn.wkv.weight", setitem((5, 7), 0x7F)), VALUES,
     ": 1 problem: non-finite: layers.0.attn.wkv.weight: 1 of 32768 values are NaN or Inf, the first at [5, 7]"),
    # the tokenizer
    ("tokenizer-corrupt", file("tokenizer.json", b"{garbage"), READ,
     "tokenizer.json: not a tokenizer.json file (Expecting"),
    ("tokenizer-not-utf8", file("tokenizer.json", b"\xff\xfe{}"), READ,
     "tokenizer.json: not a tokenizer.json file (not UTF-8 text)"),
    # finite weights or config numbers whose logits overflow: only a run can tell
    ("head-overflows", tensor("head.weight", fill(0x7F7F)), RUN,
     "the model produced NaN or Inf logits: its weights or the numbers in its config.json are broken; scan the "
     "weights with: dsv4 info --check --model "),
    ("routing-overflows", config(routed_scaling_factor=1e300), RUN, "the model produced NaN or Inf logits"),
]


@pytest.fixture(scope="module")
def broken(tmp_path_factory, tiny_dir):
    """case id → a broken copy of the tiny checkpoint, made once per module."""
    made = {}

    def get(case):
        name, make = case[0], case[1]
        if name not in made:
            d = linked_copy(tiny_dir, tmp_path_factory.mktemp("broken") / name)
            make(d)
            made[name] = d
        return made[name]
    return get


def command(name: str, d) -> list:
    if name.startswith("generate/"):
        return ["generate", "hello", "-n", 2, "--context", 64, "--backend", name.split("/")[1], "--model", d]
    return [*name.split(), "--model", d]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_broken_checkpoint_is_named_in_one_line(case, broken, dsv4_cli):
    _, _, found_by, fragment = case
    d = broken(case)
    lines = set()
    for name in COMMANDS:
        if name == "generate/mlx":
            pytest.importorskip("mlx.core")
        r = dsv4_cli(*command(name, d))
        if name not in FOUND_BY[found_by]:
            assert r.exit_code == 0, (name, r.output)
            continue
        assert r.exit_code == 3, (name, r.output)
        line = error_line(r)
        assert line.startswith("error: ") and fragment in line, (name, line)
        lines.add(line)
        if name.startswith("generate"):
            assert r.stdout == ""
    assert len(lines) == 1, lines                 # the same words from every command that finds it


def test_many_problems_keep_the_count_and_the_first_three(broken, dsv4_cli):
    """The CLI used to print only the headline: "… (1 problems): (+1 more problems)"."""
    case = next(c for c in CASES if c[0] == "shard-missing")
    d = broken(case)
    r = dsv4_cli("info", "--model", d, "--json")
    assert r.exit_code == 3
    problems = json.loads(r.stdout)["problems"]
    assert len(problems) > 10 and "which does not exist" in problems[0]
    line = error_line(r)
    assert line == (f"error: checkpoint {d}: {len(problems)} problems: {'; '.join(problems[:3])}; "
                    f"and {len(problems) - 3} more")
    table = dsv4_cli("info", "--model", d)                   # what it could read is still shown
    assert table.exit_code == 3 and "memory estimate" in table.stdout
    assert f"problems ({len(problems)})" in table.stdout and "--json lists them all" in table.stdout


def test_info_counts_only_what_the_checkpoint_holds(broken, dsv4_cli, tiny_dir):
    d = broken(next(c for c in CASES if c[0] == "tensor-missing"))
    r = dsv4_cli("info", "--model", d, "--json")
    assert r.exit_code == 3
    full = json.loads(dsv4_cli("info", "--model", tiny_dir, "--json").stdout)
    got = json.loads(r.stdout)
    assert full["problems"] == []
    assert got["problems"] == ["missing: layers.3.attn.wkv.weight (expected F8_E4M3 [128, 256])"]
    assert got["weight_bytes"]["F8_E4M3"] == full["weight_bytes"]["F8_E4M3"] - 128 * 256


def test_info_check_needs_weights_in_the_official_layout(dsv4_cli):
    r = dsv4_cli("info", "--model", "flash", "--check")
    assert r.exit_code == 2
    assert error_line(r) == "error: --check scans a checkpoint in the official layout; this preset has no weights here"


@pytest.mark.parametrize("command", [["generate", "hi", "-n", 1], ["info"]])
def test_an_unusable_cache_for_the_demo_is_one_line(dsv4_cli, tmp_path, command):
    blocker = tmp_path / "cache-file"
    blocker.write_text("")
    r = dsv4_cli(*command, env={"DSV4_CACHE": str(blocker)})
    assert r.exit_code == 3
    assert error_line(r) == (f"error: cannot build the demo model in the cache {blocker} (it is not a directory); "
                             f"set DSV4_CACHE to a writable directory")
    assert os.listdir(tmp_path) == ["cache-file"]
