"""BatchNorm in the adapter modes: frozen statistics (set_train_mode), folding frozen BatchNorms into the frozen
convolutions before them for the length of a training run (frozen_batchnorm), and re-estimating statistics
after pruning (recalibrate_batchnorm).

Invariant: frozen_batchnorm restores the model on exit, tensor for tensor."""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torchvision.ops.misc import FrozenBatchNorm2d

from .system import autocast
from .data import DatasetInfo, normalize
from .pruning import per_row
from .adapters import LeanLoraLayer


# Dr images whose statistics replace the dense model's after pruning (--calibration-images): as good as the
# whole Dr on the demo's pruned model (RESULTS.md, cost), for a fraction of a forward over all of it.
BN_CALIBRATION_IMAGES = 2_048


def set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    """Train mode, except that frozen BatchNorm layers keep their running statistics (LoRA modes)."""
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _batchnorm_after_conv(model: nn.Module) -> list[tuple[nn.Module, str, nn.BatchNorm2d, nn.Module]]:
    """(parent, name, BatchNorm2d, convolution) for each BatchNorm2d registered right after a convolution (a
    Conv2d, or a LoRA layer around one), nothing between: in every ResNet here that BatchNorm normalises exactly
    that convolution's output, and nothing else reads it (tests check each architecture)."""
    pairs, previous, conv_parts = [], None, None
    for name, m in model.named_modules():
        if conv_parts and name.startswith(conv_parts):  # a LoRA layer's base and adapters; a ShrunkConv2d's norm
            continue
        if isinstance(m, nn.BatchNorm2d) and previous is not None:
            parent_name, _, child_name = name.rpartition(".")
            pairs.append((model.get_submodule(parent_name), child_name, m, previous))
        is_lora = isinstance(getattr(m, "base_layer", None), nn.Conv2d)  # peft's wrapper API, ours or its own
        previous = m if isinstance(m, nn.Conv2d) or is_lora else None
        conv_parts = name + "." if previous is not None else None
    return pairs


def _frozen_conv(conv: nn.Module) -> nn.Conv2d | None:
    """The plain frozen, bias-free Conv2d computing conv's base output if a BatchNorm may be folded into it: conv
    itself, or the base layer of a LoRA layer on the lean forward (which scales the adapter rows the same way)."""
    if isinstance(conv, LeanLoraLayer):
        if not conv.uses_lean_forward():
            return None
        conv = conv.base_layer
    weight = conv._parameters.get("weight")  # absent while torch's pruning recomputes it each forward
    frozen = not any(p.requires_grad for p in conv.parameters(recurse=False))
    return conv if weight is not None and frozen and conv.bias is None else None


@contextlib.contextmanager
def frozen_batchnorm(model: nn.Module):
    """For the duration, every BatchNorm2d whose affine is frozen computes its eval-mode output with nothing kept
    for backward: folded into the frozen convolution before it (weight * s, bias = shift, with s and shift from
    its running statistics, as BatchNorm is folded for inference; Ioffe & Szegedy 2015, Sec. 3.1), which removes
    the layer from the step; otherwise as torchvision's FrozenBatchNorm2d (x * s + shift). The model is restored
    on exit, its tensors untouched."""

    def is_frozen(bn: nn.Module) -> bool:
        return bn.affine and bn.track_running_stats and not bn.weight.requires_grad

    folded, swapped = [], []
    with torch.no_grad():
        for parent, name, bn, conv in _batchnorm_after_conv(model):
            base = _frozen_conv(conv)
            if base is None or not is_frozen(bn):
                continue
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            # Every weight whose rows are output channels: a ShrunkConv2d's removed-input weights too.
            originals = {attr: getattr(base, attr) for attr in ("weight", "pruned_weight")
                         if getattr(base, attr, None) is not None}
            for attr, original in originals.items():
                setattr(base, attr, nn.Parameter(original * per_row(scale, original), requires_grad=False))
            base.bias = nn.Parameter(bn.bias - bn.running_mean * scale, requires_grad=False)
            if base is not conv:
                conv.fold_batchnorm(scale)
            setattr(parent, name, nn.Identity())
            folded.append((parent, name, bn, conv, base, originals))
        for parent in list(model.modules()):
            for name, child in parent.named_children():
                if isinstance(child, nn.BatchNorm2d) and is_frozen(child):
                    frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
                    frozen = frozen.to(child.weight.device, child.weight.dtype)
                    frozen.load_state_dict(child.state_dict())
                    setattr(parent, name, frozen)
                    swapped.append((parent, name, child))
    try:
        yield model
    finally:
        for parent, name, bn in swapped:
            setattr(parent, name, bn)
        for parent, name, bn, conv, base, originals in folded:
            for attr, original in originals.items():
                setattr(base, attr, original)
            base.bias = None
            if base is not conv:
                conv.fold_batchnorm(None)
            setattr(parent, name, bn)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, info: DatasetInfo, input_size: int | None,
                          batch_size: int = 256) -> None:
    """Re-estimate BatchNorm running statistics as a plain average over x (train-mode forwards, no gradient).

    After structured pruning the dense model's statistics no longer describe the pruned layers' outputs; with
    BatchNorm frozen (LoRA modes) nothing would ever correct them."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all calibration batches
    model.train()
    device = next(model.parameters()).device
    for start in range(0, len(x), batch_size):
        with torch.no_grad(), autocast(device):
            model(normalize(x[start:start + batch_size], info, input_size))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
