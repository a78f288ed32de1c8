"""Checkpoints: plain safetensors weights plus a JSON sidecar (config, data split and forget hash, versions,
wall time, peak memory, parameters, sparsity) that rebuilds the model without the original command.

Invariants: the weights file depends on the tensors only (byte-reproducible: equal weights, equal
weights_sha256); the sidecar is written last and carries the weights' hash; loading checks hash, keys, types and
finiteness, and re-attaches the pruning masks."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import safetensors
from safetensors import SafetensorError
from safetensors.torch import load_file, save
import timm
import torchvision

from .errors import UserError
from .system import peak_memory_kind, prepare_model
from .data import DATASETS, Data
from .models import ARCHS, count_params, random_model
from .pruning import plain_state_dict, pruned_modules, restore_masks, sparsity
from .training import TrainResult
from .outputs import atomic_write, check_writable, file_sha256, release_claim, sidecar_path


FORMAT = "unlearn-toolkit/1"  # sidecar format tag; bump when the sidecar layout changes


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


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions() -> dict:
    return dict(python=platform.python_version(), torch=torch.__version__, torchvision=torchvision.__version__,
                timm=timm.__version__, peft=version("peft"), safetensors=safetensors.__version__,
                numpy=np.__version__, cuda=torch.version.cuda if torch.cuda.is_available() else None)


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
    sidecar last, while this process holds the output's lock (check_writable), which it lets go of either way."""
    path = check_writable(path, overwrite)
    try:
        return _write_checkpoint(model, path, arch=arch, method=method, data=data, config=config, result=result,
                                 trainable_params=trainable_params, extra=extra)
    finally:
        release_claim(path)  # written, or nothing was


def _write_checkpoint(model: nn.Module, path: Path, *, arch: str, method: str, data: Data, config: dict,
                      result: TrainResult | None, trainable_params: int, extra: dict | None) -> dict:
    state = plain_state_dict(model)
    check_weights(state, f"{method} -> {path}: nothing was written")
    family = ARCHS[arch].family
    meta = dict(format=FORMAT, arch=arch, method=method, num_classes=data.info.num_classes,
                in_chans=data.info.channels, data=data.spec, config=config, argv=sys.argv[1:],
                wall_time_s=round(result.wall_time_s, 3) if result else None,
                peak_mem_mb=round(result.peak_mem_mb, 1) if result else None,
                peak_mem_kind=peak_memory_kind(next(model.parameters()).device),
                activation_mb=(round(result.activation_bytes / 2**20, 1)
                               if result and result.activation_bytes is not None else None),
                step_gflop=(round(result.step_flops / 1e9, 3) if result and result.step_flops is not None else None),
                trainable_params=trainable_params, total_params=count_params(model)[1],
                sparsity=round(sparsity(model, family), 6), pruned_modules=pruned_modules(model),
                history=result.history if result else [], versions=library_versions(), git_commit=_git_commit(),
                created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(extra or {}))
    sidecar_path(path).unlink(missing_ok=True)  # with --overwrite: the old pair stops being a checkpoint first
    # One metadata key: safetensors writes several in an order that varies from run to run, and the file's hash
    # must depend on the tensors alone (equal weights, equal weights_sha256).
    header = {"unlearn-toolkit": json.dumps(dict(format=FORMAT, arch=arch), sort_keys=True)}
    # Serialised in memory and written by Python, so that a full disk is an OSError (atomic_write's one line).
    atomic_write(path, lambda tmp: tmp.write_bytes(save(state, metadata=header)))
    meta["weights_sha256"] = file_sha256(path)
    try:
        atomic_write(sidecar_path(path), lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
    except UserError:
        path.unlink(missing_ok=True)  # weights without their sidecar are no checkpoint
        raise
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
    meta = read_sidecar(path)
    if expect_arch and meta["arch"] != expect_arch:
        raise UserError(f"{path} holds a {meta['arch']} model, not {expect_arch}")
    if file_sha256(Path(path)) != meta["weights_sha256"]:
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
