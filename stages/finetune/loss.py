"""Sparsity masks and distillation losses of the mask-preserving fine-tune.

A mask is a bool tensor per parameter (True = weight kept), keyed by the parameter's
name in the student (`model.layers.0.mlp.up_proj.weight`) and shaped like it.
`derive_masks` reads them off the student's zeros for every prunable linear of the
decoder blocks; `mask_gradients` and `apply_masks` keep the pruned weights at exactly
zero around each optimizer step. `BlockOutputs` captures the hidden states each
decoder block returns (forward hooks), and `distill_losses` combines next-token CE,
the temperature-scaled logits KL to the teacher and SquareHead (Kurtic et al. 2023,
"Sparse Fine-tuning for Inference Acceleration of Large Language Models"): for each
block, MSE(student, teacher) / mean(teacher^2), summed over blocks.
"""

import torch
import torch.nn.functional as F
from torch import nn

from stages.model.blocks import block_output, find_blocks, find_layers

Masks = dict[str, torch.Tensor]


def derive_masks(model: nn.Module) -> Masks:
    """Keep-masks (weight != 0) of every prunable linear in the decoder blocks, by parameter name."""
    path, blocks = find_blocks(model)
    masks: Masks = {}
    for i, block in enumerate(blocks):
        for name, layer in find_layers(block).items():
            masks[f"{path}.{i}.{name}.weight"] = layer.weight.detach() != 0
    return masks


def check_masks(model: nn.Module, masks: Masks) -> dict[str, nn.Parameter]:
    """The student parameters the masks apply to; ValueError if a name or shape does not fit."""
    params = dict(model.named_parameters())
    out: dict[str, nn.Parameter] = {}
    for name, mask in masks.items():
        if name not in params:
            near = [p for p in params if p.endswith(name.split(".", 1)[-1])][:3]
            raise ValueError(
                f"mask {name!r} names no parameter of the student; masks are keyed by "
                f"model.named_parameters() names (close: {near})"
            )
        if mask.dtype != torch.bool or tuple(mask.shape) != tuple(params[name].shape):
            raise ValueError(
                f"mask {name!r} must be a bool tensor of shape {tuple(params[name].shape)} "
                f"(True = kept), got {mask.dtype} {tuple(mask.shape)}"
            )
        out[name] = params[name]
    return out


@torch.no_grad()
def apply_masks(params: dict[str, nn.Parameter], masks: Masks) -> None:
    """Zero every pruned weight in place (after the optimizer step: decay and momentum revive them)."""
    for name, p in params.items():
        p.mul_(masks[name])


@torch.no_grad()
def mask_gradients(params: dict[str, nn.Parameter], masks: Masks) -> None:
    """Zero the gradients of pruned weights in place (before clipping and the optimizer step)."""
    for name, p in params.items():
        if p.grad is not None:
            p.grad.mul_(masks[name])


class BlockOutputs:
    """Forward hooks that record each decoder block's output hidden states, in block order."""

    def __init__(self, model: nn.Module) -> None:
        _, blocks = find_blocks(model)
        self.outputs: list[torch.Tensor] = []
        self._handles = [b.register_forward_hook(self._hook) for b in blocks]

    def _hook(self, module: nn.Module, args: object, out: object) -> None:
        self.outputs.append(block_output(out))

    def take(self) -> list[torch.Tensor]:
        """The outputs recorded since the last call (one per block), clearing the record."""
        outputs, self.outputs = self.outputs, []
        return outputs

    def remove(self) -> None:
        """Detach the hooks."""
        for handle in self._handles:
            handle.remove()


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32: logits (b, L, V), ids (b, L)."""
    shift = logits[:, :-1, :].float()  # (b, L-1, V)
    return F.cross_entropy(shift.reshape(-1, shift.shape[-1]), ids[:, 1:].reshape(-1))


def kl_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), mean over positions, in fp32."""
    vocab = student.shape[-1]
    log_s = F.log_softmax(student.float().reshape(-1, vocab) / temperature, dim=-1)  # (b*L, V)
    log_t = F.log_softmax(teacher.float().reshape(-1, vocab) / temperature, dim=-1)  # (b*L, V)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="sum") / log_s.shape[0]
    return kl * temperature**2


def squarehead_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Sum over blocks of mean((s - t)^2) / mean(t^2), in fp32 (SquareHead, Kurtic et al. 2023)."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"need one output per block from both models, got {len(student)} and {len(teacher)}")
    total = student[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student, teacher, strict=True):
        t = t.float()
        total = total + F.mse_loss(s.float(), t) / t.pow(2).mean().clamp_min(1e-12)
    return total


def distill_losses(
    weights: tuple[float, float, float],
    temperature: float,
    ids: torch.Tensor,
    student: tuple[torch.Tensor, list[torch.Tensor]],
    teacher: tuple[torch.Tensor, list[torch.Tensor]] | None,
) -> dict[str, torch.Tensor]:
    """The weighted loss `total` and its terms `lm`, `kl`, `squarehead` (only those with weight > 0).

    `weights` is (lm, kl, squarehead); `student` and `teacher` are (logits, block outputs).
    """
    w_lm, w_kl, w_sq = weights
    terms: dict[str, torch.Tensor] = {}
    if w_lm > 0:
        terms["lm"] = lm_loss(student[0], ids)
    if (w_kl > 0 or w_sq > 0) and teacher is None:
        raise ValueError("kl and squarehead losses need a teacher; pass teacher_dir or set both weights to 0")
    if w_kl > 0 and teacher is not None:
        terms["kl"] = kl_loss(student[0], teacher[0], temperature)
    if w_sq > 0 and teacher is not None:
        terms["squarehead"] = squarehead_loss(student[1], teacher[1])
    scale = {"lm": w_lm, "kl": w_kl, "squarehead": w_sq}
    total = sum(scale[k] * v for k, v in terms.items())
    return {"total": total, **terms}
