"""The from-scratch training recipe: pretrain.py trains originals and Retrains with it, prune.py replays it
to its rewind point and retrains with it. A Retrain is a reference only if it was trained by the same recipe."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.data import Mixup

from .errors import UserError
from .data import Data, batches, normalize
from .data import augment as augment_images  # train_recipe's flag `augment` takes the name
from .models import ARCHS
from .training import accuracy, make_optimizer, predict, train_loop


RECIPE_DEFAULTS = dict(warmup_steps=0, grad_clip=0.0, mixup=0.0, label_smoothing=0.0, augment=True)


RECIPE_KEYS = ("epochs", "batch_size", "optimizer", "lr", "weight_decay", "schedule", "warmup_steps", "grad_clip",
               "mixup", "label_smoothing", "augment")


def recipe_of(config: dict) -> dict:
    """The training recipe's settings (train_recipe's keyword arguments) out of a run's config."""
    return {key: config[key] for key in RECIPE_KEYS}


def param_groups(model, weight_decay, matrices_only):
    """Weight decay on weight matrices only (not biases, norms, embeddings' position table) for AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not matrices_only:
        return [dict(params=params, weight_decay=weight_decay)]
    return [dict(params=[p for p in params if p.ndim >= 2], weight_decay=weight_decay),
            dict(params=[p for p in params if p.ndim < 2], weight_decay=0.0)]


def make_mixup(alpha: float, num_classes: int, label_smoothing: float):
    """timm's batch MixUp with the recipe's label smoothing (timm's own default would add 0.1 silently)."""
    return Mixup(mixup_alpha=alpha, num_classes=num_classes, label_smoothing=label_smoothing)


def train_recipe(model, data: Data, device, *, arch: str, retrain: bool, seed: int, epochs: int,
                 batch_size: int, optimizer: str, lr: float, weight_decay: float, schedule: str, warmup_steps: int,
                 grad_clip: float, mixup: float, label_smoothing: float, augment: bool, compile_mode: str | None,
                 desc: str, start_epoch: int = 0, stop_epoch: int | None = None, shard: tuple[int, int] = (0, 1)):
    """Train with the recipe on the training split (or Dr with retrain), validating each epoch.

    Runs epochs start_epoch..stop_epoch-1 of the full run's schedule (default: all of them); prune.py
    replays the run up to its rewind epoch (stop_epoch) and retrains from there (start_epoch). shard=(rank, world
    size) under torchrun: DistributedDataParallel, each process on its part of every batch (batches), and
    each epoch's history says how many examples the world saw exactly once (all of them, bar drop_last's rest)."""
    info, input_size = data.info, ARCHS[arch].input_size
    x_fit, y_fit = data.subset("retain" if retrain else "train")
    # Retrain never sees the forgotten class, so it is validated on the retained classes only.
    x_val, y_val = data.subset("val")
    if retrain and data.forget_class is not None:
        keep = y_val != data.forget_class
        x_val, y_val = x_val[keep], y_val[keep]

    optim = make_optimizer(optimizer, param_groups(model, weight_decay, optimizer == "adamw"), lr,
                                  weight_decay)
    steps_per_epoch = len(x_fit) // batch_size
    scheduler = make_scheduler(schedule, optim, epochs * steps_per_epoch, warmup_steps,
                                      start_step=start_epoch * steps_per_epoch)
    gen = torch.Generator(device=device).manual_seed(seed)
    rank, world = shard
    trained, augment_gen, seen = model, gen, None
    if batch_size % world:
        raise UserError(f"--batch-size {batch_size} must split evenly over {world} processes")
    if world > 1:
        trained = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                                            else None)
        # The batch order must be the same in every process; the augmentation must not (else the processes'
        # images of one step would share their crops and flips).
        augment_gen = torch.Generator(device=device).manual_seed(seed + 1_000_003 * (rank + 1))
        seen = torch.zeros(len(x_fit), dtype=torch.long, device=device)

    batch_mixup = make_mixup(mixup, info.num_classes, label_smoothing) if mixup else None

    def loss_fn(model, batch):
        x, y = batch
        if augment:
            x = augment_images(x, info, augment_gen)
        x = normalize(x, info, input_size)
        if batch_mixup is not None:
            x, soft = batch_mixup(x, y)
            return torch.sum(-soft * F.log_softmax(model(x), dim=-1), dim=-1).mean()
        return F.cross_entropy(model(x), y, label_smoothing=label_smoothing)

    def after_epoch(epoch):
        record = {}
        if len(y_val) and rank == 0:
            record["val_acc"] = round(accuracy(predict(model, x_val, info, input_size), y_val), 3)
        if seen is not None:
            torch.distributed.all_reduce(seen)
            record.update(seen_once=int((seen == 1).sum()), seen_twice_or_more=int((seen > 1).sum()))
            seen.zero_()
        return record

    return train_loop(
        trained, optim, (stop_epoch or epochs) - start_epoch,
        lambda epoch: batches(x_fit, y_fit, batch_size, shuffle=True, gen=gen, drop_last=True,
                                     shard=shard, seen=seen),
        loss_fn, device=device, scheduler=scheduler, grad_clip=grad_clip, after_epoch=after_epoch, desc=desc,
        compile_mode=compile_mode)


def test_accuracy(model, data: Data, *, arch: str) -> float:
    """Accuracy on the test set's retained part, for the report only (never for selection)."""
    x_test, y_test = data.subset("test_retain")
    return accuracy(predict(model, x_test, data.info, ARCHS[arch].input_size), y_test)


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
