"""Seeds, devices, torchrun, precision: how a process runs, not what it computes.

Invariants: every global random generator is seeded by seed_everything; a script's own randomness draws from
the generator device_and_generator returns. bf16 autocast and channels_last are CUDA's defaults (autocast,
prepare_model); CPU runs in fp32. Nothing here changes process-wide state other than the seeds: allocator tuning
and torchrun's output handling belong to the entry point (cli.run_main)."""
from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import random
import resource

import numpy as np
import torch
import torch.nn as nn
import torch.distributed as dist

from .errors import UserError


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
    the GPU of its local rank on CUDA, gloo on CPU (cli.run_main silences every rank but 0). Otherwise it
    is alone: (the picked device, 0, 1)."""
    world = torchrun_world_size()
    device = pick_device(device_name)
    if world == 1:
        return device, 0, 1
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank(), world


def pick_device(name: str) -> torch.device:
    """The device a flag names ("auto": CUDA if there is one)."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is available")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else torch.device(name)
    return device


def keep_freed_memory() -> None:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the OS (a no-op without
    glibc). A training step frees and allocates the same large tensors every step; by default glibc maps the
    large ones afresh and trims the freed top of its heap, so every CPU step would fault their pages in again
    (its measured cost: RESULTS.md, cost). CUDA's caching allocator already reuses. Process-wide: called by
    cli.run_main only."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h>
    mallopt(m_mmap_max, 0)  # every block from the heap, which is reused
    mallopt(m_trim_threshold, 2**31 - 1)  # never give the heap's free top back


def autocast(device: torch.device, *, bf16: bool = True):
    """bf16 autocast on CUDA (bf16=False: fp32, bench.py's baseline); a no-op elsewhere (CPU bf16 is slower than
    fp32 on most machines)."""
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_model(model: nn.Module, device: torch.device, *, channels_last: bool = True) -> nn.Module:
    """The model on the device, in channels_last (oneDNN's and cuDNN's fast layout for convolutions)."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated since the last reset, or the process's peak RSS on CPU (peak_memory_kind)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_kind(device: torch.device) -> str:
    """What peak_memory_mb measures here. A process forked from a warm interpreter (a sweep's CPU runs, see
    executors.WARM_IMPORTS) counts only the pages it touches, not the library pages a fresh interpreter maps
    at import: about 300 MB less for the same run on CPU."""
    if device.type == "cuda":
        return "cuda_max_allocated"
    return "process_max_rss" if multiprocessing.parent_process() is None else "forked_process_max_rss"
