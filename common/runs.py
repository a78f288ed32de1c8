"""The steps every unlearning script shares before and after its own objective: load the original and cut its
data into this run's forget and retain sets, claim the output, report, save, summarise."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn as nn

from .data import Data, data_from_spec
from .models import ARCHS
from .training import TrainResult, accuracy, predict
from .outputs import check_writable
from .checkpoints import default_output, load_checkpoint, save_checkpoint


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
