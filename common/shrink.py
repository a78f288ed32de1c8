"""Shrinking a structurally pruned model (--shrink): half of every pruned layer computes zeros, so train a
physically smaller copy instead and write its weights back.

A pruned filter's output is exactly zero, but after the BatchNorm and activation that follow it (or, in a ViT MLP,
its bias and GELU) it is a constant per channel, not zero, and the next layer reads it: the shrunk next layer adds
that constant's contribution from the removed input channels itself (a map, not a vector, where zero padding makes
the borders differ), so outputs, gradients and BatchNorm statistics are the masked model's to float rounding. Only
channels read by a single layer inside a block are removed: the residual stream's channels (a block's last layer,
the attention's) are summed with the shortcut, so those layers keep their masked rows.

What other modules may use of a shrunk layer (ShrunkConv2d, ShrunkLinear): removed_constants() and
removed_input_term(), declared on both classes, and pruned_weight; adapters.py gives a LoRA layer on a shrunk layer
A's columns for the removed inputs."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import prune
from timm.layers import Mlp
from timm.models.resnet import BasicBlock, Bottleneck

from .errors import UserError
from .system import prepare_model
from .models import copy_model
from .pruning import per_row, output_row_mask


class ShrunkConv2d(nn.Conv2d):
    """A convolution over the kept input channels, plus the removed channels' constant contribution:
    act(pruned_norm(0)) convolved with their weights (pruned_weight) on one image, broadcast over the batch.
    Built by from_pruned; constructed like a Conv2d it is one (peft builds adapters with the base layer's class)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pruned_weight = self.pruned_norm = self.act = None
        self.register_buffer("pruned_rows", None)  # the layer's own structured mask, if its rows are pruned

    @classmethod
    def from_pruned(cls, layer: nn.Conv2d, rows: torch.Tensor, kept_in: torch.Tensor, pruned_in: torch.Tensor,
                    norm: nn.BatchNorm2d, act: nn.Module, weight: torch.Tensor) -> "ShrunkConv2d":
        if layer.groups != 1 or layer.bias is not None or layer.padding_mode != "zeros":
            raise UserError("--shrink supports plain bias-free convolutions only")
        shrunk = cls(len(kept_in), len(rows), layer.kernel_size, stride=layer.stride, padding=layer.padding,
                     dilation=layer.dilation, bias=False, device=weight.device, dtype=weight.dtype)
        shrunk.weight = nn.Parameter(weight[rows][:, kept_in].clone())
        shrunk.pruned_weight = nn.Parameter(weight[rows][:, pruned_in].clone())
        shrunk.pruned_norm = _channel_subset(norm, pruned_in)
        shrunk.act = copy.deepcopy(act)
        return shrunk

    def removed_constants(self) -> torch.Tensor:
        """act(norm(0)) of the removed input channels, shaped (1, n, 1, 1)."""
        # Two zero images, so a BatchNorm in train mode sees zero batch variance, as the masked model's does.
        return self.act(self.pruned_norm(self.pruned_weight.new_zeros(2, self.pruned_weight.shape[1], 1, 1)))[:1]

    def removed_input_term(self, constants: torch.Tensor, weight: torch.Tensor,
                           size: tuple[int, int]) -> torch.Tensor:
        """What the removed channels' constants add through `weight` (this layer's stride and padding): a map
        (1, out, H', W'), or (1, out, 1, 1) where no padding makes every position alike."""
        field = tuple(d * (k - 1) + 1 for k, d in zip(self.kernel_size, self.dilation))
        spatial = field if not any(self.padding) else size  # one receptive field's image suffices without padding
        return self._conv_forward(constants.expand(1, constants.shape[1], *spatial), weight, None)

    def forward(self, x: torch.Tensor, constants: torch.Tensor | None = None) -> torch.Tensor:
        if self.pruned_weight is None:
            return super().forward(x)
        constants = self.removed_constants() if constants is None else constants
        removed = self.removed_input_term(constants, _masked_pruned_weight(self), x.shape[-2:])
        if removed.shape[-2:] == (1, 1):  # the same at every position: a bias, added by the convolution itself
            removed = removed.flatten()
            return self._conv_forward(x, self.weight, removed if self.bias is None else self.bias + removed)
        out = super().forward(x)
        return out + removed.to(out.dtype)


class ShrunkLinear(nn.Linear):
    """A linear layer over the kept inputs; the removed inputs' constant, act(pruned_input_bias) (the bias of
    the pruned rows before), enters through the bias."""

    def __init__(self, layer: nn.Linear, kept_in: torch.Tensor, pruned_in: torch.Tensor, producer_bias: torch.Tensor,
                 act: nn.Module, weight: torch.Tensor):
        super().__init__(len(kept_in), layer.out_features, bias=layer.bias is not None, device=weight.device,
                         dtype=weight.dtype)
        self.weight = nn.Parameter(weight[:, kept_in].clone())
        if layer.bias is not None:
            self.bias = nn.Parameter(layer.bias.detach().clone())
        self.pruned_input_bias = nn.Parameter(producer_bias[pruned_in].clone())
        self.act = copy.deepcopy(act)
        self.pruned_weight = nn.Parameter(weight[:, pruned_in].clone())
        self.register_buffer("pruned_rows", None)

    def removed_constants(self) -> torch.Tensor:
        return self.act(self.pruned_input_bias)

    def removed_input_term(self, constants: torch.Tensor, weight: torch.Tensor, size=None) -> torch.Tensor:
        return F.linear(constants, weight)

    def forward(self, x: torch.Tensor, constants: torch.Tensor | None = None) -> torch.Tensor:
        constants = self.removed_constants() if constants is None else constants
        removed = self.removed_input_term(constants, _masked_pruned_weight(self))
        return F.linear(x, self.weight, removed if self.bias is None else self.bias + removed)


def _channel_subset(norm: nn.BatchNorm2d, index: torch.Tensor) -> nn.BatchNorm2d:
    """A BatchNorm2d over some of norm's channels, with their parameters and statistics."""
    part = nn.BatchNorm2d(len(index), eps=norm.eps, momentum=norm.momentum, device=norm.weight.device,
                          dtype=norm.weight.dtype)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(part, name).copy_(getattr(norm, name)[index])
        part.num_batches_tracked.copy_(norm.num_batches_tracked)
    part.train(norm.training)
    return part


def _effective(module: nn.Module, name: str) -> torch.Tensor:
    """A weight as the forward uses it: torch's pruning keeps name_orig * name_mask."""
    if hasattr(module, name + "_orig"):
        return (getattr(module, name + "_orig") * getattr(module, name + "_mask")).detach()
    return getattr(module, name).detach()


def _shrink_pairs(model: nn.Module, family: str) -> list[tuple[str, str | None, str, str]]:
    """(producer, norm or None, activation, consumer) module names where the producer's output channels pass
    through the norm and activation alone into the consumer alone. A block with dropout, anti-aliasing or an
    MLP norm between (none of our architectures has one) is left as it is."""
    pairs = []
    for name, m in model.named_modules():
        local = []
        if family == "resnet" and isinstance(m, (BasicBlock, Bottleneck)) and \
                isinstance(m.drop_block, nn.Identity) and isinstance(m.aa, nn.Identity):
            local = [("conv1", "bn1", "act1", "conv2")]
            if isinstance(m, Bottleneck):
                local.append(("conv2", "bn2", "act2", "conv3"))
        elif family == "vit" and isinstance(m, Mlp) and isinstance(m.norm, nn.Identity) and m.drop1.p == 0:
            local = [("fc1", None, "act", "fc2")]
        pairs += [tuple(part and f"{name}.{part}" for part in pair) for pair in local]
    return pairs


def _shrink_plan(model: nn.Module, family: str):
    """Per layer, the output rows kept in the shrunk model (producers), and per consumer its (kept inputs,
    removed inputs, norm, activation, producer), from the structured masks of a pruned model."""
    rows, inputs = {}, {}
    for producer, norm, act, consumer in _shrink_pairs(model, family):
        mask = getattr(model.get_submodule(producer), "weight_mask", None)
        kept = output_row_mask(mask) if mask is not None else None
        if kept is None or kept.all() or not kept.any():
            continue
        rows[producer] = kept.nonzero().flatten()
        inputs[consumer] = (rows[producer], (~kept).nonzero().flatten(), norm, act, producer)
    if not inputs:
        raise UserError("--shrink needs filters that stay pruned: --prune l2-structured, no --allow-regrowth")
    return rows, inputs


def _masked_pruned_weight(layer: nn.Module) -> torch.Tensor:
    weight = layer.pruned_weight
    return weight if layer.pruned_rows is None else weight * per_row(layer.pruned_rows, weight)


def _rows_of(layer: nn.Module, rows: torch.Tensor, weight: torch.Tensor) -> nn.Module:
    """A copy of a conv or linear layer with only some output rows."""
    if isinstance(layer, nn.Conv2d):
        part = nn.Conv2d(layer.in_channels, len(rows), layer.kernel_size, stride=layer.stride, padding=layer.padding,
                         dilation=layer.dilation, groups=layer.groups, bias=layer.bias is not None,
                         padding_mode=layer.padding_mode, device=weight.device, dtype=weight.dtype)
    else:
        part = nn.Linear(layer.in_features, len(rows), bias=layer.bias is not None, device=weight.device,
                         dtype=weight.dtype)
    part.weight = nn.Parameter(weight[rows].clone())
    if layer.bias is not None:
        part.bias = nn.Parameter(layer.bias.detach()[rows].clone())
    return part


def shrink_pruned(model: nn.Module, family: str, *, channels_last: bool = True) -> nn.Module:
    """A physically smaller copy of a structurally pruned model, computing the same function (see above);
    expand_pruned writes what it learns back."""
    rows, inputs = _shrink_plan(model, family)
    small = copy_model(model)
    for name in {*rows, *inputs}:
        layer = model.get_submodule(name)
        weight = _effective(layer, "weight")
        kept_rows = rows.get(name, torch.arange(weight.shape[0], device=weight.device))
        if name not in inputs:
            part = _rows_of(layer, kept_rows, weight)
        else:
            kept, removed, norm, act, producer = inputs[name]
            if isinstance(layer, nn.Conv2d):
                part = ShrunkConv2d.from_pruned(layer, kept_rows, kept, removed, model.get_submodule(norm),
                                                model.get_submodule(act), weight)
            else:
                part = ShrunkLinear(layer, kept, removed, model.get_submodule(producer).bias.detach(),
                                    model.get_submodule(act), weight)
            if hasattr(layer, "weight_mask") and name not in rows:  # its own pruned rows stay pruned
                part.pruned_rows = output_row_mask(layer.weight_mask)
                prune.custom_from_mask(part, "weight", layer.weight_mask[:, kept])
        part.requires_grad_(getattr(layer, "weight_orig", layer.weight).requires_grad).train(layer.training)
        small.set_submodule(name, part)
    for kept, _, norm, _, _ in inputs.values():
        if norm is not None:
            small.set_submodule(norm, _channel_subset(model.get_submodule(norm), kept))
    return prepare_model(small, next(model.parameters()).device, channels_last=channels_last)


@torch.no_grad()
def expand_pruned(model: nn.Module, small: nn.Module, family: str) -> nn.Module:
    """Write a shrunk copy's weights and BatchNorm statistics (after training, and after merge_lora) back into
    the pruned model it came from; the pruned rows stay masked. Returns the model."""
    rows, inputs = _shrink_plan(model, family)
    norms = {norm for _, _, norm, _, _ in inputs.values() if norm is not None}
    shrunk = {*rows, *inputs, *norms}
    small_state = small.state_dict()
    for key, value in model.state_dict(keep_vars=True).items():  # every layer that was not shrunk, as it is
        if key.rpartition(".")[0] not in shrunk:
            value.copy_(small_state[key])
    for name in {*rows, *inputs}:
        layer, part = model.get_submodule(name), small.get_submodule(name)
        target = layer.weight_orig if hasattr(layer, "weight_orig") else layer.weight
        kept_rows = rows.get(name, torch.arange(target.shape[0], device=target.device))
        if name not in inputs:
            target[kept_rows] = _effective(part, "weight")
        else:
            kept, removed, norm, _, producer = inputs[name]
            target[kept_rows[:, None], kept] = _effective(part, "weight")
            target[kept_rows[:, None], removed] = _masked_pruned_weight(part).detach()
            if norm is not None:
                _write_channels(model.get_submodule(norm), part.pruned_norm, removed)
            else:
                model.get_submodule(producer).bias[removed] = part.pruned_input_bias
        if layer.bias is not None:
            layer.bias[kept_rows] = part.bias
    for kept, _, norm, _, _ in inputs.values():
        if norm is not None:
            _write_channels(model.get_submodule(norm), small.get_submodule(norm), kept)
    return model


def _write_channels(norm: nn.BatchNorm2d, part: nn.BatchNorm2d, index: torch.Tensor) -> None:
    """The inverse of _channel_subset: part's parameters and statistics into norm's channels `index`."""
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(norm, name)[index] = getattr(part, name)
    norm.num_batches_tracked.copy_(part.num_batches_tracked)


def is_shrunk(layer: nn.Module) -> bool:
    """Whether a layer is a shrunk consumer (ShrunkConv2d or ShrunkLinear) with removed inputs."""
    return isinstance(layer, (ShrunkConv2d, ShrunkLinear)) and layer.pruned_weight is not None
