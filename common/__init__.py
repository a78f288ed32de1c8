"""Shared machinery for every stage: data and forget splits, model builders, pruning and LoRA helpers,
the training loop, inference, checkpoint I/O and seeding. A method's own objective lives in its script."""
from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import ctypes
import dataclasses
import functools
import gzip
import hashlib
import json
import math
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.utils import prune
from tqdm import tqdm

FORMAT = "unlearn-toolkit/1"  # sidecar format tag; bump when the sidecar layout changes
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist


class UserError(Exception):
    """Bad input or a failed run that the user can fix: reported as one line, exit status 2."""


def run_main(main: Callable[[], None]) -> None:
    """Run a script's main(), turning a UserError into a one-line message and exit status 2. A torchrun process
    (WORLD_SIZE > 1) then leaves with os._exit, skipping the interpreter's and C++'s teardown: DistributedDataParallel
    keeps its gloo process group, and that group's threads, alive past destroy_process_group (torch 2.14), and
    destroying them during teardown now and then aborts the process ("terminate called without an active
    exception", SIGABRT) after its work is done and saved, which fails the whole torchrun job."""
    try:
        main()
        status = 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        status = 2
    if torchrun_world_size() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    if status:
        sys.exit(status)


# ----------------------------------------------------------------------------------------------------
# Datasets: each split lives as one uint8 tensor on the device; augmentation runs on whole batches there.

@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    channels: int
    size: int
    mean: tuple[float, ...]  # one normalisation per dataset, used by every stage
    std: tuple[float, ...]
    flip: bool  # horizontal flip suits natural images and clothing, not digits
    crop_pad: int  # random-crop padding in pixels


DATASETS = {
    "cifar10": DatasetInfo(10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True, 4),
    "cifar100": DatasetInfo(100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True, 4),
    "svhn": DatasetInfo(10, 3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), False, 4),
    "fashion-mnist": DatasetInfo(10, 1, 28, (0.2860,), (0.3530,), True, 2),
}


def _torchvision_split(name: str, root: Path, train: bool, download: bool):
    from torchvision import datasets
    if name == "cifar10":
        ds = datasets.CIFAR10(root, train=train, download=download)
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2), torch.tensor(ds.targets)
    if name == "cifar100":
        ds = datasets.CIFAR100(root, train=train, download=download)
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2), torch.tensor(ds.targets)
    if name == "svhn":
        ds = datasets.SVHN(root, split="train" if train else "test", download=download)
        return torch.from_numpy(ds.data), torch.from_numpy(ds.labels).long()
    ds = datasets.FashionMNIST(root, train=train, download=download)
    return ds.data.unsqueeze(1), ds.targets.long()


def _copy_debian_fashion_mnist(root: Path) -> None:
    """Unpack the Debian package's Fashion-MNIST files into torchvision's raw/ layout under root."""
    raw = root / "FashionMNIST" / "raw"
    if not DEBIAN_FASHION_MNIST.is_dir() or (raw / "t10k-labels-idx1-ubyte").exists():
        return
    raw.mkdir(parents=True, exist_ok=True)
    for gz in DEBIAN_FASHION_MNIST.glob("*-ubyte.gz"):
        tmp = raw / f".{gz.stem}.tmp{os.getpid()}"  # per process: two first runs may unpack at once
        with gzip.open(gz, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, raw / gz.stem)


def load_dataset(name: str, data_dir: str | Path, download: bool = False):
    """Return (info, (x_train, y_train), (x_test, y_test)) as CPU tensors: uint8 NCHW images, int64 labels."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    root = Path(data_dir)
    if name == "fashion-mnist":
        _copy_debian_fashion_mnist(root)
    try:
        train = _torchvision_split(name, root, True, download)
        test = _torchvision_split(name, root, False, download)
    except Exception as err:  # torchvision raises RuntimeError/URLError/OSError for missing or unreachable data
        hint = ("`apt-get install dataset-fashion-mnist` or " if name == "fashion-mnist" else "")
        raise UserError(f"{name} not found under {root} ({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
                        f"get it with {hint}--download on a machine online, or copy torchvision's files there") from None
    return DATASETS[name], train, test


@dataclass
class Data:
    """A dataset on the device plus its splits, each an index tensor over the same in-memory images.

    train/val are carved from the official training set; forget/retain partition train; test_retain and
    test_forget partition the official test set (test_forget is empty for random-sample forgetting)."""
    name: str
    info: DatasetInfo
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    train: torch.Tensor
    val: torch.Tensor
    forget: torch.Tensor
    retain: torch.Tensor
    test_retain: torch.Tensor
    test_forget: torch.Tensor
    spec: dict  # what rebuilds exactly these splits (recorded in every sidecar)

    def subset(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and labels of a named split: train, val, forget, retain, test, test_retain, test_forget."""
        if split == "test":
            return self.x_test, self.y_test
        idx = getattr(self, split)
        if split.startswith("test_"):
            return self.x_test[idx], self.y_test[idx]
        return self.x_train[idx], self.y_train[idx]

    @property
    def forget_class(self) -> int | None:
        return self.spec["forget_class"]

    @property
    def forget_hash(self) -> str:
        return self.spec["forget_hash"]


# What fixes the images a model may train on (a sidecar's "data" entry); models to compare must agree on all.
# Sidecars written before "shadow" existed lack it, which reads as None (no shadow).
SPLIT_KEYS = ("dataset", "val_fraction", "split_seed", "train_subset", "shadow")


def split_mismatch(spec: dict, other: dict) -> str | None:
    """The first of SPLIT_KEYS on which two data specs disagree, or None when they describe the same split."""
    return next((key for key in SPLIT_KEYS if spec.get(key) != other.get(key)), None)


def shadow_members(shadow: str, n: int) -> torch.Tensor:
    """Which of n training images shadow "k/N" keeps: each image is in exactly N/2 of the N shadows (Carlini et
    al. 2022's LiRA split), so every target image has as many models that saw it as models that did not."""
    try:
        index, count = map(int, shadow.split("/"))
    except ValueError:
        raise UserError(f"--shadow {shadow!r}: expected k/N, e.g. 0/16") from None
    if count < 2 or count % 2 or not 0 <= index < count:
        raise UserError(f"--shadow {shadow}: N must be even and at least 2, and k in 0..N-1")
    # One fixed draw for every population: shadow k of N is the same half in every run and every script.
    gen = torch.Generator().manual_seed(int(hashlib.sha256(b"shadow halves").hexdigest()[:15], 16))
    ranks = torch.rand(count, n, generator=gen).argsort(0).argsort(0)
    return ranks[index] < count // 2


def index_hash(indices: torch.Tensor) -> str:
    """Stable short hash of a set of indices: two runs with the same hash forget the same images."""
    return hashlib.sha256(np.sort(indices.cpu().numpy()).astype(np.int64).tobytes()).hexdigest()[:16]


def make_data(dataset: str, data_dir: str | Path, device: torch.device | str = "cpu", *, val_fraction: float = 0.1,
              split_seed: int = 0, train_subset: int = 0, forget_class: int | None = None,
              forget_random: int = 0, forget_seed: int = 0, shadow: str | None = None, download: bool = False) -> Data:
    """Load a dataset onto the device and cut it into train/val/forget/retain/test splits.

    The validation split holds out val_fraction of each class (seed split_seed); train_subset > 0 keeps a
    random subset of the remaining training images (same seed). Forgetting is class-wise (forget_class) or
    random-sample (forget_random images drawn with forget_seed); with neither, forget is empty.

    shadow = "k/N" keeps the half of the training split that shadow model k of N trains on (shadow_members), for a
    membership audit (audit.py lira). Random-sample forgetting draws its images before the halving and forgets
    those the half kept, so every shadow forgets its own share of one fixed pool of target images."""
    info, (x_train, y_train), (x_test, y_test) = load_dataset(dataset, data_dir, download)
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if forget_class is not None and forget_random:
        raise UserError("give either --forget-class or --forget-random, not both")
    if forget_class is not None and not 0 <= forget_class < info.num_classes:
        raise UserError(f"--forget-class {forget_class} out of range: {dataset} has classes 0..{info.num_classes - 1}")

    split_gen = torch.Generator().manual_seed(split_seed)
    val_parts, train_parts = [], []
    for c in range(info.num_classes):
        idx = torch.nonzero(y_train == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=split_gen)]
        n_val = int(round(val_fraction * len(idx)))
        val_parts.append(idx[:n_val])
        train_parts.append(idx[n_val:])
    val = torch.cat(val_parts).sort().values
    train = torch.cat(train_parts).sort().values
    if train_subset:
        if not 0 < train_subset <= len(train):
            raise UserError(f"--train-subset {train_subset} must be in 1..{len(train)}")
        train = train[torch.randperm(len(train), generator=split_gen)[:train_subset]].sort().values
    if forget_random and not 0 < forget_random < len(train):
        raise UserError(f"--forget-random {forget_random} must be in 1..{len(train) - 1} "
                        f"(the training split has {len(train)} images)")
    # A separate generator from the split's on purpose: the forget set does not move when the split seed does.
    pool = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(forget_seed))[:forget_random]]
    if shadow is not None:
        train = train[shadow_members(shadow, len(train))]

    if forget_class is not None:
        forget = train[y_train[train] == forget_class]
        test_forget_mask = y_test == forget_class
    elif forget_random:
        forget = pool[torch.isin(pool, train)].sort().values
        test_forget_mask = torch.zeros_like(y_test, dtype=torch.bool)
    else:
        forget = train[:0]
        test_forget_mask = torch.zeros_like(y_test, dtype=torch.bool)
    retain = train[~torch.isin(train, forget)]

    spec = dict(dataset=dataset, val_fraction=val_fraction, split_seed=split_seed, train_subset=train_subset,
                shadow=shadow, forget_class=forget_class, forget_random=forget_random,
                forget_seed=forget_seed if forget_random else None,
                forget_count=len(forget), forget_hash=index_hash(forget) if len(forget) else None)
    device = torch.device(device)
    return Data(dataset, info, x_train.to(device), y_train.to(device), x_test.to(device), y_test.to(device),
                *(t.to(device) for t in (train, val, forget, retain,
                                          torch.nonzero(~test_forget_mask).flatten(),
                                          torch.nonzero(test_forget_mask).flatten())),
                spec=spec)


def data_from_spec(spec: dict, data_dir: str | Path, device: torch.device | str) -> Data:
    """Rebuild the exact splits recorded in a sidecar's "data" entry; its forget hash, if any, must match them."""
    data = make_data(spec["dataset"], data_dir, device, val_fraction=spec["val_fraction"],
                     split_seed=spec["split_seed"], train_subset=spec["train_subset"],
                     forget_class=spec["forget_class"], forget_random=spec["forget_random"],
                     forget_seed=spec["forget_seed"] or 0, shadow=spec.get("shadow"))
    if spec.get("forget_hash") and spec["forget_hash"] != data.forget_hash:
        raise UserError(f"a sidecar's forget hash {spec['forget_hash']} does not match the forget set its split "
                        f"spec describes ({data.forget_hash}): the sidecar was edited or corrupted")
    return data


def augment(x: torch.Tensor, info: DatasetInfo, gen: torch.Generator | None = None) -> torch.Tensor:
    """Random crop with zero padding and (where the dataset allows) horizontal flip, on the whole batch."""
    n, _, h, w = x.shape
    pad = info.crop_pad
    if pad:
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=gen)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        x = padded[torch.arange(n, device=x.device)[:, None, None, None],
                   torch.arange(x.shape[1], device=x.device)[None, :, None, None], rows, cols]
    if info.flip:
        flip = torch.rand(n, device=x.device, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


@functools.cache
def _channel_constants(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once per device: a tensor built from a Python list on CUDA is a host-to-device copy that waits for the
    # GPU, and once per batch it stopped the host from queueing the next step's kernels while the GPU ran.
    return tuple(torch.tensor(v, device=device).view(1, -1, 1, 1) for v in (mean, std))


def normalize(x: torch.Tensor, info: DatasetInfo, input_size: int | None = None) -> torch.Tensor:
    """uint8 images -> normalised float in channels_last, resized on the device when the model wants another
    input size."""
    mean, std = _channel_constants(info.mean, info.std, x.device)
    x = (x.float() / 255 - mean) / std
    if input_size and input_size != x.shape[-1]:
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False)
    return x.contiguous(memory_format=torch.channels_last)


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = False,
            gen: torch.Generator | None = None, drop_last: bool = False, shard: tuple[int, int] = (0, 1),
            seen: torch.Tensor | None = None) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Index-slice batches of (uint8 images, labels) from tensors already on the device.

    shard=(rank, world size): this process's rank::world part of every batch, for data-parallel training; the
    processes draw the same order from identically seeded generators, so each example of an epoch goes to exactly
    one of them and the world's batch is the single-process batch. seen, if given, counts the indices yielded."""
    rank, world = shard
    order = torch.randperm(len(x), device=x.device, generator=gen) if shuffle else torch.arange(len(x), device=x.device)
    stop = len(x) - batch_size + 1 if drop_last else len(x)
    for start in range(0, max(stop, 0), batch_size):
        idx = order[start:start + batch_size][rank::world]
        if seen is not None:
            seen.index_add_(0, idx, torch.ones_like(idx))
        yield x[idx], y[idx]


# ----------------------------------------------------------------------------------------------------
# Models: timm architectures, CIFAR-style stems for small images.

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
    from timm.layers import build_sincos2d_pos_embed
    from timm.models.vision_transformer import VisionTransformer
    model = VisionTransformer(img_size=info.size, patch_size=4, in_chans=info.channels, num_classes=num_classes,
                              embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=4.0,
                              class_token=False, global_pool="avg")
    grid = model.patch_embed.grid_size
    model.pos_embed.data.copy_(build_sincos2d_pos_embed(list(grid), width).unsqueeze(0))
    model.pos_embed.requires_grad_(False)  # fixed 2-D sin-cos position embedding
    return model


def build_model(arch: str, info: DatasetInfo, pretrained_weights: str | None = None) -> nn.Module:
    """Build an architecture for a dataset's channel count and class count (random init unless vit_base)."""
    import timm
    from timm.models.resnet import BasicBlock, ResNet
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


# ----------------------------------------------------------------------------------------------------
# Pruning: torch.nn.utils.prune keeps weight = weight_orig * weight_mask, so pruned weights stay zero
# through every later update (momentum and weight decay included) until make_pruning_permanent.

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
    """Drop the masks but keep the zeros, so later updates may regrow pruned weights (the seed code's behaviour)."""
    for name in pruned_modules(model):
        prune.remove(dict(model.named_modules())[name], "weight")


def sparsity(model: nn.Module, family: str) -> float:
    """Fraction of exactly-zero weights over the prunable layers (head and norms excluded)."""
    weights = [m.weight for m in prunable_modules(model, family).values()]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


# ----------------------------------------------------------------------------------------------------
# Shrinking a structurally pruned model (--shrink): half of every pruned layer computes zeros, so train a
# physically smaller copy instead and write its weights back. A pruned filter's output is exactly zero, but
# after the BatchNorm and activation that follow it (or, in a ViT MLP, its bias and GELU) it is a constant
# per channel, not zero, and the next layer reads it: the shrunk next layer adds that constant's contribution
# from the removed input channels itself (a map, not a vector, where zero padding makes the borders differ),
# so outputs, gradients and BatchNorm statistics are the masked model's to float rounding. Only channels read
# by a single layer inside a block are removed: the residual stream's channels (a block's last layer, the
# attention's) are summed with the shortcut, so those layers keep their masked rows. LoRA on a shrunk layer
# keeps A's columns for the removed inputs (lora_A_removed, applied to their constants), so PruneLoRA trains
# the masked model's adapters; under adapter dropout those constant inputs enter undropped (their expectation).

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
    from timm.layers import Mlp
    from timm.models.resnet import BasicBlock, Bottleneck
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
    return weight if layer.pruned_rows is None else weight * _per_row(layer.pruned_rows, weight)


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


def shrink_pruned(model: nn.Module, family: str) -> nn.Module:
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
    return prepare_model(small, next(model.parameters()).device)


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


# ----------------------------------------------------------------------------------------------------
# LoRA through peft (its config, injection and merge) with a lean forward of our own for the adapted layers,
# because peft's generic one costs more than fine-tuning does on a frozen base:
# - a pruned layer must stay exactly sparse, so its update is M * (BA). When M keeps or zeroes whole output
#   filters/rows (M = m 1^T, structured pruning) that is (diag(m) B) A x: the mask and LoRA's scaling go into
#   B's few weights, not over the full-size output; only an unstructured mask needs the dense delta M * (BA)
#   and a second full convolution. A BatchNorm folded into the frozen convolution (frozen_batchnorm) scales
#   B's rows the same way.
# - dropout: peft keeps the dropped copy of every adapted input for A's backward (float, twice) and draws it
#   with torch's Bernoulli sampler, which costs more than the adapters themselves on a CPU. Here the mask is
#   drawn from 16 random bits per element (lora_drop_mask), only that mask is stored (one byte per element),
#   and backward rebuilds the dropped input from x, which the network keeps anyway (_LowRank).
# - inputs rebuilt in backward: A's weight gradient needs A's input. Where that is a LayerNorm's or a GELU's
#   output (ViT's qkv, fc1, fc2), A keeps the module's input, which the network keeps anyway, and reruns the
#   module in backward (_mark_rebuildable): a ViT-S LoRA step keeps a third less (the GELU's 4x-wide output
#   above all) for 1.5% more work.

def output_row_mask(mask: torch.Tensor) -> torch.Tensor | None:
    """m if the pruning mask keeps or zeroes whole output rows/filters (mask = m 1^T), else None."""
    rows = mask.flatten(1)
    kept = rows.all(dim=1)
    return kept if torch.equal(kept, rows.any(dim=1)) else None


def lora_drop_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A dropout mask shaped and laid out like x, True where an element is dropped: each with probability p,
    p rounded to a multiple of 2**-16 (at most 8e-6 off). Four elements per 64-bit draw of the global generator:
    a quarter of the draws of torch's Bernoulli sampler, which took a fifth of a ResNet-50 LoRA training step
    on a CPU. Under torch.compile, one uniform draw per element instead: random_ on int64 would break the graph
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


def _down_projection(down: nn.Module, dropout: nn.Module, x: torch.Tensor) -> torch.Tensor:
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
    drop = lora_drop_mask(x, p) if p else None
    hidden = _LowRank.apply(x, down.weight, drop, source, rebuild, conv_args)
    return hidden * (1.0 / (1.0 - p)) if p else hidden


def _with_weight(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The layer's own operation (a conv with its stride and padding, or a linear) on x with another weight, no bias."""
    return layer._conv_forward(x, weight, None) if isinstance(layer, nn.Conv2d) else F.linear(x, weight)


def _per_row(factor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-output-row factor shaped to broadcast over a weight like `like`."""
    return factor.to(like.dtype).view(-1, *[1] * (like.dim() - 1))


def _plus_low_rank(result: torch.Tensor, up: nn.Module, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """result + up(hidden) with up's weight replaced by `weight` (B). For a linear B, one addmm over the tokens:
    the sum is written once, not B's full-size output first and then the sum. (For a convolution's B, the same
    over a channels_last map, in place into result or not, measured no faster on CPU than the convolution and
    the add.)"""
    if isinstance(up, nn.Linear) and result.is_contiguous() and hidden.is_contiguous() and hidden.dtype == result.dtype:
        summed = torch.addmm(result.reshape(-1, result.shape[-1]), hidden.reshape(-1, hidden.shape[-1]), weight.t())
        return summed.view(result.shape)
    return result + _with_weight(up, hidden, weight).to(result.dtype)


def _lean_lora_forward(layer, x: torch.Tensor) -> torch.Tensor:
    removed_inputs = getattr(layer, "lora_A_removed", {})  # A's columns for a shrunk layer's removed inputs
    constants = layer.base_layer.removed_constants() if removed_inputs else None  # computed once per step
    result = layer.base_layer(x, constants) if removed_inputs else layer.base_layer(x)
    mask = getattr(layer.base_layer, "weight_mask", None)
    rows = getattr(layer.base_layer, "weight_row_mask", None)  # set by fold_frozen_masks if the mask is m 1^T
    folded_scale = getattr(layer, "folded_batchnorm_scale", None)  # set by frozen_batchnorm
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        dropout = layer.lora_dropout[name]
        if mask is not None and rows is None:  # unstructured mask: the exact update needs the dense delta
            delta = mask * layer.get_delta_weight(name)
            if folded_scale is not None:
                delta = delta * _per_row(folded_scale, delta)
            result = result + _with_weight(layer.base_layer, dropout(x).to(result.dtype), delta.to(result.dtype))
            continue
        hidden = _down_projection(layer.lora_A[name], dropout, x)
        if name in removed_inputs:  # constants: with dropout, their expectation enters
            term = layer.base_layer.removed_input_term(constants, removed_inputs[name], x.shape[-2:])
            hidden = hidden + term.to(hidden.dtype)
        up = layer.lora_B[name]
        weight = up.weight * layer.scaling[name]
        for factor in (rows, folded_scale):  # one factor per output channel: B's rows
            if factor is not None:
                weight = weight * _per_row(factor, weight)
        result = _plus_low_rank(result, up, hidden, weight.to(result.dtype))
    return result


def _lora_layer_classes():
    from peft.tuners.lora import layer as lora_layer

    def lean(cls):
        class Lean(cls):
            def uses_lean_forward(self) -> bool:
                return not (self.disable_adapters or self.merged or self.lora_variant
                            or any(up.bias is not None for up in self.lora_B.values())
                            or any(isinstance(getattr(down, "padding", 0), str) for down in self.lora_A.values()))

            def forward(self, x, *args, **kwargs):
                if args or kwargs or not self.uses_lean_forward():
                    return super().forward(x, *args, **kwargs)  # peft's general path for what we do not use
                return _lean_lora_forward(self, x)
        Lean.__name__ = Lean.__qualname__ = f"Lean{cls.__name__}"
        return Lean

    return {nn.Conv2d: lean(lora_layer.Conv2d), nn.Linear: lean(lora_layer.Linear)}


# Dr images whose statistics replace the dense model's after pruning (--calibration-images). On the demo's
# pruned model, 2,048 images give the validation accuracy of the whole Dr (10,817) within 0.1 point over four
# draws (RESULTS.md, cost); on a CPU a ResNet-50 forward over 10,000 would cost more than a short unlearning run.
BN_CALIBRATION_IMAGES = 2_048

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
             train_head: bool = True) -> nn.Module:
    """Freeze the model and wrap it with peft LoRA adapters; the classifier head stays trainable if train_head.

    targets: a regex over module names, or comma-separated name suffixes (peft's conventions)."""
    from peft import LoraConfig, get_peft_model
    target_modules = targets if any(ch in targets for ch in "\\.*[") else [t.strip() for t in targets.split(",")]
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        modules_to_save=[classifier_name(model)] if train_head else None, init_lora_weights=True)
    config._register_custom_module(_lora_layer_classes())
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as err:
        raise UserError(f"LoRA targets {targets!r} match no layer of this model ({str(err).splitlines()[0][:100]})")
    for m in peft_model.modules():
        if getattr(getattr(m, "base_layer", None), "pruned_weight", None) is not None and hasattr(m, "lora_A"):
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
    layer.lora_A_removed = nn.ParameterDict()
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


def fold_frozen_masks(model: nn.Module) -> None:
    """On pruned layers whose weights are frozen, multiply the mask into the weight once and keep the mask as a
    plain buffer, instead of recomputing weight_orig * mask in every forward and keeping the product for
    backward; a structured mask's rows (output_row_mask) are kept too. merge_lora turns them back into
    ordinary pruned layers."""
    for m in model.modules():
        if hasattr(m, "weight_orig") and not m.weight_orig.requires_grad:
            mask = m.weight_mask
            prune.remove(m, "weight")
            m.register_buffer("weight_mask", mask)
            m.register_buffer("weight_row_mask", output_row_mask(mask), persistent=False)


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
            if hasattr(m, "lora_A_removed"):
                _merge_removed_inputs(m)
    for hook in getattr(peft_model, "rebuild_hooks", ()):
        hook.remove()
    model = peft_model.merge_and_unload()
    apply_masks(model, masks)
    return model


# ----------------------------------------------------------------------------------------------------
# Training and inference.

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def device_and_generator(name: str, *, seed: int) -> tuple[torch.device, torch.Generator]:
    """Seed every global random number generator, pick the device, and return it with a generator on it seeded
    the same: a script's own randomness (batch order, augmentation, sampling) draws from that generator."""
    seed_everything(seed)
    device = pick_device(name)
    return device, torch.Generator(device=device).manual_seed(seed)


def torchrun_world_size() -> int:
    """The number of processes of this torchrun job (torchrun's WORLD_SIZE), 1 outside torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device_name: str) -> tuple[torch.device, int, int]:
    """(device, rank, world size). Under torchrun (WORLD_SIZE > 1) this process joins its process group: NCCL and
    the GPU of its local rank on CUDA, gloo on CPU; every process but 0 prints nothing (one report). Otherwise it
    is alone: (the picked device, 0, 1)."""
    world = torchrun_world_size()
    device = pick_device(device_name)
    if world == 1:
        return device, 0, 1
    import torch.distributed as dist
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.get_rank():
        sys.stdout = open(os.devnull, "w")
    return device, dist.get_rank(), world


def pick_device(name: str) -> torch.device:
    """The device a flag names ("auto": CUDA if there is one); on the CPU, freed memory is kept for reuse."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is available")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else torch.device(name)
    if device.type == "cpu":
        keep_freed_memory()
    return device


def keep_freed_memory() -> None:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the OS (a no-op without
    glibc). A training step frees and allocates the same large tensors every step; by default glibc maps those
    over 32 MB afresh and trims the freed top of its heap, so each step faulted its tensors' pages in again:
    200,000 page faults and a tenth of a ResNet-50 CPU step at batch 32 (RESULTS.md, cost). CUDA's caching
    allocator already reuses."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h>
    mallopt(m_mmap_max, 0)  # every block from the heap, which is reused
    mallopt(m_trim_threshold, 2**31 - 1)  # never give the heap's free top back


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op elsewhere (CPU bf16 is slower than fp32 on most machines)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """The model on the device, in channels_last (oneDNN's and cuDNN's fast layout for convolutions)."""
    return model.to(device).to(memory_format=torch.channels_last)


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
        is_lora = isinstance(getattr(m, "base_layer", None), nn.Conv2d)
        previous = m if isinstance(m, nn.Conv2d) or is_lora else None
        conv_parts = name + "." if previous is not None else None
    return pairs


def _frozen_conv(conv: nn.Module) -> nn.Conv2d | None:
    """The plain frozen, bias-free Conv2d computing conv's base output if a BatchNorm may be folded into it: conv
    itself, or the base layer of a LoRA layer on the lean forward (which scales the adapter rows the same way)."""
    if hasattr(conv, "base_layer"):
        if not getattr(conv, "uses_lean_forward", lambda: False)():
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
    from torchvision.ops.misc import FrozenBatchNorm2d

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
                setattr(base, attr, nn.Parameter(original * _per_row(scale, original), requires_grad=False))
            base.bias = nn.Parameter(bn.bias - bn.running_mean * scale, requires_grad=False)
            if base is not conv:
                conv.folded_batchnorm_scale = scale
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
            conv.__dict__.pop("folded_batchnorm_scale", None)
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


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated since the last reset, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def saved_activation_bytes(model: nn.Module,
                           forward: Callable[[nn.Module], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """forward(model), and the bytes autograd keeps for backward while it runs: distinct storages, the model's
    parameters and buffers excluded. The activation memory of a training step, the same figure on any device."""
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward(model)  # its graph keeps every saved storage alive, so no pointer is freed and reused
    return out, sum(saved.values())


@dataclass
class TrainResult:
    wall_time_s: float
    peak_mem_mb: float
    history: list[dict]
    trainable_params: int  # the parameters the update changed
    activation_bytes: int | None = None  # saved for backward in the first step (train_loop's measure_activations)


def train_loop(model: nn.Module, optimizer: torch.optim.Optimizer, epochs: int,
               epoch_batches: Callable[[int], Iterable], loss_fn: Callable[[nn.Module, tuple], torch.Tensor], *,
               device: torch.device, scheduler=None, freeze_bn: bool = False, grad_clip: float = 0.0,
               after_epoch: Callable[[int], dict] | None = None, desc: str = "train",
               compile_model: bool = False, measure_activations: bool = False, log: bool = True) -> TrainResult:
    """The one training loop: loss_fn(model, batch) -> scalar loss; epoch_batches(epoch) yields batches.

    The scheduler (if any) steps once per batch. after_epoch(epoch) may return metrics to log (on
    validation data only). A non-finite loss stops the run with a UserError. compile_model hands loss_fn a
    torch.compile'd view of the model (same parameters; the first steps pay the compilation).
    measure_activations records the first step's saved_activation_bytes (not with compile_model). log=False
    keeps the per-epoch JSON lines off the output (for callers whose "epochs" are single steps)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    history, activation_bytes = [], None
    with frozen_batchnorm(model) if freeze_bn else contextlib.nullcontext():
        # Compiled after the BatchNorm swap, so the graph is the one trained; the caller keeps the plain module.
        forward_model = torch.compile(model) if compile_model else model
        for epoch in range(epochs):
            set_train_mode(model, freeze_bn)
            total, steps = torch.zeros((), device=device), 0
            bar = tqdm(epoch_batches(epoch), desc=f"{desc} {epoch + 1}/{epochs}", leave=False,
                       disable=None, dynamic_ncols=True)
            for batch in bar:
                with autocast(device):
                    if measure_activations and activation_bytes is None:
                        loss, activation_bytes = saved_activation_bytes(forward_model, lambda m: loss_fn(m, batch))
                    else:
                        loss = loss_fn(forward_model, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, grad_clip)
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                total += loss.detach().float()
                steps += 1
                if steps % 50 == 0 and not math.isfinite(float(total)):
                    break
            mean_loss = float(total) / max(steps, 1)
            if not math.isfinite(mean_loss):
                raise UserError(f"{desc}: loss became {mean_loss} in epoch {epoch + 1}: the run diverged; "
                                "lower the learning rate (nothing was written)")
            record = dict(epoch=epoch + 1, loss=round(mean_loss, 5), time_s=round(time.perf_counter() - start, 2))
            if after_epoch is not None:
                record.update(after_epoch(epoch))
            history.append(record)
            if log:
                tqdm.write(json.dumps(record))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return TrainResult(time.perf_counter() - start, peak_memory_mb(device), history,
                       trainable_params=sum(p.numel() for p in params), activation_bytes=activation_bytes)


def ce_loss(info: DatasetInfo, input_size: int | None, augment_batches: bool, gen: torch.Generator | None = None):
    """Cross-entropy on (uint8 images, labels) batches, with on-device augmentation if asked."""
    def loss_fn(model, batch):
        x, y = batch
        if augment_batches:
            x = augment(x, info, gen)
        return F.cross_entropy(model(normalize(x, info, input_size)), y)
    return loss_fn


def random_labels(labels: torch.Tensor, num_classes: int, gen: torch.Generator, wrong_only: bool) -> torch.Tensor:
    """Uniform random labels over all classes, or (wrong_only) over the classes other than the true one."""
    if wrong_only:
        shift = torch.randint(1, num_classes, labels.shape, device=labels.device, generator=gen)
        return (labels + shift) % num_classes
    return torch.randint(0, num_classes, labels.shape, device=labels.device, generator=gen)


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) summed over classes, averaged over the batch, times T^2
    (Hinton et al. 2015's scaling; SCRUB's DistillKL). The teacher side carries no gradient."""
    return F.kl_div(F.log_softmax(student_logits.float() / temperature, 1),
                    F.softmax(teacher_logits.detach().float() / temperature, 1),
                    reduction="batchmean") * temperature ** 2


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy, pruning masks included."""
    # torch.nn.utils.prune's `weight` (weight_orig * weight_mask, recomputed before every forward) is not a graph
    # leaf, which deepcopy refuses: the copy starts from a detached stand-in.
    memo = {id(m.weight): m.weight.detach().clone() for m in model.modules() if hasattr(m, "weight_orig")}
    return copy.deepcopy(model, memo)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of model in eval mode with no trainable parameter: a teacher. Pruning masks are copied too."""
    return copy_model(model).eval().requires_grad_(False)


def batch_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, info: DatasetInfo, input_size: int | None,
                    *, batch_size: int, augment_gen: torch.Generator | None = None):
    """For each batch of (x, y) in order, the gradient of the batch-mean cross-entropy with respect to each
    trainable parameter ({name: tensor}), the model in eval mode (BatchNorm on its running statistics).
    augment_gen: augment each batch as in training, drawing from that generator."""
    model.eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    device = next(model.parameters()).device
    for xb, yb in batches(x, y, batch_size):
        if augment_gen is not None:
            xb = augment(xb, info, augment_gen)
        with autocast(device):
            loss = F.cross_entropy(model(normalize(xb, info, input_size)).float(), yb)
        yield dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, info: DatasetInfo, input_size: int | None = None,
            batch_size: int = 1024, fp32: bool = False, features: bool = False) -> torch.Tensor:
    """Float32 logits for uint8 images, in eval mode, batch by batch, returned on the CPU.

    fp32=True computes them without bf16 autocast on CUDA too (evaluation: attacks read small differences).
    features=True returns the classifier head's input instead (timm's forward_head(pre_logits=True))."""
    model.eval()
    device = next(model.parameters()).device

    def forward(xb):
        return model.forward_head(model.forward_features(xb), pre_logits=True) if features else model(xb)
    out = []
    for start in range(0, len(x), batch_size):
        with autocast(device) if not fp32 else contextlib.nullcontext():
            out.append(forward(normalize(x[start:start + batch_size].to(device), info, input_size)).float().cpu())
    return torch.cat(out) if out else torch.empty(0, info.num_classes)


def per_sample_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                         loss_of_logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gradient of loss_of_logits(logits_i, y_i) w.r.t. each trainable parameter, one per sample (torch.func).

    x is a normalised batch; the model should be in eval mode so BatchNorm uses its running statistics."""
    from torch.func import functional_call, grad, vmap
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def sample_loss(params, xi, yi):
        return loss_of_logits(functional_call(model, (params, buffers), (xi.unsqueeze(0),)).squeeze(0), yi)

    return vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in percent (nan for an empty set)."""
    return float((logits.argmax(1) == y.cpu()).float().mean() * 100) if len(y) else float("nan")


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9):
    """Adam, AdamW or SGD (momentum) over the trainable parameters, or over given parameter groups."""
    params = list(params)
    if not (params and isinstance(params[0], dict)):
        params = [p for p in params if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise UserError(f"unknown optimizer {name!r}; choose adam, adamw or sgd")


def make_scheduler(name: str, optimizer, total_steps: int, warmup_steps: int = 0, start_step: int = 0):
    """Per-step schedule: "none", "cosine" (with optional linear warm-up) or "step" (x0.1 at 50% and 75%).

    start_step > 0 resumes the schedule at that step (prune.py retrains from a rewind point)."""
    if name == "none":
        return None
    if name == "cosine":
        def factor(step):
            if step < warmup_steps:
                return (step + 1) / warmup_steps
            return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    elif name == "step":
        def factor(step):
            return 0.1 ** ((step >= total_steps // 2) + (step >= total_steps * 3 // 4))
    else:
        raise UserError(f"unknown schedule {name!r}; choose none, cosine or step")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step + start_step))


# ----------------------------------------------------------------------------------------------------
# Checkpoints: plain safetensors weights + a JSON sidecar, written atomically, never silently overwritten.

def sidecar_path(weights: str | Path) -> Path:
    return Path(weights).with_suffix(".json")


def default_output(out_dir: str | Path, data: Data, arch: str, method: str, seed: int) -> Path:
    """A name that says what the file is, e.g. fashion-mnist_resnet_tiny_class3_finetune_s0.safetensors."""
    spec = data.spec
    if spec["forget_class"] is not None:
        forget = f"class{spec['forget_class']}"
    elif spec["forget_random"]:
        forget = f"random{spec['forget_random']}-f{spec['forget_seed']}"
    else:
        forget = "full"
    shadow = "" if spec["shadow"] is None else f"_shadow{spec['shadow'].replace('/', 'of')}"
    return Path(out_dir) / f"{data.name}_{arch}{shadow}_{forget}_{method}_s{seed}.safetensors"


def _lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


def _claim(path: Path) -> None:
    """Take path's lock file, or fail if a live process holds it; a dead process's lock is taken over.

    The lock appears with its owner's pid already in it (a hard link of a finished temp file: create-or-fail)."""
    lock = _lock_path(path)
    mine = lock.with_name(f"{lock.name}.{os.getpid()}")
    try:
        mine.write_text(str(os.getpid()))
        for _ in range(2):
            try:
                os.link(mine, lock)
            except FileExistsError:
                try:
                    pid = int(lock.read_text())
                except (OSError, ValueError):
                    pid = 0
                if pid == os.getpid():
                    return
                if pid and _alive(pid):
                    raise UserError(f"{path} is being written by another run (pid {pid}); wait for it or "
                                    "choose another --out") from None
                lock.unlink(missing_ok=True)  # left by a run that died: take it over
                continue
            atexit.register(lock.unlink, missing_ok=True)
            return
    except OSError as err:
        raise UserError(f"cannot write to {path.parent} ({err.strerror})") from None
    finally:
        mine.unlink(missing_ok=True)
    raise UserError(f"cannot claim {path}: another run keeps taking its lock {lock}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def finished(path: str | Path) -> bool:
    """A checkpoint is finished when its weights and its sidecar (written last) are both there."""
    return Path(path).is_file() and sidecar_path(path).is_file()


def check_output_files(paths: Iterable[str | Path | None], overwrite: bool) -> list[Path]:
    """Report files (JSON, markdown, CSV) checked before any work: distinct, absent unless overwrite, writable."""
    paths = [Path(p) for p in paths if p]
    if len(set(paths)) < len(paths):
        raise UserError(f"two outputs name the same file ({', '.join(map(str, paths))})")
    for path in paths:
        if path.exists() and not path.is_file():
            raise UserError(f"output {path} exists and is not a regular file")
        if path.exists() and not overwrite:
            raise UserError(f"{path} exists; pass --overwrite to replace it")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create the output folder {path.parent} ({err.strerror})") from None
        if not os.access(path.parent, os.W_OK):
            raise UserError(f"cannot write to {path.parent}")
    return paths


def check_writable(path: str | Path, overwrite: bool) -> Path:
    """Claim an output before any work: a .safetensors name in a writable folder, nothing there yet (unless
    overwrite: even the leftovers of a killed run are kept until asked), and no other live run writing it."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"output {path} must end in .safetensors")
    if path.exists() and not path.is_file():
        raise UserError(f"output {path} exists and is not a regular file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the output folder {path.parent} ({err.strerror})") from None
    if not overwrite and (path.exists() or sidecar_path(path).exists()):
        raise UserError(f"{path} exists; pass --overwrite to replace it")
    _claim(path)
    return path


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions() -> dict:
    import peft
    import safetensors
    import timm
    import torchvision
    return dict(python=platform.python_version(), torch=torch.__version__, torchvision=torchvision.__version__,
                timm=timm.__version__, peft=peft.__version__, safetensors=safetensors.__version__,
                numpy=np.__version__, cuda=torch.version.cuda if torch.cuda.is_available() else None)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) to a temporary file beside path, then rename it over path: readers never see half a file.
    The file gets the mode open() would give it (safetensors creates its files readable by their owner only)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_png(fig, path: Path) -> None:
    """Write a matplotlib figure as a PNG (atomically, creating its folder) and close it."""
    import matplotlib.pyplot as plt
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


WEIGHT_LIMIT = 1e4  # |weight| beyond this is a diverged run: trained weights of these networks stay below ~100


def check_weights(state: dict[str, torch.Tensor], what: str) -> None:
    """Refuse non-finite or exploded weights (BatchNorm running statistics are exempt from the bound)."""
    floats = {k: v for k, v in state.items() if v.is_floating_point()}
    bad = [k for k, v in floats.items() if not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"{what}: {len(bad)} tensor(s) hold NaN or inf (first: {bad[0]}): the run diverged; "
                        "lower the learning rate or the noise scale")
    big = [k for k, v in floats.items() if not k.endswith(("running_mean", "running_var"))
           and len(v) and float(v.abs().max()) > WEIGHT_LIMIT]
    if big:
        raise UserError(f"{what}: weights beyond |{WEIGHT_LIMIT:g}| (first: {big[0]}): the run diverged; "
                        "lower the learning rate")


def save_checkpoint(model: nn.Module, path: str | Path, *, arch: str, method: str, data: Data, config: dict,
                    result: TrainResult | None, trainable_params: int, extra: dict | None = None,
                    overwrite: bool = False) -> dict:
    """Write plain weights (.safetensors), then the sidecar (.json) that makes them a checkpoint; return the sidecar.

    Nothing is written for non-finite or exploded weights. Each file appears whole (temp file + rename), the
    sidecar last, while this process holds the output's lock (check_writable)."""
    from safetensors.torch import save_file
    path = check_writable(path, overwrite)
    state = plain_state_dict(model)
    check_weights(state, f"{method} -> {path}: nothing was written")
    family = ARCHS[arch].family
    meta = dict(format=FORMAT, arch=arch, method=method, num_classes=data.info.num_classes,
                in_chans=data.info.channels, data=data.spec, config=config, argv=sys.argv[1:],
                wall_time_s=round(result.wall_time_s, 3) if result else None,
                peak_mem_mb=round(result.peak_mem_mb, 1) if result else None,
                peak_mem_kind=("cuda_max_allocated" if next(model.parameters()).is_cuda else "process_max_rss"),
                trainable_params=trainable_params, total_params=count_params(model)[1],
                sparsity=round(sparsity(model, family), 6), pruned_modules=pruned_modules(model),
                history=result.history if result else [], versions=library_versions(), git_commit=_git_commit(),
                created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(extra or {}))
    sidecar_path(path).unlink(missing_ok=True)  # with --overwrite: the old pair stops being a checkpoint first
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={"format": FORMAT, "arch": arch}))
    meta["weights_sha256"] = _sha256(path)
    atomic_write(sidecar_path(path), lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
    _lock_path(path).unlink(missing_ok=True)
    return meta


SIDECAR_KEYS = dict(format=str, arch=str, method=str, num_classes=int, in_chans=int, data=dict, config=dict,
                    pruned_modules=list, weights_sha256=str)
DATA_KEYS = dict(dataset=str, val_fraction=(int, float), split_seed=int, train_subset=int,
                 forget_class=(int, type(None)), forget_random=int, forget_seed=(int, type(None)),
                 forget_hash=(str, type(None)))


def _regular_file(path: Path, what: str) -> None:
    if not path.exists():
        raise UserError(f"{what} {path} not found")
    if not path.is_file():  # follows symlinks: a link to /dev/zero or a FIFO is refused here, before any read
        raise UserError(f"{what} {path} is not a regular file")


def read_sidecar(path: str | Path) -> dict:
    """The sidecar of a checkpoint, checked against the keys and types every stage relies on."""
    side = sidecar_path(path)
    _regular_file(Path(path), "checkpoint")
    if not side.exists():
        raise UserError(f"{path} has no sidecar {side}: not a finished checkpoint of this toolkit")
    _regular_file(side, "sidecar")
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"sidecar {side} is not valid UTF-8 JSON ({str(err)[:80]})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{side} is not a {FORMAT} sidecar")
    for keys, where in ((SIDECAR_KEYS, meta), (DATA_KEYS, meta.get("data"))):
        for key, kind in keys.items():
            if not isinstance(where, dict) or key not in where:
                raise UserError(f"sidecar {side} lacks {key!r}: corrupted or from another tool")
            if not isinstance(where[key], kind) or isinstance(where[key], bool):
                raise UserError(f"sidecar {side} has a {type(where[key]).__name__} for {key!r}: corrupted")
    if meta["arch"] not in ARCHS or meta["data"]["dataset"] not in DATASETS:
        raise UserError(f"sidecar {side} names an unknown architecture or dataset "
                        f"({meta['arch']!r}, {meta['data']['dataset']!r})")
    return meta


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu", *, expect_arch: str | None = None,
                    pretrained_weights: str | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint describes, load its weights and re-attach its pruning masks."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    meta = read_sidecar(path)
    if expect_arch and meta["arch"] != expect_arch:
        raise UserError(f"{path} holds a {meta['arch']} model, not {expect_arch}")
    if _sha256(Path(path)) != meta["weights_sha256"]:
        raise UserError(f"{path} does not match its sidecar's checksum: truncated or replaced")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"cannot read weights {path}: {err}") from None
    check_weights(state, f"checkpoint {path}")
    info = DATASETS[meta["data"]["dataset"]]
    if (info.num_classes, info.channels) != (meta["num_classes"], meta["in_chans"]):
        raise UserError(f"{path}: sidecar class/channel count does not match dataset {meta['data']['dataset']}")
    model = random_model(meta["arch"], info)  # its weights are the checkpoint's: no hub download for vit_base
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise UserError(f"weights in {path} do not fit a {meta['arch']} model "
                        f"({str(err).splitlines()[0][:120]})") from None
    restore_masks(model, meta.get("pruned_modules", []))
    return prepare_model(model, torch.device(device)), meta


def random_model(arch: str, info: DatasetInfo) -> nn.Module:
    """An architecture with random weights, vit_base included (build_model gives vit_base ImageNet's weights)."""
    if arch != "vit_base":
        return build_model(arch, info)
    import timm
    return timm.create_model(VIT_BASE_HUB, pretrained=False, num_classes=info.num_classes, in_chans=info.channels)


# ----------------------------------------------------------------------------------------------------
# Command line: flags shared by every stage, grouped as timm does.

class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's one-line errors: `prog: error: ...` on stderr, exit status 2, no usage dump."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _number(kind, name: str, ok: Callable[[float], bool]):
    """An argparse type: a finite number of `kind` for which ok(value) holds; argparse reports anything else."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {name}") from None
        if not math.isfinite(value) or not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {name}")
        return value
    parse.__name__ = name
    return parse


positive_int = _number(int, "a positive integer", lambda v: v > 0)
non_negative_int = _number(int, "a non-negative integer", lambda v: v >= 0)
positive_float = _number(float, "a finite positive number", lambda v: v > 0)
non_negative_float = _number(float, "a finite non-negative number", lambda v: v >= 0)
unit_fraction = _number(float, "a fraction in [0, 1)", lambda v: 0 <= v < 1)


def device_name(text: str) -> str:
    """auto, cpu, cuda or cuda:N (an argparse type)."""
    if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a device: use auto, cpu, cuda or cuda:N")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10", help=f"one of {', '.join(DATASETS)} (default: %(default)s)")
    g.add_argument("--data-dir", default="./data", help="torchvision dataset root (default: %(default)s)")
    g.add_argument("--download", action="store_true", help="let torchvision download missing data")
    g.add_argument("--val-fraction", type=unit_fraction, default=0.1,
                   help="per-class validation hold-out; 0 keeps every training image (default: %(default)s)")
    g.add_argument("--split-seed", type=non_negative_int, default=0,
                   help="seed of the train/val split (default: %(default)s)")
    g.add_argument("--train-subset", type=non_negative_int, default=0,
                   help="keep only N random training images, for quick runs; 0 = all (default: %(default)s)")
    g.add_argument("--shadow", default=None, metavar="k/N",
                   help="train on shadow k of N's half of the training split (audit.py lira's shadow models); "
                        "--forget-random then forgets those of its images the half holds")


class _RandomForget(argparse.Action):
    """--forget-random N: random-sample forgetting, which replaces the default forget class."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.forget_random, namespace.forget_class = values, None


def add_forget_args(parser: argparse.ArgumentParser, *, forget_class: int) -> None:
    """--forget-class K (default forget_class) or --forget-random N, never both; --forget-seed."""
    g = parser.add_argument_group("forget set")
    kind = g.add_mutually_exclusive_group()
    # The default as a string, which argparse converts when the flag is absent: an explicit --forget-class K
    # then never is the default object, so argparse refuses it beside --forget-random even when K is the default.
    kind.add_argument("--forget-class", type=non_negative_int, default=str(forget_class), metavar="K",
                      help="class-wise forgetting of class K (default: %(default)s)")
    kind.add_argument("--forget-random", type=positive_int, default=0, action=_RandomForget, metavar="N",
                      help="random-sample forgetting of N training images instead")
    g.add_argument("--forget-seed", type=non_negative_int, default=0,
                   help="seed that draws the random forget set (default: %(default)s)")


def add_run_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("run")
    g.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of initialisation and batch order (default: %(default)s)")
    g.add_argument("--device", type=device_name, default="auto",
                   help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the training forward (for CUDA; compiling takes a minute or more)")
    g.add_argument("--out-dir", default="model_weights", help="where checkpoints go (default: %(default)s)")
    g.add_argument("--out", default=None, help="output .safetensors path (default: a descriptive name in --out-dir)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output")


def unlearn_parser(doc: str, *, forget_class: int) -> argparse.ArgumentParser:
    """Parser with the flags every unlearning script shares: the model to unlearn, the forget set, the run."""
    parser = ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint of the original model (pretrain.py's output)")
    parser.add_argument("--data-dir", default="./data", help="torchvision dataset root (default: %(default)s)")
    add_forget_args(parser, forget_class=forget_class)
    add_run_args(parser)
    return parser


def add_optim_args(parser: argparse.ArgumentParser, *, epochs: int, lr: float, batch_size: int, optimizer: str,
                   weight_decay: float, augment: bool) -> None:
    """The update's optimisation flags, with a method's own defaults."""
    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=epochs, help="(default: %(default)s)")
    g.add_argument("--lr", type=positive_float, default=lr, help="(default: %(default)s)")
    g.add_argument("--batch-size", type=positive_int, default=batch_size, help="(default: %(default)s)")
    g.add_argument("--optimizer", default=optimizer, choices=["adam", "adamw", "sgd"],
                   help="sgd uses momentum 0.9 (default: %(default)s)")
    g.add_argument("--weight-decay", type=non_negative_float, default=weight_decay, help="(default: %(default)s)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=augment,
                   help="random crop + flip on the batches (default: %(default)s)")


def add_prune_args(parser: argparse.ArgumentParser, *, method: str, sparsity: float,
                   shrink: bool | None = None) -> None:
    """Flags of the pruning step; method "none" (scripts where pruning is an option) skips it by default.
    shrink=True/False also adds --shrink/--no-shrink with that default (scripts that can train shrunk)."""
    g = parser.add_argument_group("pruning")
    g.add_argument("--prune", default=method, choices=(["none"] if method == "none" else []) + PRUNE_METHODS,
                   help="l2-structured: whole filters/rows by L2 norm, per layer; l1-global: single weights by "
                        "|w| over all layers (default: %(default)s)")
    g.add_argument("--sparsity", type=unit_fraction, default=sparsity, help="fraction pruned (default: %(default)s)")
    g.add_argument("--allow-regrowth", action="store_true",
                   help="drop the pruning masks before the update, as the seed code did (pruned weights regrow)")
    g.add_argument("--recalibrate-bn", action=argparse.BooleanOptionalAction, default=True,
                   help="after pruning, re-estimate BatchNorm statistics on Dr; not with --allow-regrowth, whose "
                        "pruned channels would then be scaled by 1/sqrt(eps) as they regrow (default: %(default)s)")
    g.add_argument("--calibration-images", type=positive_int, default=BN_CALIBRATION_IMAGES,
                   help="Dr images (at most) for that re-estimation, a forward over them (default: %(default)s)")
    if shrink is not None:
        g.add_argument("--shrink", action=argparse.BooleanOptionalAction, default=shrink,
                       help="train a physically smaller network: the pruned filters and the inputs they feed "
                            "removed, their constant outputs kept; the saved model is the usual masked one; "
                            "l2-structured only (default: %(default)s)")


def add_lora_args(parser: argparse.ArgumentParser, *, lora: bool | None = None, train_head: bool = True) -> None:
    """Flags of the LoRA step; lora=True/False also adds the --lora/--no-lora switch with that default (scripts
    where LoRA is an option), None leaves it out (scripts that always adapt through LoRA)."""
    g = parser.add_argument_group("LoRA")
    if lora is not None:
        g.add_argument("--lora", action=argparse.BooleanOptionalAction, default=lora,
                       help="train LoRA adapters (+ head) instead of all weights (default: %(default)s)")
    g.add_argument("--lora-rank", type=positive_int, default=None, help="default: 8 for ResNets, 16 for ViTs")
    g.add_argument("--lora-alpha", type=positive_float, default=None, help="default: 16 for ResNets, 32 for ViTs")
    g.add_argument("--lora-dropout", type=unit_fraction, default=None, help="default: 0.1 for ResNets, 0 for ViTs")
    g.add_argument("--lora-targets", default=None,
                   help="regex or comma-separated module-name suffixes (default: the residual blocks' convs; "
                        "the ViT blocks' qkv, proj, fc1, fc2)")
    g.add_argument("--lora-head", action=argparse.BooleanOptionalAction, default=train_head,
                   help="train the classifier head beside the adapters (default: %(default)s)")
    g.add_argument("--update-bn", action="store_true", help="let BatchNorm running statistics update in LoRA mode")


def print_config(title: str, config: dict) -> None:
    print(f"{title}: " + json.dumps(config, default=str))


# ----------------------------------------------------------------------------------------------------
# Unlearning runs: the steps every unlearning script shares before and after its own objective.

def load_original(path: str | Path, device: torch.device, *, data_dir: str | Path, forget_class: int | None,
                  forget_random: int, forget_seed: int) -> tuple[nn.Module, dict, Data]:
    """The model to unlearn, its sidecar, and its dataset cut into this run's forget set and retain set.

    The dataset and train/val split come from the model's sidecar, so every method sees the same images."""
    model, meta = load_checkpoint(path, device)
    split = {k: v for k, v in meta["data"].items() if k not in ("forget_hash", "forget_count")}
    data = data_from_spec(dict(split, forget_class=forget_class, forget_random=forget_random,
                               forget_seed=forget_seed), data_dir, device)
    return model, meta, data


def claim_output(out: str | Path | None, *, out_dir: str | Path, data: Data, arch: str, method: str, seed: int,
                 overwrite: bool) -> Path:
    """The checkpoint path (out, or a descriptive name in out_dir), claimed before any work (check_writable)."""
    return check_writable(out or default_output(out_dir, data, arch, method, seed), overwrite)


def random_subset(x: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """Up to n rows of x drawn at random without replacement."""
    return x[torch.randperm(len(x), device=x.device, generator=gen)[:n]]


def shuffled_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, gen: torch.Generator):
    """train_loop's epoch_batches for one shuffled pass over (x, y) per epoch."""
    return lambda epoch: batches(x, y, batch_size, shuffle=True, gen=gen)


def quick_report(model: nn.Module, data: Data, input_size: int | None) -> dict:
    """Accuracies a method prints when it ends: Df, Dr, and the test set's retained and forgotten parts."""
    report = {}
    for name, split in (("forget_acc", "forget"), ("retain_acc", "retain"), ("test_retain_acc", "test_retain"),
                        ("test_forget_acc", "test_forget")):
        x, y = data.subset(split)
        report[name] = round(accuracy(predict(model, x, data.info, input_size), y), 3) if len(y) else None
    return report


def save_unlearned(model: nn.Module, out: Path, *, method: str, original: str | Path, original_meta: dict,
                   data: Data, config: dict, result: TrainResult, overwrite: bool, prep_time_s: float = 0.0,
                   sparsity_after_pruning: float | None = None, extra: dict | None = None) -> dict:
    """Save an unlearned plain model (adapters merged) with its sidecar and quick report; return the sidecar.

    The recorded wall time adds prep_time_s (pruning, adapters, BatchNorm re-estimation) to the update's, and
    prep_time_s is recorded too; sparsity_after_pruning is recorded where the script pruned."""
    report = quick_report(model, data, ARCHS[original_meta["arch"]].input_size)
    result = dataclasses.replace(result, wall_time_s=result.wall_time_s + prep_time_s)
    return save_checkpoint(
        model, out, arch=original_meta["arch"], method=method, data=data, config=config, result=result,
        trainable_params=result.trainable_params, overwrite=overwrite,
        extra=dict(parent=str(original), quick_report=report, source_pruned=bool(original_meta.get("pruned_modules")),
                   prep_time_s=round(prep_time_s, 3),
                   **({} if sparsity_after_pruning is None else
                      dict(sparsity_after_pruning=round(sparsity_after_pruning, 6))), **(extra or {})))


def print_summary(sidecar: dict, out: Path) -> None:
    """The one line an unlearning script ends with: cost, Acc(Df), Acc(Dr), test accuracy, output path."""
    report = sidecar["quick_report"]
    scope = "retained classes" if sidecar["data"]["forget_class"] is not None else "whole test set"
    print(f"{sidecar['method']}: {sidecar['wall_time_s']:.1f}s, {sidecar['trainable_params']:,}/"
          f"{sidecar['total_params']:,} params trained, sparsity {sidecar['sparsity']:.3f}; "
          f"Acc(Df) {report['forget_acc']:.2f}%, Acc(Dr) {report['retain_acc']:.2f}%, "
          f"test acc {report['test_retain_acc']:.2f}% ({scope}) -> {out}")
