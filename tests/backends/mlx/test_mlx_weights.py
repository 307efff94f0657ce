"""The MLX weight stores hold exactly what `backends.catalog` declares (the memory estimate's source)."""

import pytest

import dsv4
from dsv4.backends.catalog import HOLDINGS
from dsv4.backends.mlx.convert import convert
from dsv4.portable.weights import held_bytes


@pytest.mark.parametrize("name", ["tiny", "tiny2"])
def test_held_bytes_match_the_loaded_store(ckpt, tmp_path, name):
    cfg = dsv4.ModelConfig.from_file(ckpt(name))
    want = held_bytes(cfg, HOLDINGS["mlx"], "float32")
    assert dsv4.load(ckpt(name), backend="mlx", context=64).runner.weights.nbytes() == want
    converted = convert(ckpt(name), tmp_path / "mlx")
    assert dsv4.load(converted, backend="mlx", context=64).runner.weights.nbytes() == want
