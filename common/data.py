"""Datasets and splits. Each split lives as one uint8 tensor on the device; forget, retain, validation and test
sets are index tensors over those images, and augmentation runs on whole batches there.

Invariants: the validation split is carved from the official training set by split_seed; the forget set never
moves when the split seed does (its own generator); Data.spec rebuilds exactly these splits (data_from_spec)
and is recorded in every sidecar."""
from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import datasets

from .errors import UserError
from .locks import exclusive


DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist


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
# Random images in a real dataset's shape, for benchmarks (bench.py): a step's cost does not depend on the pixels,
# and these need no files. name -> (the dataset whose shape and classes they take, training images, test images).
RANDOM_DATASETS = {"random-cifar10": ("cifar10", 50_000, 1_000)}
DATASETS.update({name: DATASETS[like] for name, (like, _, _) in RANDOM_DATASETS.items()})


@functools.lru_cache(maxsize=len(RANDOM_DATASETS) * 2)
def _drawn_random_split(name: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    like, train_images, test_images = RANDOM_DATASETS[name]
    info = DATASETS[like]
    gen = torch.Generator().manual_seed(0 if train else 1)
    n = train_images if train else test_images
    x = torch.randint(0, 256, (n, info.channels, info.size, info.size), dtype=torch.uint8, generator=gen)
    return x, torch.randint(0, info.num_classes, (n,), generator=gen)


def _random_split(name: str, train: bool):
    """A random dataset's training or test images (uint8, seeded: the same on every call) and labels. Drawn once
    per process (50,000 CIFAR-sized images take 0.6 s, as long as a benchmarked run's steps), copies returned."""
    x, y = _drawn_random_split(name, train)
    return x.clone(), y.clone()


def _torchvision_split(name: str, root: Path, train: bool, download: bool):
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
    """Unpack the Debian package's Fashion-MNIST files into torchvision's raw/ layout under root. One process
    unpacks; the others starting on the same fresh folder wait for it, so none reads a half-unpacked folder."""
    raw = root / "FashionMNIST" / "raw"
    packed = sorted(DEBIAN_FASHION_MNIST.glob("*-ubyte.gz"))
    if not packed or all((raw / gz.stem).exists() for gz in packed):
        return
    try:
        raw.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot unpack Fashion-MNIST into {raw} ({err.strerror})") from None
    with exclusive(raw / ".unpack.lock"):
        for gz in packed:
            if (raw / gz.stem).exists():
                continue
            tmp = raw / f".{gz.stem}.tmp{os.getpid()}"
            with gzip.open(gz, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(tmp, raw / gz.stem)


def load_dataset(name: str, data_dir: str | Path, download: bool = False):
    """Return (info, (x_train, y_train), (x_test, y_test)) as CPU tensors: uint8 NCHW images, int64 labels."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name in RANDOM_DATASETS:
        return DATASETS[name], _random_split(name, True), _random_split(name, False)
    root = Path(data_dir)
    if name == "fashion-mnist":
        _copy_debian_fashion_mnist(root)
    if download:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot download into {root} ({err.strerror})") from None
    try:
        # Downloads write the folder: one process at a time (the others then find the files there).
        with exclusive(root / f".{name}-download.lock") if download else contextlib.nullcontext():
            train = _torchvision_split(name, root, True, download)
            test = _torchvision_split(name, root, False, download)
    except UserError:
        raise
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
    return Data(name=dataset, info=info, x_train=x_train.to(device), y_train=y_train.to(device),
                x_test=x_test.to(device), y_test=y_test.to(device), train=train.to(device), val=val.to(device),
                forget=forget.to(device), retain=retain.to(device),
                test_retain=torch.nonzero(~test_forget_mask).flatten().to(device),
                test_forget=torch.nonzero(test_forget_mask).flatten().to(device), spec=spec)


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
    # GPU; per batch, it would keep the host from queueing the next step's kernels.
    return tuple(torch.tensor(v, device=device).view(1, -1, 1, 1) for v in (mean, std))


def normalize(x: torch.Tensor, info: DatasetInfo, input_size: int | None = None, *,
              channels_last: bool = True) -> torch.Tensor:
    """uint8 images -> normalised float in channels_last, resized on the device when the model wants another
    input size."""
    mean, std = _channel_constants(info.mean, info.std, x.device)
    x = (x.float() / 255 - mean) / std
    if input_size and input_size != x.shape[-1]:
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


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


def random_subset(x: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """Up to n rows of x drawn at random without replacement."""
    return x[torch.randperm(len(x), device=x.device, generator=gen)[:n]]


def shuffled_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, gen: torch.Generator):
    """train_loop's epoch_batches for one shuffled pass over (x, y) per epoch."""
    return lambda epoch: batches(x, y, batch_size, shuffle=True, gen=gen)
