"""Constrained-decoding libraries on the official V4 tokenizer: setup cost, CPU cost per token, correctness.

For each library that is installed: the one-off tokenizer build, the compile of a realistic forced tool
call (DSML, `portable.constraints`) and of a `json_schema` response format, and the mean mask time per
token along a known-valid completion (which must pass) and along a random walk over the masks (what a
random-weight model writes).  llguidance is what `portable.constraints` uses; outlines-core is measured
on the JSON reply only (one regular expression per request, markup matched as text, not as the control
token); xgrammar likewise (its grammars name text, not token ids; it needs torch to import, so it is
measured where it is installed).  Prints a table and writes benchmarks/results/constraints.json.

    python benchmarks/constraints.py [--walk 200]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import time
from pathlib import Path

import numpy as np

from dsv4.portable import constraints
from dsv4.portable.encoding import load_tokenizer
from dsv4.portable.encoding.dsml import render_tool_calls
from dsv4.portable.encoding.pieces import Prompt
from dsv4.portable.encoding.requests import OutputRule

TOOL = {"name": "search_flights", "description": "Find flights", "parameters": {
    "type": "object", "required": ["origin", "destination", "date"], "additionalProperties": False,
    "properties": {"origin": {"type": "string"}, "destination": {"type": "string"},
                   "date": {"type": "string", "description": "YYYY-MM-DD"},
                   "passengers": {"type": "integer", "minimum": 1, "maximum": 9},
                   "cabin": {"type": "string", "enum": ["economy", "business", "first"]},
                   "filters": {"$ref": "#/$defs/Filters"}},
    "$defs": {"Filters": {"type": "object", "additionalProperties": False, "properties": {
        "max_stops": {"type": "integer", "minimum": 0, "maximum": 3},
        "airlines": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 4}}}}}}
CALL = {"origin": "Zürich", "destination": "Lima", "date": "2026-03-14", "passengers": 2,
        "filters": {"max_stops": 1, "airlines": ["LX", "LA"]}}
ANSWER = {"type": "object", "required": ["title", "rating", "tags"], "additionalProperties": False,
          "properties": {"title": {"type": "string", "maxLength": 40},
                         "rating": {"type": "number", "minimum": 0, "maximum": 5},
                         "tags": {"type": "array", "items": {"enum": ["fiction", "history", "science"]}},
                         "author": {"anyOf": [{"type": "string"}, {"type": "null"}]}}}
REPLY = {"title": "The Dawn of Everything", "rating": 4.5, "tags": ["history", "science"], "author": None}


XGRAMMAR_TOOL_NOTE = ("its grammars match text, not token ids: the DSML markup would match as the characters of "
                      "the control tokens, which the tokenizer can also spell with ordinary tokens")


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def walk_ms(mask, accept, ids) -> float:
    """Mean ms per token of mask + accept along `ids`, which every mask must allow."""
    t = time.perf_counter()
    for token in ids:
        if not mask()[token]:
            raise AssertionError(f"a valid completion's token {token} was masked")
        accept(token)
    return (time.perf_counter() - t) / len(ids) * 1e3


def random_walk_ms(mask, accept, done, steps: int, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    t, n = time.perf_counter(), 0
    while n < steps and not done():
        accept(int(rng.choice(np.flatnonzero(mask()))))
        n += 1
    return (time.perf_counter() - t) / max(n, 1) * 1e3


def llguidance_rows(tok, steps: int) -> list:
    vocab = tok.vocab_size
    _, tokenizer_s = timed(lambda: constraints._ll_tokenizer(tok))
    prompt = Prompt()
    render_tool_calls(prompt, [{"function": {"name": TOOL["name"], "arguments": CALL}}])
    cases = [("forced tool call (DSML)", OutputRule(tools=[TOOL], forced=True), tok.encode_prompt(prompt)),
             ("json_schema reply", OutputRule(schema=ANSWER), tok.encode(json.dumps(REPLY, ensure_ascii=False)))]
    rows = []
    for name, rule, ids in cases:
        c, compile_s = timed(lambda: constraints.build_constraint(rule, tok, vocab, "chat"))
        valid = walk_ms(c.mask, c.accept, ids)
        c = constraints.build_constraint(rule, tok, vocab, "chat")
        rows.append({"library": "llguidance", "case": name, "tokenizer_s": tokenizer_s, "compile_s": compile_s,
                     "valid_ms_per_token": valid, "random_ms_per_token":
                     random_walk_ms(c.mask, c.accept, lambda: c.finished, steps)})
    return rows


def outlines_rows(tok, steps: int) -> list:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    def vocabulary():
        by_bytes = {}
        for i in range(tok.vocab_size):
            if i != tok.eos_id:
                by_bytes.setdefault(tok.token_bytes(i), []).append(i)
        return Vocabulary(tok.eos_id, by_bytes)

    vocab, tokenizer_s = timed(vocabulary)
    index, compile_s = timed(lambda: Index(build_regex_from_schema(json.dumps(ANSWER)), vocab))

    def guide_fns(guide):
        def mask():
            allowed = np.zeros(tok.vocab_size + 1, dtype=bool)
            allowed[guide.get_tokens()] = True
            return allowed
        return mask, guide.advance, guide.is_finished

    mask, accept, _ = guide_fns(Guide(index))
    compact = json.dumps(REPLY, separators=(",", ":"), ensure_ascii=False)    # outlines' own whitespace
    valid = walk_ms(mask, accept, tok.encode(compact))
    mask, accept, done = guide_fns(Guide(index))
    return [{"library": "outlines-core", "case": "json_schema reply", "tokenizer_s": tokenizer_s,
             "compile_s": compile_s, "valid_ms_per_token": valid,
             "random_ms_per_token": random_walk_ms(mask, accept, done, steps)},
            {"library": "outlines-core", "case": "forced tool call (DSML)",
             "note": "one regular expression per request: the DSML markup would match as text, not as the "
                     "control token"}]


def xgrammar_rows(tok, steps: int) -> list:
    import xgrammar as xgr

    def masks(matcher):
        bitmask = xgr.allocate_token_bitmask(1, tok.vocab_size)

        def mask():
            matcher.fill_next_token_bitmask(bitmask)
            bits = bitmask.numpy().view(np.uint8)[0]
            return np.unpackbits(bits, count=tok.vocab_size, bitorder="little").astype(bool)
        return mask, matcher.accept_token, matcher.is_terminated

    def compiler():
        vocab = [tok.token_bytes(i) for i in range(tok.vocab_size)]
        info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW, vocab_size=tok.vocab_size,
                                 stop_token_ids=[tok.eos_id])
        return xgr.GrammarCompiler(info)

    comp, tokenizer_s = timed(compiler)
    compiled, compile_s = timed(lambda: comp.compile_json_schema(json.dumps(ANSWER), any_whitespace=False,
                                                                      separators=(",", ":")))
    mask, accept, _ = masks(xgr.GrammarMatcher(compiled))
    compact = json.dumps(REPLY, separators=(",", ":"), ensure_ascii=False)
    valid = walk_ms(mask, accept, tok.encode(compact))
    mask, accept, done = masks(xgr.GrammarMatcher(compiled))
    return [{"library": "xgrammar", "case": "json_schema reply", "tokenizer_s": tokenizer_s,
             "compile_s": compile_s, "valid_ms_per_token": valid,
             "random_ms_per_token": random_walk_ms(mask, accept, done, steps)},
            {"library": "xgrammar", "case": "forced tool call (DSML)", "note": XGRAMMAR_TOOL_NOTE}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--walk", type=int, default=200, help="random-walk tokens per case")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "constraints.json"))
    a = ap.parse_args()
    tok = load_tokenizer()
    rows = llguidance_rows(tok, a.walk)
    if importlib.util.find_spec("outlines_core"):
        rows += outlines_rows(tok, a.walk)
    else:
        rows.append({"library": "outlines-core", "note": "not installed"})
    if importlib.util.find_spec("xgrammar"):
        rows += xgrammar_rows(tok, a.walk)
    else:
        rows.append({"library": "xgrammar", "note": "not installed"})
    print(f"{'library':<14} {'case':<24} {'tokenizer s':>11} {'compile s':>10} {'valid ms/tok':>13} "
          f"{'random ms/tok':>14}")
    for r in rows:
        if "compile_s" in r:
            print(f"{r['library']:<14} {r['case']:<24} {r['tokenizer_s']:>11.2f} {r['compile_s']:>10.3f} "
                  f"{r['valid_ms_per_token']:>13.3f} {r['random_ms_per_token']:>14.3f}")
        else:
            print(f"{r['library']:<14} {r.get('case', ''):<24} {r['note']}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"tokenizer": "official V4", "vocab_size": tok.vocab_size,
                                       "machine": platform.machine(), "rows": rows}, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
