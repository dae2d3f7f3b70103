"""GPTQ and SparseGPT do what they are for: less output error than rounding or magnitude pruning on the
same layer and calibration inputs, on compressed-tensors' grid, with exactly the sparsity asked."""

from __future__ import annotations

import torch

from raylm.compression import gptq as G


def _layer(seed: int = 0):
    torch.manual_seed(seed)
    w = torch.randn(96, 128)
    # correlated inputs with a few loud channels, as activations are: where GPTQ's feedback pays off
    x = torch.randn(2048, 32) @ torch.randn(32, 128) + 0.1 * torch.randn(2048, 128)
    x[:, :4] *= 8
    return w, x, 2 * x.T @ x / len(x)


def _err(w, q, x) -> float:
    return float(((w - q) @ x.T).pow(2).mean())


def test_gptq_beats_round_to_nearest_and_stays_on_the_grid():
    w, x, h = _layer()
    grid = G.Grid(4, 32)
    q, scales = G.gptq(w, h, grid)
    assert scales.shape == (96, 4)
    rtn = torch.cat([grid.fake_quantize(g, grid.scale(g)) for g in w.split(32, dim=1)], dim=1)
    assert _err(w, q, x) < 0.7 * _err(w, rtn, x)
    ints = q / scales.repeat_interleave(32, dim=1)
    assert (
        torch.allclose(ints, ints.round(), atol=1e-4) and ints.round().min() >= -8 and ints.round().max() <= 7
    )


def test_sparsegpt_beats_magnitude_with_exact_sparsity():
    w, x, h = _layer(1)
    for n_of_m, sparsity in (((2, 4), 0.5), (None, 0.5), (None, 0.75)):
        s = G.sparsegpt(w, h, sparsity, n_of_m)
        m = G.magnitude(w, sparsity, n_of_m)
        assert (s == 0).float().mean() == sparsity == (m == 0).float().mean()
        assert _err(w, s, x) < _err(w, m, x)
        if n_of_m:
            assert ((s.reshape(96, -1, 4) == 0).sum(-1) == 2).all()
