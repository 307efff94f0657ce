"""Correctness ladder step 2 for the oracle itself: the cached, chunked graph agrees with an independent
brute-force implementation that recomputes every compressed entry per query (model spec §4.4 literally)."""

import numpy as np
import pytest

import dsv4
from dsv4.portable import quant
from dsv4.portable.checkpoint import Checkpoint
from dsv4.portable.tiny import ensure_tiny

from . import bruteforce


def dense_weights(path):
    """Every checkpoint tensor as float64 (quantized ones dequantized), keyed by official name."""
    ck = Checkpoint(path)
    names = set(ck.names())
    out = {}
    for n in names:
        if n.endswith(".scale"):
            continue
        if n.endswith(".weight") and n[:-7] + ".scale" in names:
            out[n] = quant.dequantize(ck.quant_weight(n[:-7]), np.float64)
        elif ck.spec(n).dtype == "I64":
            out[n] = np.asarray(ck.raw(n))
        else:
            out[n] = ck.array(n, np.float32).astype(np.float64)
    return out


@pytest.mark.parametrize("name,chunks", [("tiny", [260]), ("tiny2", [100, 1, 1, 130, 28])])
def test_graph_matches_bruteforce(name, chunks, rand_ids):
    path = ensure_tiny(name)
    model = dsv4.load(path, dtype="float64", context=512)
    ids = rand_ids(sum(chunks), seed=11)
    ref = bruteforce.bruteforce_logits(model.config, dense_weights(path), ids)
    state, outs, a = model.new_state(1), [], 0
    for n in chunks:
        logits, _ = model.runner.step(state, ids[None, a:a + n])
        outs.append(logits[0])
        a += n
    got = np.concatenate(outs)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-12
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_mtp_matches_bruteforce(tiny_dir, rand_ids):
    model = dsv4.load(tiny_dir, dtype="float64", context=512)
    ids = rand_ids(150, seed=5)
    ref = bruteforce.bruteforce_mtp_logits(model.config, dense_weights(tiny_dir), ids[:-1], ids[1:])
    _, streams = model.runner.step(model.new_state(1), ids[None, :-1])
    got = model.runner.mtp_step(model.runner.new_mtp_state(1), streams, ids[None, 1:])
    assert np.linalg.norm(got[0] - ref) / np.linalg.norm(ref) < 1e-12
