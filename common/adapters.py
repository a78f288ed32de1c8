"""LoRA through peft (its config, injection and merge) with a lean forward of our own for the adapted layers,
because peft's generic one costs more than fine-tuning does on a frozen base:
- a pruned layer must stay exactly sparse, so its update is M * (BA). When M keeps or zeroes whole output
  filters/rows (M = m 1^T, structured pruning) that is (diag(m) B) A x: the mask and LoRA's scaling go into B's
  few weights, not over the full-size output; only an unstructured mask needs the dense delta M * (BA) and a
  second full convolution. A BatchNorm folded into the frozen convolution (batchnorm.frozen_batchnorm) scales B's
  rows the same way.
- dropout: peft keeps the dropped copy of every adapted input for A's backward and draws it with torch's
  Bernoulli sampler. Here the mask is drawn from 16 random bits per element (lora_drop_mask), only that mask is
  stored (one byte per element), and backward rebuilds the dropped input from x, which the network keeps anyway
  (_LowRank).
- inputs rebuilt in backward: A's weight gradient needs A's input. Where that is a LayerNorm's or a GELU's output
  (ViT's qkv, fc1, fc2), A keeps the module's input, which the network keeps anyway, and reruns the module in
  backward (_mark_rebuildable, which marks such an output tensor with `rebuilt_by`; only _down_projection reads
  the mark).
- a shrunk base layer (shrink.py): A keeps its columns for the removed inputs, applied to their constants, so
  PruneLoRA trains the masked model's adapters; under adapter dropout those constant inputs enter undropped
  (their expectation)."""
from __future__ import annotations

import math
import weakref
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError
from .models import classifier_name
from .pruning import apply_masks, fold_frozen_masks, frozen_mask, per_row
from .shrink import is_shrunk


def lora_drop_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A dropout mask shaped and laid out like x, True where an element is dropped: each with probability p,
    p rounded to a multiple of 2**-16 (at most 8e-6 off). Four elements per 64-bit draw of the global generator:
    a quarter of the draws of torch's Bernoulli sampler, a large share of a CPU LoRA step (RESULTS.md, cost).
    Under torch.compile, one uniform draw per element instead: random_ on int64 would break the graph
    at every adapted layer, and inductor fuses this draw into the kernel that uses it."""
    if torch.compiler.is_compiling():
        return torch.rand_like(x, dtype=torch.float32) < p
    drop = torch.empty_like(x, dtype=torch.bool)  # x's memory layout (channels_last too), so masking streams
    words = torch.empty((drop.numel() + 3) // 4, dtype=torch.int64, device=x.device).random_(-2**63, None)
    bits = words.view(torch.int16)[: drop.numel()]  # uniform on [-2**15, 2**15)
    torch.lt(bits, round(p * 2**16) - 2**15, out=drop.as_strided((drop.numel(),), (1,)))
    return drop


def _mark_rebuildable(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
    """Forward hook of a LayerNorm or GELU: its output remembers how to rebuild itself (the module, its input,
    and the output's version, which an in-place change would bump). The input by weak reference: the mark
    keeps nothing alive that the network would have freed."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():  # compiled graphs rematerialise on their own
        output.rebuilt_by = (module, weakref.ref(inputs[0]), output._version)


class _LowRank(torch.autograd.Function):
    """LoRA's A (a bias-free conv or linear) on its input x, with dropout's elements `drop` zeroed if drop is
    given. For backward it keeps only what rebuilds that input: the one-byte mask, and x itself, or, where x is
    a LayerNorm's or GELU's fresh output (_mark_rebuildable), that module's input, which the network keeps
    anyway. Backward rebuilds the input once and gets both of A's gradients from one call (no recomputed A
    forward, as torch.utils.checkpoint would run)."""

    @staticmethod
    def forward(ctx, x, weight, drop, source, rebuild, conv_args):
        ctx.rebuild, ctx.conv_args = rebuild, conv_args  # conv_args: (stride, padding, dilation, groups); None: linear
        ctx.save_for_backward(weight, drop, x if rebuild is None else source)
        dropped = x if drop is None else torch.where(drop, 0.0, x)
        return F.linear(dropped, weight) if conv_args is None else F.conv2d(dropped, weight, None, *conv_args)

    @staticmethod
    def backward(ctx, grad):
        weight, drop, kept = ctx.saved_tensors
        x = kept if ctx.rebuild is None else ctx.rebuild(kept)
        dropped = (x if drop is None else torch.where(drop, 0.0, x)).to(grad.dtype)  # forward may have autocast
        if ctx.conv_args is None:
            grad_x = grad @ weight.to(grad.dtype) if ctx.needs_input_grad[0] else None
            grad_weight = grad.reshape(-1, grad.shape[-1]).t() @ dropped.reshape(-1, dropped.shape[-1])
        else:
            stride, padding, dilation, groups = ctx.conv_args
            grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
                grad, dropped, weight.to(grad.dtype), None, stride, padding, dilation, False, [0, 0], groups,
                [ctx.needs_input_grad[0], True, False])
        if grad_x is not None:
            grad_x = grad_x.to(x.dtype)
            if drop is not None:
                grad_x.masked_fill_(drop, 0.0)
        return grad_x, grad_weight.to(weight.dtype), None, None, None, None


def _down_projection(down: nn.Module, dropout: nn.Module, x: torch.Tensor,
                     drop_mask: Callable[[torch.Tensor, float], torch.Tensor]) -> torch.Tensor:
    """down(dropout(x)) for LoRA's A, through _LowRank when training needs a dropout mask or x is rebuildable.
    The dropout's 1 / (1 - p) rescaling is applied to A's small output."""
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    rebuild = source = None
    if not torch.compiler.is_compiling() and hasattr(x, "rebuilt_by"):  # compiled graphs rematerialise on their own
        rebuild, source_ref, version = x.rebuilt_by
        source = source_ref()
        if source is None or version != x._version:  # freed, or x changed in place since: not rebuildable
            rebuild = source = None
    if not torch.is_grad_enabled() or not down.weight.requires_grad or (p == 0 and rebuild is None):
        return down(dropout(x))
    conv_args = (down.stride, down.padding, down.dilation, down.groups) if isinstance(down, nn.Conv2d) else None
    drop = drop_mask(x, p) if p else None
    hidden = _LowRank.apply(x, down.weight, drop, source, rebuild, conv_args)
    return hidden * (1.0 / (1.0 - p)) if p else hidden


def _with_weight(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The layer's own operation (a conv with its stride and padding, or a linear) on x with another weight, no bias."""
    return layer._conv_forward(x, weight, None) if isinstance(layer, nn.Conv2d) else F.linear(x, weight)


def _plus_low_rank(result: torch.Tensor, up: nn.Module, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """result + up(hidden) with up's weight replaced by `weight` (B). For a linear B, one addmm over the tokens:
    the sum is written once, not B's full-size output first and then the sum. A convolution's B runs as the
    convolution plus the add."""
    if isinstance(up, nn.Linear) and result.is_contiguous() and hidden.is_contiguous() and hidden.dtype == result.dtype:
        summed = torch.addmm(result.reshape(-1, result.shape[-1]), hidden.reshape(-1, hidden.shape[-1]), weight.t())
        return summed.view(result.shape)
    return result + _with_weight(up, hidden, weight).to(result.dtype)


def _lean_lora_forward(layer: "LeanLoraLayer", x: torch.Tensor) -> torch.Tensor:
    base = layer.base_layer
    removed_inputs = layer.lora_A_removed  # A's columns for a shrunk base layer's removed inputs
    constants = base.removed_constants() if removed_inputs else None  # computed once per step
    result = base(x, constants) if removed_inputs else base(x)
    mask, rows = frozen_mask(base)
    folded_scale = layer.folded_batchnorm_scale
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        dropout = layer.lora_dropout[name]
        if mask is not None and (rows is None or not layer.factor_row_masks):
            # unstructured mask: the exact update needs the dense delta
            delta = mask * layer.get_delta_weight(name)
            if folded_scale is not None:
                delta = delta * per_row(folded_scale, delta)
            result = result + _with_weight(base, dropout(x).to(result.dtype), delta.to(result.dtype))
            continue
        hidden = _down_projection(layer.lora_A[name], dropout, x, layer.drop_mask)
        if name in removed_inputs:  # constants: with dropout, their expectation enters
            term = base.removed_input_term(constants, removed_inputs[name], x.shape[-2:])
            hidden = hidden + term.to(hidden.dtype)
        up = layer.lora_B[name]
        weight = up.weight * layer.scaling[name]
        for factor in (rows, folded_scale):  # one factor per output channel: B's rows
            if factor is not None:
                weight = weight * per_row(factor, weight)
        result = _plus_low_rank(result, up, hidden, weight.to(result.dtype))
    return result


class LeanLoraLayer:
    """What our LoRA layers (peft's Conv2d and Linear with the lean forward) hold beside peft's own fields. Every
    field is set in one place:
    - lora_A_removed: A's columns for the inputs a shrunk base layer removed (shrink.py), per adapter; filled by
      add_lora when the base layer is shrunk, empty otherwise.
    - folded_batchnorm_scale: the per-output-channel scale of a BatchNorm folded into the frozen base layer;
      set by batchnorm.frozen_batchnorm for its duration (fold_batchnorm), None otherwise.
    - drop_mask(x, p): the adapter dropout's sampler (lora_drop_mask unless add_lora is given another).
    - factor_row_masks: apply a structured mask on B's rows (True) or as the dense M * (BA) (add_lora's choice).
    The base layer's mask comes from pruning.frozen_mask."""

    def init_lean(self, drop_mask: Callable[[torch.Tensor, float], torch.Tensor], factor_row_masks: bool) -> None:
        self.lora_A_removed = nn.ParameterDict()
        self.folded_batchnorm_scale: torch.Tensor | None = None
        self.drop_mask = drop_mask
        self.factor_row_masks = factor_row_masks

    def fold_batchnorm(self, scale: torch.Tensor | None) -> None:
        """Scale the adapters' output rows as a BatchNorm folded into the base layer scales its rows (None: undo)."""
        self.folded_batchnorm_scale = scale

    def uses_lean_forward(self) -> bool:
        return not (self.disable_adapters or self.merged or self.lora_variant
                    or any(up.bias is not None for up in self.lora_B.values())
                    or any(isinstance(getattr(down, "padding", 0), str) for down in self.lora_A.values()))

    def forward(self, x, *args, **kwargs):
        if args or kwargs or not self.uses_lean_forward():
            return super().forward(x, *args, **kwargs)  # peft's general path for what we do not use
        return _lean_lora_forward(self, x)


def _lora_layer_classes(drop_mask: Callable[[torch.Tensor, float], torch.Tensor],
                        factor_row_masks: bool) -> dict[type, type]:
    """peft's custom-module mapping: its Conv2d and Linear LoRA layers with LeanLoraLayer's forward and fields."""
    from peft.tuners.lora import layer as lora_layer

    def lean(cls):
        class Lean(LeanLoraLayer, cls):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.init_lean(drop_mask, factor_row_masks)
        Lean.__name__ = Lean.__qualname__ = f"Lean{cls.__name__}"
        return Lean

    return {nn.Conv2d: lean(lora_layer.Conv2d), nn.Linear: lean(lora_layer.Linear)}


LORA_DEFAULTS = {  # the PruneLoRA paper's settings (arXiv 2411.11907, Sec. 3)
    "resnet": dict(rank=8, alpha=16, dropout=0.1, targets=r".*layer\d+\.\d+\.conv\d+"),
    # The blocks' attention and MLP linears: a bare "proj" suffix would also adapt patch_embed.proj.
    "vit": dict(rank=16, alpha=32, dropout=0.0, targets=r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"),
}


def lora_settings(family: str, *, rank: int | None = None, alpha: float | None = None,
                  dropout: float | None = None, targets: str | None = None) -> dict:
    """add_lora's rank, alpha, dropout and targets: the values given, the family's paper defaults for None."""
    given = dict(rank=rank, alpha=alpha, dropout=dropout, targets=targets)
    return {key: LORA_DEFAULTS[family][key] if value is None else value for key, value in given.items()}


def add_lora(model: nn.Module, *, rank: int, alpha: float, dropout: float, targets: str,
             train_head: bool = True, lean_forward: bool = True,
             drop_mask: Callable[[torch.Tensor, float], torch.Tensor] = lora_drop_mask,
             factor_row_masks: bool = True) -> nn.Module:
    """Freeze the model and wrap it with peft LoRA adapters; the classifier head stays trainable if train_head.

    targets: a regex over module names, or comma-separated name suffixes (peft's conventions). The other
    keywords choose reference paths for tests and benchmarks: lean_forward=False keeps peft's own LoRA layers,
    drop_mask replaces the adapter dropout's sampler, factor_row_masks=False applies structured masks as the
    dense M * (BA)."""
    from peft import LoraConfig, get_peft_model
    target_modules = targets if any(ch in targets for ch in "\\.*[") else [t.strip() for t in targets.split(",")]
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        modules_to_save=[classifier_name(model)] if train_head else None, init_lora_weights=True)
    if lean_forward:
        config._register_custom_module(_lora_layer_classes(drop_mask, factor_row_masks))
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as err:
        raise UserError(f"LoRA targets {targets!r} match no layer of this model ({str(err).splitlines()[0][:100]})")
    for m in peft_model.modules():
        if isinstance(m, LeanLoraLayer) and is_shrunk(m.base_layer):
            _adapt_removed_inputs(m)
    fold_frozen_masks(peft_model)
    peft_model.rebuild_hooks = [m.register_forward_hook(_mark_rebuildable) for m in peft_model.modules()
                                if isinstance(m, (nn.LayerNorm, nn.GELU))]
    return peft_model


@torch.no_grad()
def _adapt_removed_inputs(layer: nn.Module) -> None:
    """A LoRA layer on a shrunk layer (shrink_pruned) gets A's columns for the removed inputs too
    (lora_A_removed), so its adapters are the masked model's: A over the whole input, drawn as peft draws it
    (kaiming uniform, bound 1/sqrt(fan-in) of the whole input)."""
    base = layer.base_layer
    kept, removed = base.weight.shape[1], base.pruned_weight.shape[1]
    for name, down in layer.lora_A.items():
        per_input = down.weight[0, 0].numel()  # kernel positions per input channel
        bound = 1 / math.sqrt((kept + removed) * per_input)
        down.weight.uniform_(-bound, bound)
        shape = (down.weight.shape[0], removed, *down.weight.shape[2:])
        layer.lora_A_removed[name] = nn.Parameter(
            torch.empty(shape, device=down.weight.device, dtype=down.weight.dtype).uniform_(-bound, bound))


def _merge_removed_inputs(layer: nn.Module) -> None:
    """Fold B A_removed (scaled) into the shrunk base layer's removed-input weights, as peft merges B A."""
    for name, down in layer.lora_A_removed.items():
        up = layer.lora_B[name].weight
        delta = (up.flatten(1) @ down.flatten(1)).view(up.shape[0], *down.shape[1:]) * layer.scaling[name]
        layer.base_layer.pruned_weight.add_(delta.to(layer.base_layer.pruned_weight.dtype))


def merge_lora(peft_model: nn.Module) -> nn.Module:
    """Fold adapters into the weights and return the plain model; pruned layers keep their masks."""
    masks = {}
    for name, m in peft_model.named_modules():
        if "weight_mask" in m._buffers and not hasattr(m, "weight_orig"):  # a mask of fold_frozen_masks
            plain_name = name.removeprefix("base_model.model.").removesuffix(".base_layer")
            masks[plain_name] = m._buffers.pop("weight_mask")
            m._buffers.pop("weight_row_mask", None)
    with torch.no_grad():
        for m in peft_model.modules():
            if isinstance(m, LeanLoraLayer) and m.lora_A_removed:
                _merge_removed_inputs(m)
    for hook in getattr(peft_model, "rebuild_hooks", ()):
        hook.remove()
    model = peft_model.merge_and_unload()
    apply_masks(model, masks)
    return model
