"""Straightforward references the tests compare the solver against.

`paper_prune` is the SparseGPT authors' published ``fasterprune`` (and GPTQ's
quantizer), rewritten as a function of tensors with nothing else changed except an
optional explicit per-block prune count. `naive_obs` is the slow textbook OBS
update with an explicit inverse of the remaining columns' Hessian at every step.
"""

from __future__ import annotations

import torch


def ref_quant_params(W: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """GPTQ's Quantizer.find_params(weight=True), per channel, asymmetric, no MSE search."""
    maxq = 2**bits - 1
    xmin = torch.minimum(W.min(1)[0], torch.zeros(W.shape[0]))
    xmax = torch.maximum(W.max(1)[0], torch.zeros(W.shape[0]))
    tmp = (xmin == 0) & (xmax == 0)
    xmin[tmp] = -1
    xmax[tmp] = +1
    scale = (xmax - xmin) / maxq
    zero = torch.round(-xmin / scale)
    return scale.unsqueeze(1), zero.unsqueeze(1), maxq


def ref_quantize(x, scale, zero, maxq):
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


def paper_prune(W, H, sparsity, prunen=0, prunem=0, blocksize=128, percdamp=0.01, wbits=0, block_counts=None):
    """The authors' fasterprune. ``block_counts`` replaces the threshold rule by exact counts."""
    W = W.clone().float()
    rows, columns = W.shape
    quant = ref_quant_params(W, wbits) if wbits else None
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Losses = torch.zeros(rows)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    full_mask = torch.zeros_like(W, dtype=torch.bool)
    for b, i1 in enumerate(range(0, columns, blocksize)):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            if block_counts is None:
                thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
                mask1 = tmp <= thresh
            else:
                mask1 = torch.zeros(tmp.numel(), dtype=torch.bool)
                mask1[torch.topk(tmp.flatten(), block_counts[b], largest=False)[1]] = True
                mask1 = mask1.reshape(tmp.shape)
        else:
            mask1 = torch.zeros_like(W1) == 1
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i : (i + prunem)] ** 2 / (torch.diag(Hinv1)[i : (i + prunem)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            if quant is not None:
                scale, zero, maxq = quant
                q = ref_quantize(q.unsqueeze(1), scale, zero, maxq).flatten()
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d**2
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        full_mask[:, i1:i2] = mask1
        Losses += torch.sum(Losses1, 1) / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W, full_mask, float(Losses.sum())


def naive_obs(W, H, mask, percdamp=0.01):
    """Textbook OBS with a fixed mask: eliminate columns left to right in float64.

    For column j, every pruned weight ``w_j`` is removed with the optimal update of the
    remaining columns F = j..cols-1: ``w_F -= w_j / [H_F⁻¹]_00 · [H_F⁻¹]_0,:``.
    """
    W = W.double().clone()
    H = H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype)
    cols = W.shape[1]
    for j in range(cols):
        HinvF = torch.linalg.inv(H[j:, j:])
        pruned = mask[:, j]
        err = W[pruned, j] / HinvF[0, 0]
        W[pruned, j:] -= err.unsqueeze(1) * HinvF[0].unsqueeze(0)
        W[pruned, j] = 0
    return W
