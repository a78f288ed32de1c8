"""Pruning masks. torch.nn.utils.prune keeps weight = weight_orig * weight_mask, so pruned weights stay zero
through every later update (momentum and weight decay included) until make_pruning_permanent; plain_state_dict
folds the masks into the weights that a checkpoint stores."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
from torch.nn.utils import prune

from .errors import UserError
from .models import classifier_name


def prunable_modules(model: nn.Module, family: str) -> dict[str, nn.Module]:
    """Layers that pruning may touch: every conv (ResNet) or every block linear (ViT); never the head."""
    head = classifier_name(model)
    kind = nn.Conv2d if family == "resnet" else nn.Linear
    return {name: m for name, m in model.named_modules()
            if isinstance(m, kind) and name != head and not name.startswith("patch_embed")}


def check_sparsity(amount: float) -> None:
    if not 0 <= amount < 1:
        raise UserError(f"sparsity must be in [0, 1), got {amount}")


def structured_prune(model: nn.Module, family: str, amount: float) -> None:
    """Zero the fraction `amount` of output filters/rows with the smallest L2 norm, layer by layer."""
    check_sparsity(amount)
    for m in prunable_modules(model, family).values():
        prune.ln_structured(m, "weight", amount=amount, n=2, dim=0)


def global_magnitude_prune(model: nn.Module, family: str, amount: float) -> None:
    """Zero the fraction `amount` of still-unpruned prunable weights with the smallest |w|, over all layers.

    torch.nn.utils.prune.global_unstructured's rule (L1Unstructured over the still-unpruned weights of all layers,
    concatenated in order; ties to the lower index), computed here because torch's flattens with view(-1), which
    channels_last weights refuse."""
    check_sparsity(amount)
    modules = list(prunable_modules(model, family).values())
    alive = [getattr(m, "weight_mask", torch.ones_like(m.weight)).flatten() != 0 for m in modules]
    scores = torch.cat([m.weight.detach().flatten()[kept] for m, kept in zip(modules, alive)]).abs()
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep[torch.topk(scores, round(amount * scores.numel()), largest=False).indices] = False
    start = 0
    for m, kept in zip(modules, alive):
        count = int(kept.sum())
        mask = kept.clone()
        mask[kept] = keep[start:start + count]
        start += count
        prune.custom_from_mask(m, "weight", mask.view(m.weight.shape))


PRUNE_METHODS = ["l2-structured", "l1-global"]


def prune_model(model: nn.Module, family: str, method: str, amount: float) -> None:
    """Prune by name: "l2-structured" (the PruneLoRA paper's) or "l1-global" (unstructured, Unlearn-Sparse)."""
    if method == "l2-structured":
        structured_prune(model, family, amount)
    elif method == "l1-global":
        global_magnitude_prune(model, family, amount)
    else:
        raise UserError(f"unknown pruning method {method!r}; choose l2-structured or l1-global")


def pruned_modules(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if hasattr(m, "weight_mask")]


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Attach pruning masks (module name -> 0/1 tensor of the weight's shape); masked weights stay zero."""
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        prune.custom_from_mask(modules[name], "weight", mask.to(modules[name].weight.device).bool())


def restore_masks(model: nn.Module, names: Iterable[str]) -> None:
    """Re-attach pruning masks (weight != 0) to the named layers of a loaded sparse model."""
    modules = dict(model.named_modules())
    apply_masks(model, {name: modules[name].weight.detach() != 0 for name in names})


def allow_regrowth(model: nn.Module) -> None:
    """Drop the masks but keep the zeros, so later updates may regrow pruned weights (as the PruneLoRA seed
    scripts did)."""
    for name in pruned_modules(model):
        prune.remove(dict(model.named_modules())[name], "weight")


def sparsity(model: nn.Module, family: str) -> float:
    """Fraction of exactly-zero weights over the prunable layers (head and norms excluded)."""
    weights = [m.weight for m in prunable_modules(model, family).values()]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the plain architecture: masked weights folded in, no weight_orig/weight_mask keys."""
    state = model.state_dict()
    out = {}
    for key, value in state.items():
        if key.endswith("weight_mask"):
            continue
        if key.endswith("weight_orig"):
            key = key[: -len("_orig")]
            value = value * state[key + "_mask"]
        out[key] = value.detach().contiguous()
    return out


def output_row_mask(mask: torch.Tensor) -> torch.Tensor | None:
    """m if the pruning mask keeps or zeroes whole output rows/filters (mask = m 1^T), else None."""
    rows = mask.flatten(1)
    kept = rows.all(dim=1)
    return kept if torch.equal(kept, rows.any(dim=1)) else None


def per_row(factor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-output-row factor shaped to broadcast over a weight like `like`."""
    return factor.to(like.dtype).view(-1, *[1] * (like.dim() - 1))


def fold_frozen_masks(model: nn.Module) -> None:
    """On pruned layers whose weights are frozen, multiply the mask into the weight once and keep the mask as a
    plain buffer, instead of recomputing weight_orig * mask in every forward and keeping the product for
    backward; a structured mask's rows (output_row_mask) are kept too. merge_lora turns them back into
    ordinary pruned layers; frozen_mask reads the two buffers."""
    for m in model.modules():
        if hasattr(m, "weight_orig") and not m.weight_orig.requires_grad:
            mask = m.weight_mask
            prune.remove(m, "weight")
            m.register_buffer("weight_mask", mask)
            m.register_buffer("weight_row_mask", output_row_mask(mask), persistent=False)


def frozen_mask(layer: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(mask, rows) of a layer after fold_frozen_masks: its pruning mask and, for a structured one, the kept
    output rows (output_row_mask); (None, None) for a layer without a folded mask."""
    return layer._buffers.get("weight_mask"), layer._buffers.get("weight_row_mask")
