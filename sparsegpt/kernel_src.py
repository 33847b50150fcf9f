"""The Triton source of `sparsegpt.kernel`'s column loop (imported only when that kernel runs: it needs triton).

``column_loop_kernel`` is left undecorated so that `sparsegpt.kernel` can compile it for a GPU
(``triton.jit``) or wrap it for Triton's interpreter (CPU tensors, tests) in the same process.
One program runs every column of the block for ``BR`` rows held in registers.
"""

import triton.language as tl


def column_loop_kernel(
    W1,
    Err1,
    mask1,
    prior1,
    Hinv1,
    rows,
    count,
    stride_w,
    stride_p,
    stride_h0,
    stride_h1,
    BR: tl.constexpr,
    BC: tl.constexpr,
    N: tl.constexpr,
    M: tl.constexpr,
    HAS_PRIOR: tl.constexpr,
):
    r = tl.program_id(0) * BR + tl.arange(0, BR)  # (BR,) this program's rows
    c = tl.arange(0, BC)  # (BC,) the block's columns, padded to a power of two
    inside = (r < rows)[:, None] & (c < count)[None, :]  # (BR, BC)
    at = r[:, None] * stride_w + c[None, :]
    w = tl.load(W1 + at, mask=inside, other=0.0)  # (BR, BC)
    d = tl.load(Hinv1 + c * (stride_h0 + stride_h1), mask=c < count, other=1.0)  # (BC,) diag(Hinv1)
    inv_d = 1.0 / d
    pruned = tl.load(mask1 + at, mask=inside, other=0) != 0
    scaled = tl.where(pruned, inv_d[None, :], 0.0)  # (BR, BC) [pruned] / d: err_j = w_j * scaled_j
    if HAS_PRIOR:
        prior = tl.load(prior1 + r[:, None] * stride_p + c[None, :], mask=inside, other=0) != 0
    err = tl.zeros([BR, BC], dtype=tl.float32)
    for j in range(0, count):
        if M > 0:
            if j % M == 0:  # choose the group j .. j+M-1 on the weights updated so far
                group = ((c >= j) & (c < j + M))[None, :]
                score = w * w / (d * d)[None, :]
                if HAS_PRIOR:
                    score = tl.where(prior, float("-inf"), score)
                rank = tl.zeros([BR, BC], dtype=tl.int32)  # scores in the group ahead of each column's
                for t in tl.static_range(M):
                    st = tl.sum(tl.where((c == j + t)[None, :], score, 0.0), axis=1)[:, None]  # (BR, 1)
                    ahead = (st < score) | ((st == score) & (c > j + t)[None, :])
                    rank += ahead.to(tl.int32)
                chosen = group & (rank < N)
                if HAS_PRIOR:
                    chosen = chosen | (group & prior)
                scaled = tl.where(group, tl.where(chosen, inv_d[None, :], 0.0), scaled)
        col = (c == j)[None, :]
        w_j = tl.sum(tl.where(col, w, 0.0), axis=1)  # (BR,)
        e_j = w_j * tl.sum(tl.where(col, scaled, 0.0), axis=1)
        h = tl.load(Hinv1 + j * stride_h0 + c * stride_h1, mask=(c > j) & (c < count), other=0.0)
        w = w - e_j[:, None] * h[None, :]
        err = tl.where(col, e_j[:, None], err)
    pruned = scaled != 0.0
    tl.store(W1 + at, tl.where(pruned, 0.0, w), mask=inside)
    tl.store(Err1 + at, err, mask=inside)
    tl.store(mask1 + at, pruned.to(tl.uint8), mask=inside)
