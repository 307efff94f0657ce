"""The schema-driven weight store: roles pick the conversion, a backend supplies only conversions."""

import numpy as np
import pytest

import dsv4
from dsv4.portable import quant
from dsv4.portable.checkpoint import Checkpoint, weight_schema
from dsv4.portable.reference import NumpyOps, NumpyWeights
from dsv4.portable.runtime import GraphRunner, Model
from dsv4.portable.weights import Holding, held_bytes


@pytest.fixture(scope="module")
def store(tiny_dir):
    cfg = dsv4.ModelConfig.from_file(tiny_dir)
    return NumpyWeights(cfg, Checkpoint(tiny_dir), np.float32)


def test_each_role_gets_its_conversion(store):
    cfg = store.cfg
    assert isinstance(store["layers.1.attn.wq_a.weight"], quant.QuantWeight)
    head = store["head.weight"]
    assert head.dtype == np.float32 and head.shape == (cfg.vocab_size, cfg.hidden_size) and np.abs(head).max() > 0
    ids = store["layers.0.ffn.gate.tid2eid"]
    assert ids.dtype == np.int64 and 0 <= ids.min() and ids.max() < cfg.n_routed_experts
    bank = store.experts("layers.1.ffn.experts.")
    assert len(bank) == cfg.n_routed_experts and all(len(e) == 3 for e in bank)
    assert bank[3][1].shape == (cfg.hidden_size, cfg.moe_intermediate_size)
    assert store.experts("layers.1.ffn.experts.") is bank                      # converted once


def test_names_outside_the_schema_are_refused(store):
    with pytest.raises(KeyError, match="'layers.1.attn.wq_a.scale' is not a tensor of this model's checkpoint"):
        store["layers.1.attn.wq_a.scale"]                                      # a scale is part of its linear
    with pytest.raises(KeyError, match="is not an expert bank"):
        store.experts("layers.1.attn.wq_a.weight")
    with pytest.raises(KeyError, match="is not a tensor"):
        store["layers.1.ffn.experts."]


class DenseWeights(NumpyWeights):
    """A backend that supplies only another linear conversion: dense float64 matrices."""

    def linear(self, prefix):
        return quant.dequantize(self.ckpt.quant_weight(prefix), np.float64)


def test_a_backend_supplies_only_conversions(tiny_dir, rand_ids):
    cfg = dsv4.ModelConfig.from_file(tiny_dir)
    ids = rand_ids(24, seed=19)
    want = dsv4.load(tiny_dir, dtype="float64", context=64).forward(ids, full_precision=True)
    runner = GraphRunner(cfg, NumpyOps("float64"), DenseWeights(cfg, Checkpoint(tiny_dir), np.float64))
    got = Model(cfg, runner, tiny_dir, "dense", "float64", 64).forward(ids, full_precision=True)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * np.abs(want).max())


def test_held_bytes_counts_each_role_as_declared(tiny_dir):
    cfg = dsv4.ModelConfig.from_file(tiny_dir)
    stored = sum(t.nbytes for e in weight_schema(cfg).values() for t in e.tensors)
    as_stored = Holding(plain="stored", fp32="stored", table=8)
    assert held_bytes(cfg, as_stored, "float32") == stored == Checkpoint(tiny_dir).nbytes()
    # float32 everywhere: BF16 tensors double, F32 ones stay; FP32 role alone also lifts head and gate
    plain32 = Holding(plain="float32", fp32="float32")
    bf16 = sum(t.nbytes for e in weight_schema(cfg).values() for t in e.tensors if t.dtype == "BF16")
    assert held_bytes(cfg, plain32, "float32") == stored + bf16
    lifted = 2 * cfg.vocab_size * cfg.hidden_size + 2 * cfg.n_routed_experts * cfg.hidden_size * (
        cfg.num_hidden_layers + cfg.num_nextn_predict_layers)
    assert held_bytes(cfg, Holding(plain="stored", fp32="float32"), "float32") == stored + lifted
    dense = held_bytes(cfg, Holding(linear="dense", plain="stored", fp32="stored"), "bfloat16")
    assert dense > stored                                 # FP8 → 2 bytes, FP4 (½ byte) → 2 bytes, no scales
