"""Model builders: timm architectures, with CIFAR-style stems for small images, by name (ARCHS)."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch.nn as nn
import timm
from timm.layers import build_sincos2d_pos_embed
from timm.models.resnet import BasicBlock, ResNet
from timm.models.vision_transformer import VisionTransformer

from .errors import UserError
from .data import DatasetInfo


@dataclass(frozen=True)
class ArchSpec:
    family: str  # "resnet" or "vit": decides which layers are pruned and which get LoRA
    input_size: int | None  # None: the dataset's own size; else images are resized on the device
    help: str


ARCHS = {
    "resnet_tiny": ArchSpec("resnet", None, "CPU-sized ResNet-10 (widths 16-128, 0.31M params) for demos and tests"),
    "resnet18": ArchSpec("resnet", None, "CIFAR ResNet-18 (3x3 stride-1 stem, no max-pool), Unlearn-Sparse"),
    "resnet50": ArchSpec("resnet", None, "CIFAR ResNet-50 (3x3 stride-1 stem, no max-pool), PruneLoRA paper"),
    "vit_tiny": ArchSpec("vit", None, "CPU-sized ViT (patch 4, width 96, depth 4, 3 heads, 0.45M params)"),
    "vit_small": ArchSpec("vit", None, "ViT-S/4 for small images (width 384, depth 12, 6 heads), PruneLoRA paper"),
    "vit_base": ArchSpec("vit", 224, "ImageNet-pretrained ViT-B/16 at 224 px (needs --pretrained-weights offline)"),
}


VIT_BASE_HUB = "vit_base_patch16_224.augreg2_in21k_ft_in1k"


def _cifar_stem(model: nn.Module, in_chans: int) -> nn.Module:
    model.conv1 = nn.Conv2d(in_chans, model.conv1.out_channels, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _small_vit(info: DatasetInfo, num_classes: int, width: int, depth: int, heads: int) -> nn.Module:
    model = VisionTransformer(img_size=info.size, patch_size=4, in_chans=info.channels, num_classes=num_classes,
                              embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=4.0,
                              class_token=False, global_pool="avg")
    grid = model.patch_embed.grid_size
    model.pos_embed.data.copy_(build_sincos2d_pos_embed(list(grid), width).unsqueeze(0))
    model.pos_embed.requires_grad_(False)  # fixed 2-D sin-cos position embedding
    return model


def build_model(arch: str, info: DatasetInfo, pretrained_weights: str | None = None) -> nn.Module:
    """Build an architecture for a dataset's channel count and class count (random init unless vit_base)."""
    if arch not in ARCHS:
        raise UserError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    k, c = info.num_classes, info.channels
    if arch == "resnet_tiny":
        model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=k, in_chans=c, channels=(16, 32, 64, 128),
                       stem_type="deep", stem_width=8)
        model.maxpool = nn.Identity()  # keep the stride-2 stem: 28/32 px -> 14/16 px in the first stage
        return model
    if arch in ("resnet18", "resnet50"):
        return _cifar_stem(timm.create_model(arch, pretrained=False, num_classes=k, in_chans=c), c)
    if arch == "vit_tiny":
        return _small_vit(info, k, 96, 4, 3)
    if arch == "vit_small":
        return _small_vit(info, k, 384, 12, 6)
    overlay = dict(file=pretrained_weights) if pretrained_weights else None
    try:
        return timm.create_model(VIT_BASE_HUB, pretrained=True, num_classes=k, in_chans=c,
                                 pretrained_cfg_overlay=overlay)
    except Exception as err:
        raise UserError(f"cannot load ImageNet weights for vit_base ({type(err).__name__}); offline, download "
                        f"timm's {VIT_BASE_HUB} model.safetensors elsewhere and pass --pretrained-weights FILE") from None


def classifier_name(model: nn.Module) -> str:
    """Name of the classification head (never pruned, always trained)."""
    head = model.get_classifier()
    return next(name for name, m in model.named_modules() if m is head)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy, pruning masks included."""
    # torch.nn.utils.prune's `weight` (weight_orig * weight_mask, recomputed before every forward) is not a graph
    # leaf, which deepcopy refuses: the copy starts from a detached stand-in.
    memo = {id(m.weight): m.weight.detach().clone() for m in model.modules() if hasattr(m, "weight_orig")}
    return copy.deepcopy(model, memo)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of model in eval mode with no trainable parameter: a teacher. Pruning masks are copied too."""
    return copy_model(model).eval().requires_grad_(False)


def random_model(arch: str, info: DatasetInfo) -> nn.Module:
    """An architecture with random weights, vit_base included (build_model gives vit_base ImageNet's weights)."""
    if arch != "vit_base":
        return build_model(arch, info)
    return timm.create_model(VIT_BASE_HUB, pretrained=False, num_classes=info.num_classes, in_chans=info.channels)
