"""GPTQ and SparseGPT on one Linear layer, from the Hessian of its calibration inputs.

Both solve the same layer-wise problem, min ||W X - W' X||² over the layer's calibration inputs X, with
the inverse Hessian H⁻¹ = (2 X Xᵀ + λI)⁻¹ taken once by Cholesky (Frantar et al., GPTQ 2022 and SparseGPT
2023): columns are processed left to right in blocks; each column is quantized (GPTQ) or has its
least important weights zeroed (SparseGPT), and the error this makes is pushed onto the columns not yet
processed, weighted by H⁻¹, so they compensate for it. The code follows the reference implementations
(IST-DASLab/gptq, IST-DASLab/sparsegpt).

The quantization grid is compressed-tensors' (symmetric: scale = absmax / ((qmax - qmin) / 2), zero
point 0), so the compressed-tensors writer re-quantizes these weights to exactly the same integers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 128  # columns updated together; the reference implementations' default


@dataclass(frozen=True)
class Grid:
    """A symmetric integer grid: num_bits, and group_size columns per scale (None: one per output row)."""

    num_bits: int
    group_size: int | None

    @property
    def qmin(self) -> int:
        return -(2 ** (self.num_bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.num_bits - 1) - 1

    def scale(self, w: torch.Tensor) -> torch.Tensor:
        """Per-row scale [rows, 1] of the columns in w (compressed-tensors' calculate_qparams, symmetric)."""
        absmax = w.abs().amax(dim=1, keepdim=True)
        scale = absmax / ((self.qmax - self.qmin) / 2)
        return torch.where(scale > 0, scale, torch.full_like(scale, torch.finfo(w.dtype).eps))

    def fake_quantize(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(w / scale), self.qmin, self.qmax) * scale


def inverse_hessian(h: torch.Tensor, w: torch.Tensor, dampening: float) -> torch.Tensor:
    """The upper Cholesky factor of H⁻¹ with dampening·mean(diag H) added to the diagonal. Inputs that
    were always zero (dead columns) get a unit diagonal and their weights are zeroed, as in GPTQ."""
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    damp = dampening * torch.mean(torch.diag(h))
    h += damp * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    h = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(h, upper=True)


@torch.no_grad()
def gptq(weight: torch.Tensor, h: torch.Tensor, grid: Grid, dampening: float = 0.01):
    """Quantize weight [out, in] with GPTQ. Returns (the dequantized weight, scales [out, groups])."""
    w = weight.detach().clone().float()
    rows, cols = w.shape
    hinv = inverse_hessian(h.float(), w, dampening)
    group = grid.group_size or cols
    q = torch.zeros_like(w)
    scales, scale = [], None
    for i1 in range(0, cols, BLOCK):
        i2 = min(i1 + BLOCK, cols)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(rows, i2 - i1), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group == 0:  # the group's scale, from its columns as updated so far
                ahead = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :group]
                scale = grid.scale(ahead)
                scales.append(scale)
            qcol = grid.fake_quantize(w1[:, i : i + 1], scale).flatten()
            q[:, col] = qcol
            err = (w1[:, i] - qcol) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q.to(weight.dtype), torch.cat(scales, dim=1)


@torch.no_grad()
def sparsegpt(
    weight: torch.Tensor,
    h: torch.Tensor,
    sparsity: float,
    n_of_m: tuple[int, int] | None,
    dampening: float = 0.01,
) -> torch.Tensor:
    """Prune weight [out, in] with SparseGPT: exactly `sparsity` of each row's weights per block (or n of
    every m consecutive inputs zeroed, for n:m), chosen by w² / [H⁻¹]²ᵢᵢ, the error pushed ahead."""
    w = weight.detach().clone().float()
    rows, cols = w.shape
    hinv = inverse_hessian(h.float(), w, dampening)
    for i1 in range(0, cols, BLOCK):
        i2 = min(i1 + BLOCK, cols)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(rows, i2 - i1), hinv[i1:i2, i1:i2]
        if n_of_m is None:
            mask = pruned_lowest(w1**2 / torch.diag(hinv1).reshape(1, -1) ** 2, sparsity)
        else:
            mask = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if n_of_m is not None and i % n_of_m[1] == 0:
                n, m = n_of_m
                chunk = w1[:, i : i + m] ** 2 / torch.diag(hinv1)[i : i + m].reshape(1, -1) ** 2
                mask[:, i : i + m].scatter_(1, torch.topk(chunk, n, dim=1, largest=False)[1], True)
            kept = torch.where(mask[:, i], torch.zeros_like(w1[:, i]), w1[:, i])
            err = (w1[:, i] - kept) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            w1[:, i] = kept
            err1[:, i] = err
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w.to(weight.dtype)


def pruned_lowest(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """A mask of the round(sparsity · n) lowest scores of each row."""
    k = round(sparsity * score.shape[1])
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k:
        mask.scatter_(1, torch.topk(score, k, dim=1, largest=False)[1], True)
    return mask


@torch.no_grad()
def magnitude(weight: torch.Tensor, sparsity: float, n_of_m: tuple[int, int] | None) -> torch.Tensor:
    """Zero the smallest-magnitude weights: `sparsity` of each row, or n of every m consecutive inputs."""
    w = weight.detach().clone()
    if n_of_m is None:
        mask = pruned_lowest(w.abs().float(), sparsity)
    else:
        n, m = n_of_m
        chunks = w.abs().float().reshape(w.shape[0], -1, m)
        mask = torch.zeros_like(chunks, dtype=torch.bool)
        mask.scatter_(2, torch.topk(chunks, n, dim=2, largest=False)[1], True)
        mask = mask.reshape(w.shape)
    w[mask] = 0
    return w
