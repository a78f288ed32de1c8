"""The one training loop, the losses the methods share, inference and optimizers.

Invariants: train_loop reads a tensor's value once per epoch, never per step (the tests count); metrics are
computed from float32 logits (predict(fp32=True)); after_epoch sees validation data only."""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from .errors import UserError
from .system import autocast, peak_memory_mb
from .data import DatasetInfo, augment, batches, normalize
from .batchnorm import frozen_batchnorm, set_train_mode


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
    step_flops: int | None = None  # the first step's forward and backward, by torch's FlopCounterMode (likewise;
    # under torchrun, one process's share of the global batch)


class Stopwatch:
    """Wall time and peak memory of a method's work, the figures a sidecar records: on CUDA the device is
    synchronised at both ends and its peak-memory counter reset at the start (train_loop's own measure; methods
    without a training loop use it directly)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        self.start = time.perf_counter()

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.start

    def result(self, *, trainable_params: int, history: list[dict] | None = None,
               activation_bytes: int | None = None, step_flops: int | None = None) -> TrainResult:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return TrainResult(self.elapsed_s(), peak_memory_mb(self.device), history or [],
                           trainable_params=trainable_params, activation_bytes=activation_bytes,
                           step_flops=step_flops)


def train_loop(model: nn.Module, optimizer: torch.optim.Optimizer, epochs: int,
               epoch_batches: Callable[[int], Iterable], loss_fn: Callable[[nn.Module, tuple], torch.Tensor], *,
               device: torch.device, scheduler=None, freeze_bn: bool = False, grad_clip: float = 0.0,
               after_epoch: Callable[[int], dict] | None = None,
               after_backward: Callable[[tuple], None] | None = None, desc: str = "train",
               compile_mode: str | None = None, measure_activations: bool = True, log: bool = True,
               bf16: bool = True) -> TrainResult:
    """The one training loop: loss_fn(model, batch) -> scalar loss; epoch_batches(epoch) yields batches.

    The scheduler (if any) steps once per batch. after_epoch(epoch) may return metrics to log (on
    validation data only). after_backward(batch), if given, may change the gradients before grad_clip and the step
    (a method that masks or clips only some of its steps). A non-finite loss stops the run with a UserError at
    the end of its epoch.
    compile_mode (COMPILE_MODES) hands loss_fn a torch.compile'd view of the model (same parameters; the first
    steps pay the compilation).
    measure_activations records the first step's saved_activation_bytes and the FLOPs of its forward and backward
    (matrix products and convolutions, by torch's FlopCounterMode; not with compile_mode; the sidecar's
    activation_mb and step_gflop; counting leaves the step's numbers as they are). log=False
    keeps the per-epoch JSON lines off the output (for callers whose "epochs" are single steps). bf16=False runs
    CUDA steps in fp32 (bench.py's baseline; CPU steps always are)."""
    clock = Stopwatch(device)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    history, activation_bytes, step_flops = [], None, None
    with frozen_batchnorm(model) if freeze_bn else contextlib.nullcontext():
        # Compiled after the BatchNorm swap, so the graph is the one trained; the caller keeps the plain module.
        forward_model = compiled(model, compile_mode) if compile_mode else model
        mark_step = compile_mode == "reduce-overhead" and device.type == "cuda"
        for epoch in range(epochs):
            set_train_mode(model, freeze_bn)
            total, steps = torch.zeros((), device=device), 0
            bar = tqdm(epoch_batches(epoch), desc=f"{desc} {epoch + 1}/{epochs}", leave=False,
                       disable=None, dynamic_ncols=True)
            for batch in bar:
                if mark_step:  # a new iteration: the previous step's graph outputs may be overwritten
                    torch.compiler.cudagraph_mark_step_begin()
                measure = measure_activations and not compile_mode and activation_bytes is None
                with FlopCounterMode(display=False) if measure else contextlib.nullcontext() as flops:
                    with autocast(device, bf16=bf16):
                        if measure:
                            loss, activation_bytes = saved_activation_bytes(forward_model,
                                                                            lambda m: loss_fn(m, batch))
                        else:
                            loss = loss_fn(forward_model, batch)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                if measure:
                    step_flops = flops.get_total_flops()
                if after_backward is not None:
                    after_backward(batch)
                if grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, grad_clip)
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                total += loss.detach().float()  # read once per epoch: a read per step would wait for the device
                steps += 1
            mean_loss = float(total) / max(steps, 1)
            if not math.isfinite(mean_loss):
                raise UserError(f"{desc}: loss became {mean_loss} in epoch {epoch + 1}: the run diverged; "
                                "lower the learning rate (nothing was written)")
            record = dict(epoch=epoch + 1, loss=round(mean_loss, 5), time_s=round(clock.elapsed_s(), 4))
            if after_epoch is not None:
                record.update(after_epoch(epoch))
            history.append(record)
            if log:
                tqdm.write(json.dumps(record))
    return clock.result(trainable_params=sum(p.numel() for p in params), history=history,
                        activation_bytes=activation_bytes, step_flops=step_flops)


# torch.compile's modes: "reduce-overhead" replays each step's kernels as CUDA graphs (one launch instead of
# hundreds: the step is launch-bound at 32 px, RESULTS.md "On a GPU"); on the CPU every mode compiles the same code.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compiled(model: nn.Module, mode: str) -> nn.Module:
    """torch.compile'd view of model with static shapes: a run's last partial batch gets a graph of its own (one
    more compilation per distinct batch size) instead of one graph with a symbolic batch size for every size, so
    the full batches keep the kernels (and CUDA graphs) specialised to their shape, and no batch is dropped."""
    if mode not in COMPILE_MODES:
        raise UserError(f"unknown compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
    return torch.compile(model, mode=mode, dynamic=False)


def ce_loss(info: DatasetInfo, input_size: int | None, augment_batches: bool, gen: torch.Generator | None = None,
            *, channels_last: bool = True):
    """Cross-entropy on (uint8 images, labels) batches, with on-device augmentation if asked."""
    def loss_fn(model, batch):
        x, y = batch
        if augment_batches:
            x = augment(x, info, gen)
        return F.cross_entropy(model(normalize(x, info, input_size, channels_last=channels_last)), y)
    return loss_fn


def random_labels(labels: torch.Tensor, num_classes: int, gen: torch.Generator, wrong_only: bool) -> torch.Tensor:
    """Uniform random labels over all classes, or (wrong_only) over the classes other than the true one."""
    if wrong_only:
        shift = torch.randint(1, num_classes, labels.shape, device=labels.device, generator=gen)
        return (labels + shift) % num_classes
    return torch.randint(0, num_classes, labels.shape, device=labels.device, generator=gen)


def random_label_epoch(forget: tuple, retain: tuple, *, num_classes: int, batch_size: int, gen: torch.Generator,
                       wrong_only: bool = False, mixed: bool = False):
    """One random-label unlearning epoch (RL, SalUn) as batches of (images, labels): Df with fresh random labels
    (random_labels), then Dr with its own, each pass shuffled, as the SalUn authors' Classification/unlearn/RL.py
    runs it for CIFAR-10 and SVHN; mixed: one shuffled pass over the union, their CIFAR-100 branch."""
    (x_forget, y_forget), (x_retain, y_retain) = forget, retain
    labels = random_labels(y_forget, num_classes, gen, wrong_only)
    if mixed:
        yield from batches(torch.cat([x_forget, x_retain]), torch.cat([labels, y_retain]), batch_size, shuffle=True,
                           gen=gen)
        return
    yield from batches(x_forget, labels, batch_size, shuffle=True, gen=gen)
    yield from batches(x_retain, y_retain, batch_size, shuffle=True, gen=gen)


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) summed over classes, averaged over the batch, times T^2
    (Hinton et al. 2015's scaling; SCRUB's DistillKL). The teacher side carries no gradient."""
    return F.kl_div(F.log_softmax(student_logits.float() / temperature, 1),
                    F.softmax(teacher_logits.detach().float() / temperature, 1),
                    reduction="batchmean") * temperature ** 2


def batch_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, info: DatasetInfo, input_size: int | None,
                    *, batch_size: int, augment_gen: torch.Generator | None = None,
                    objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy):
    """For each batch of (x, y) in order, the gradient of objective(logits, labels) (default: the batch-mean
    cross-entropy) with respect to each trainable parameter ({name: tensor}), the model in eval mode (BatchNorm on
    its running statistics), in fp32 on every device: SalUn's mask and SSD's importances rank small gradients,
    which the authors compute without autocast. augment_gen: augment each batch as in training, drawing from that
    generator."""
    model.eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    device = next(model.parameters()).device
    for xb, yb in batches(x, y, batch_size):
        if augment_gen is not None:
            xb = augment(xb, info, augment_gen)
        with torch.autocast(device.type, enabled=False):
            loss = objective(model(normalize(xb, info, input_size)).float(), yb)
            grads = torch.autograd.grad(loss, list(params.values()))
        yield dict(zip(params, grads))


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
        with autocast(device) if not fp32 else torch.autocast(device.type, enabled=False):
            out.append(forward(normalize(x[start:start + batch_size].to(device), info, input_size)).float().cpu())
    return torch.cat(out) if out else torch.empty(0, info.num_classes)


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
