"""The training script runs the portable graph under autograd: a few steps on a smaller config lower
the loss, and the result writes a loadable official-layout checkpoint."""

from dataclasses import replace

import numpy as np
import pytest

import dsv4
from dsv4.portable.config import preset

torch = pytest.importorskip("torch")


def small():
    return replace(preset("demo"), hidden_size=64, num_hidden_layers=3, compress_ratios=(4, 128, 0, 0),
                   moe_intermediate_size=64, n_routed_experts=4)


def test_a_few_steps_lower_the_loss_and_export(trainer, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path / "ckpt"
    try:
        r = trainer.train(small(), steps=12, conversations=120, token_budget=768, lr=1e-2, qat=0.25,
                          log_every=3, out=out, log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    losses = [row["loss"] for row in r["curve"]]
    assert losses[-1] < 0.85 * losses[0], losses
    assert r["curve"][-1]["quantized"] and not r["curve"][0]["quantized"]
    model = dsv4.load(out, context=256)
    logits = model.forward(np.asarray(model.tokenizer.encode_messages([{"role": "user", "content": "Hi"}])))
    assert np.isfinite(logits).all() and logits.std() > 0
