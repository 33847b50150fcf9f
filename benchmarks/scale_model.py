"""A FLOP and byte model of this code's prune, eval and tasks stages, for bench_scale.py.

It projects wall time, memory, disk and I/O of `sparsegpt prune` (and of `eval`) on
one GPU from a model's shape, and predicts the same for the CPU run bench_scale.py
measures, with rates measured on this machine at run time (`cpu_rates`), so the
printed prediction can be held against the measured block time. Per decoder block,
with T = nsamples x seqlen tokens, L = seqlen, d = hidden size, a = attention width
(q_proj's rows), linear i of shape (r_i, c_i), P = sum r_i c_i, G = the distinct
linear inputs (layers fed the same tensor share one fp32 Hessian: q/k/v and gate/up,
so 4 per Llama or OPT block; found by a meta-device forward pass with hooks), and
e = bytes per element of the compute dtype (fp32 = 4 on the CPU, the checkpoint's half
precision = 2 on a GPU, stages.model.models.compute_dtype):

| quantity            | model                                          | where in the code                              |
|---------------------|------------------------------------------------|------------------------------------------------|
| forward FLOPs       | 2 passes x (2 P T + 4 T L a)                   | collect_hessians runs the dense block (stops at the last linear's input), then forward_to_shards the pruned one |
| Hessian FLOPs, fp32 | sum_g 2 T c_g^2                                | HessianCollector: accumulate_hessian once per distinct input |
| inverse FLOPs, fp32 | sum_g 2/3 c_g^3 at the factorization rate      | hessian_inverse per distinct input g (cholesky, triangular inverse; linears sharing H share it) |
| lazy updates, fp32  | sum_i r_i c_i^2                                | sparsegpt_prune: W[:, i2:] -= Err1 Hinv[i1:i2, i2:] after each block of 128 columns |
| column loop         | sum_i (c_i column_s + r_i c_i elem_s)          | _solve_block: a few small kernels per column (on a CPU each column contiguous) |
| stats FLOPs, fp32   | sum_i r_i c_i^2                                | solved_error: W U^-1, a triangular solve with the solve's factor (the numerator from the solve's loss, with H only where damping dominates it; not in the records' solve seconds) |
| boundary B          | T d e bytes                                    | ShardWriter(dtype = compute dtype), Arrow shards |
| boundary traffic    | read 2B (two passes, mmap), write B            | iter_batches, ShardWriter |
| hashed (sha256)     | B + 2 P per block, non-block tensors once      | write_record hashes a file once per process (rundir.sha256_file remembers it): the boundary and the block file (checkpoint dtype, 2 bytes) when written; model.json's linked shards are the block files |
| device memory       | P e + max_i (4 sum of the c_g^2 still needed at linear i + 4 (2 r_i c_i + 2 c_i^2)) + batch intermediates b L (4 d + 3 f) e | block, collector.H (a Hessian freed after its last linear), hessian_inverse (two c^2 at a time), W copy and mask |
| host RAM            | HOST_BASE + max(2B, B + P e)                   | capture_inputs holds the batches and their cat; later a mapped boundary and save_block's CPU copy |
| run-dir disk        | blocks/ (2 P per block) + the non-block tensors + (keep_acts + 1) B | prune_old(keep_last) runs after the next boundary is written; model/ hard-links the block files |

eval (perplexity, block by block): one forward pass over its windows, the hidden states of
all windows in host RAM (2B while capturing), the checkpoint read once, nothing written.
tasks (block by block, stages.evaluate.tasks.blockwise): TASK_TOKENS input tokens as tries, their
hidden states in groups of at most 1 GiB, each group one walk through the checkpoint.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, OPTConfig, PretrainedConfig

from benchmarks.scale_ckpt import meta_model, tensor_layout

GIB = 1 << 30
TASK_TOKENS = 150_000
"""Tokens a zero-shot task puts through the model as tries (PIQA's 1838 validation items, ~80 each)."""
TASK_GROUP_BYTES = 1 << 30  # stages.evaluate.tasks.blockwise.MAX_BYTES
# Assumed machines (stated, not measured): dense half-precision and fp32 (no TF32: torch's default
# for float32 matmuls) peak rates, memory, and the host around the GPU.
GPUS = {
    "a100-80gb": {"half_tflops": 312.0, "fp32_tflops": 19.5, "hbm_tbps": 2.0, "mem_gib": 80},
    "h100-80gb": {"half_tflops": 989.0, "fp32_tflops": 67.0, "hbm_tbps": 3.35, "mem_gib": 80},
}
EFFICIENCY = 0.5  # fraction of peak the large matmuls reach
GPU_COLUMN_S = 30e-6  # seconds per weight column of the OBS loop (~5 kernel launches)
GPU_ELEM_BYTES = 128  # HBM bytes moved per weight element by the column loop (16 columns per sub-block, read+write)
HOST = {
    "ram_gib": 256,
    "disk_gib": 1024,
    "disk_gbps": 2.0,
    "pcie_gbps": 25.0,
    "sha_gbps": 1.0,
    "base_gib": 3.0,
    "time_budget_h": 24.0,
}
# The projected models (their Hub configs, their own vocabularies).
PROJECTED: dict[str, tuple[type[PretrainedConfig], dict, int]] = {
    "llama2-70b": (
        LlamaConfig,
        dict(
            hidden_size=8192,
            intermediate_size=28672,
            num_attention_heads=64,
            num_key_value_heads=8,
            vocab_size=32000,
            tie_word_embeddings=False,
        ),
        80,
    ),
    "opt-175b": (
        OPTConfig,
        dict(
            hidden_size=12288,
            ffn_dim=49152,
            num_attention_heads=96,
            word_embed_proj_dim=12288,
            vocab_size=50272,
            max_position_embeddings=2048,
            enable_bias=True,
        ),
        96,
    ),
}


@dataclass(frozen=True)
class Linear:
    name: str
    rows: int
    cols: int
    owner: str
    """The layer whose input (and Hessian) this one shares; itself if none."""


@dataclass(frozen=True)
class Shape:
    """What the model needs of a checkpoint: one block's linears, and parameter counts."""

    layers: int
    hidden: int
    ffn: int
    attn: int
    linears: tuple[Linear, ...]
    block_params: int
    """All parameters of one block (linears, biases, norms)."""
    other_params: int
    """Embeddings, final norm, untied head."""

    @property
    def P(self) -> int:
        return sum(li.rows * li.cols for li in self.linears)

    @property
    def total_params(self) -> int:
        return self.layers * self.block_params + self.other_params


def shape_of(cfg: PretrainedConfig) -> Shape:
    """The Shape of `cfg`: one block on the meta device, its linears and which share an input."""
    from stages.model.blocks import find_blocks, find_layers, get_weight

    layers = cfg.num_hidden_layers
    one = cfg.__class__(**{**cfg.to_dict(), "num_hidden_layers": 1})
    model = meta_model(one)
    _, blocks = find_blocks(model)
    found = find_layers(blocks[0])
    owner: dict[str, str] = {}
    seen: dict[int, tuple[torch.Tensor, str]] = {}

    def hook(name: str):
        def record(_m: torch.nn.Module, args: tuple) -> None:
            x = args[0]
            owner[name] = seen.setdefault(id(x), (x, name))[1]  # holding x keeps its id unique

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in found.items()]
    model(input_ids=torch.zeros(1, 8, dtype=torch.long, device="meta"))
    for h in handles:
        h.remove()
    linears = tuple(Linear(n, *get_weight(m).shape, owner=owner[n]) for n, m in found.items())
    block = sum(p.numel() for p in blocks[0].parameters())
    total = sum(math.prod(s) for _, s in tensor_layout(model))
    attn = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    return Shape(layers, cfg.hidden_size, max(li.rows for li in linears), attn, linears, block, total - block)


@dataclass(frozen=True)
class Work:
    """One block's work in the prune stage."""

    fwd: float
    hess: float
    inverse: float
    lazy: float
    stats: float
    columns: int
    elements: int
    boundary: int
    block_bytes: int
    """One block in the compute dtype (in memory)."""
    block_bytes_stored: int
    """One block in the checkpoint's dtype (its file in blocks/, linked into model/)."""


def block_work(s: Shape, nsamples: int, seqlen: int, e: int, passes: int = 2) -> Work:
    T = nsamples * seqlen
    return Work(
        fwd=passes * (2 * s.P * T + 4 * T * seqlen * s.attn),
        hess=sum(2 * T * li.cols**2 for li in s.linears if li.owner == li.name),
        inverse=sum(2 / 3 * li.cols**3 for li in s.linears if li.owner == li.name),
        lazy=sum(li.rows * li.cols**2 for li in s.linears),
        stats=sum(li.rows * li.cols**2 for li in s.linears),
        columns=sum(li.cols for li in s.linears),
        elements=s.P,
        boundary=T * s.hidden * e,
        block_bytes=s.block_params * e,
        block_bytes_stored=s.block_params * 2,
    )


def block_seconds(w: Work, r: dict[str, float]) -> dict[str, float]:
    """Seconds of one prune block by cause, at rates `r` (FLOP/s, s/column, s/element, bytes/s; 0 = free)."""

    def io(n, rate):
        return n / rate if rate else 0.0

    return {
        "forward": w.fwd / r["half_flops"],
        "hessians": w.hess / r["fp32_flops"],
        "solve": w.inverse / r["fact_flops"]
        + w.lazy / r["fp32_flops"]
        + w.columns * r["column_s"]
        + w.elements * r["elem_s"],
        "stats": w.stats / r["fp32_flops"],
        "sha256": io(w.boundary + w.block_bytes_stored, r["sha_bps"]),
        "disk+link": io(w.block_bytes + w.boundary, r["disk_bps"]) + io(3 * w.boundary, r["link_bps"]),
    }


def gpu_rates(gpu: str) -> dict[str, float]:
    g = GPUS[gpu]
    fp32 = g["fp32_tflops"] * 1e12 * EFFICIENCY
    return {
        "half_flops": g["half_tflops"] * 1e12 * EFFICIENCY,
        "fp32_flops": fp32,
        "fact_flops": fp32,
        "column_s": GPU_COLUMN_S,
        "elem_s": GPU_ELEM_BYTES / (g["hbm_tbps"] * 1e12 * EFFICIENCY),
        "sha_bps": HOST["sha_gbps"] * 1e9,
        "disk_bps": HOST["disk_gbps"] * 1e9,
        "link_bps": HOST["pcie_gbps"] * 1e9,
    }


def _seconds(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def cpu_rates(threads: int) -> dict[str, float]:
    """This machine's rates, measured now (~5 s): fp32 matmul, Hessian inverse, the OBS loop per column and per
    element (from sparsegpt_prune at 8 and 1024 rows), sha256; file I/O goes through the page cache: free."""
    from sparsegpt import hessian_inverse, sparsegpt_prune

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, n, t0 = torch.randn(1024, 1024), 0, time.perf_counter()
    while time.perf_counter() - t0 < 1.0:
        a @ a
        n += 1
    flops = n * 2 * 1024**3 / (time.perf_counter() - t0)
    X = torch.randn(8192, 4096)  # (tokens, cols)
    fact = 2 / 3 * 4096**3 / _seconds(hessian_inverse, X.T @ X)
    H = X[:, :2048].T @ X[:, :2048]
    t_inv = _seconds(hessian_inverse, H)
    loop = {
        rows: _seconds(sparsegpt_prune, torch.randn(rows, 2048), H, 0.5) - t_inv - rows * 2048**2 / flops
        for rows in (8, 1024)
    }
    elem_s = max(loop[1024] - loop[8], 0.0) / (1016 * 2048)
    torch.set_num_threads(before)
    buf = bytes(256 << 20)
    sha = len(buf) / _seconds(lambda: hashlib.sha256(buf).hexdigest())
    return {
        "half_flops": flops,
        "fp32_flops": flops,
        "fact_flops": fact,
        "column_s": max(loop[8] / 2048 - 8 * elem_s, 0.0),
        "elem_s": elem_s,
        "sha_bps": sha,
        "disk_bps": 0.0,
        "link_bps": 0.0,
    }


def device_bytes(s: Shape, e: int, batch: int, seqlen: int) -> int:
    """Device memory of one prune block: weights, the Hessians still needed at the costliest linear and its
    solve workspace, a batch."""
    last = {li.owner: k for k, li in enumerate(s.linears)}  # a Hessian is freed after its last linear

    def at(k: int) -> int:
        li = s.linears[k]
        alive = sum(
            4 * s.linears[j].cols ** 2 for j, x in enumerate(s.linears) if x.owner == x.name and last[x.name] >= k
        )
        return alive + 4 * (2 * li.rows * li.cols + 2 * li.cols**2)

    intermediates = batch * seqlen * (4 * s.hidden + 3 * s.ffn) * e
    return s.block_params * e + max(at(k) for k in range(len(s.linears))) + intermediates


def _per(n: float, rate: float) -> float:
    return n / rate if rate else 0.0


def project_prune(
    s: Shape, rates: dict[str, float], e: int, nsamples: int, seqlen: int, batch: int = 8, keep_acts: int = 2
) -> dict:
    """Figures of `sparsegpt prune` (no evaluation) of shape `s` at `rates`, compute dtype of `e` bytes.

    Off the CPU the block runs on the device and the host holds the boundary and save_block's copy;
    on the CPU (`e` = 4) device_bytes is the host's working set beyond the interpreter and libraries."""
    w = block_work(s, nsamples, seqlen, e)
    per_block = block_seconds(w, rates)
    ckpt = s.total_params * 2
    blocks = s.layers * w.block_bytes_stored  # in the checkpoint's dtype; model/ links them
    rest = s.other_params * 2  # the non-block tensors, streamed into model/
    assembly = _per(2 * rest, rates["disk_bps"]) + _per(rest, rates["sha_bps"])
    return {
        "per_block_s": per_block,
        "wall_s": s.layers * sum(per_block.values()) + assembly,
        "device_bytes": device_bytes(s, e, min(batch, nsamples), seqlen),
        "host_bytes": int(HOST["base_gib"] * GIB + max(2 * w.boundary, w.boundary + w.block_bytes)),
        "disk_run_bytes": blocks + rest + (keep_acts + 1) * w.boundary,
        "ckpt_bytes": ckpt,
        "read_bytes": ckpt + s.layers * 2 * w.boundary + rest,
        "written_bytes": s.layers * w.boundary + blocks + rest,
        "hashed_bytes": s.layers * (w.boundary + w.block_bytes_stored) + rest,
        "boundary_bytes": w.boundary,
    }


def project_eval(s: Shape, rates: dict[str, float], e: int, nsamples: int, seqlen: int, batch: int = 4) -> dict:
    """Figures of block-by-block perplexity over nsamples windows of seqlen."""
    w = block_work(s, nsamples, seqlen, e, passes=1)
    ckpt = s.total_params * 2
    wall = (
        s.layers * w.fwd / rates["half_flops"]
        + _per(ckpt, rates["disk_bps"])
        + _per(2 * s.layers * w.boundary, rates["link_bps"])
    )
    return {
        "wall_s": wall,
        "device_bytes": s.block_params * e + min(batch, nsamples) * seqlen * (4 * s.hidden + 3 * s.ffn) * e,
        "host_bytes": int(HOST["base_gib"] * GIB + 2 * w.boundary),
        "disk_run_bytes": 0,
        "ckpt_bytes": ckpt,
        "read_bytes": ckpt,
        "written_bytes": 0,
        "hashed_bytes": 0,
        "boundary_bytes": w.boundary,
    }


def project_tasks(
    s: Shape, rates: dict[str, float], e: int, tokens: int = TASK_TOKENS, batch_tokens: int = 4096
) -> dict:
    """Block-by-block task scoring of `tokens` input tokens: groups of at most 1 GiB of hidden states,
    each a walk through every block (the checkpoint read once per group)."""
    hidden = tokens * s.hidden * e
    groups = max(1, math.ceil(hidden / TASK_GROUP_BYTES))
    ckpt = s.total_params * 2
    flops = 2 * s.layers * s.P * tokens
    wall = flops / rates["half_flops"] + groups * (_per(ckpt, rates["disk_bps"]) + _per(2 * hidden, rates["link_bps"]))
    return {
        "wall_s": wall,
        "device_bytes": s.block_params * e + s.other_params * e + batch_tokens * (4 * s.hidden + 3 * s.ffn) * e,
        "host_bytes": int(HOST["base_gib"] * GIB + min(hidden, TASK_GROUP_BYTES) + s.other_params * e),
        "disk_run_bytes": 0,
        "ckpt_bytes": ckpt,
        "read_bytes": groups * ckpt,
        "written_bytes": 0,
        "hashed_bytes": 0,
    }


def binding(fig: dict, gpu: str) -> str:
    """Which resource runs out first, in the order the stage meets them (host load, device, disk, time)."""
    need = [
        ("host RAM", fig["host_bytes"], HOST["ram_gib"] * GIB),
        ("GPU memory", fig["device_bytes"], GPUS[gpu]["mem_gib"] * GIB),
        ("disk", fig["disk_run_bytes"] + fig["ckpt_bytes"], HOST["disk_gib"] * GIB),
        ("time", fig["wall_s"] or 0.0, HOST["time_budget_h"] * 3600),
    ]
    for name, n, budget in need:
        if n > budget:
            return f"{name} runs out ({n / budget:.2f}x the budget)"
    name, n, budget = max(need, key=lambda t: t[1] / t[2])
    return f"none runs out; tightest: {name} at {100 * n / budget:.0f}%"
