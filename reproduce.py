"""Run a grid of methods x forget settings x seeds for a named profile, evaluate every unlearned model against
the Retrain of the same forget set and seed, and report mean +/- std with plots.

    python reproduce.py --profile cpu-fashion            # ~55 min on 2 CPU cores (RESULTS.md)
    python reproduce.py --profile paper-cifar10 --dry-run
    python reproduce.py --profile cpu-fashion --report-only   # table.md and plots again from results.csv
    python reproduce.py --compare cpu-fashion,cpu-fashion-sparse   # finished profiles in one table (compare.md)
    python reproduce.py --profile cpu-fashion --executor local --workers 4    # 4 runs at a time (GPUs or cores)
    python reproduce.py --profile paper-cifar10 --executor slurm --slurm-partition gpu   # jobs through submitit

Each run is one of the project's scripts in a subprocess (or a SLURM job); a run starts once the runs that
write its inputs have finished. Checkpoints go to <out-root>/ckpt/ (shared by the profiles, so the same original
or Retrain is trained once); a run whose checkpoint exists is skipped, so an interrupted sweep resumes, with any
executor (Ctrl-C cancels the SLURM jobs it has submitted). Each group's evaluate.py JSON goes to
<profile>/evaluations/, each run's log to <profile>/logs/. Writes <out-root>/<profile>/results.csv (one row per
model and run), table.md (mean +/- std per forget kind and method, Retrain first, directions stated) and PNG plots.
"""
import argparse
import collections
import concurrent.futures
import csv
import functools
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import common

# name -> (script, extra flags): methods join a profile's grid by name.
METHODS = {
    "finetune": ("finetune.py", []),
    "pruneft": ("pruneft.py", []),
    "lora": ("lora.py", []),
    "loraprune": ("loraprune.py", []),
    "ft-sparse": ("finetune.py", ["--optimizer", "sgd", "--lr", "0.01", "--epochs", "10", "--batch-size", "256",
                                  "--weight-decay", "5e-4", "--augment"]),  # Unlearn-Sparse FT
    "ga": ("ga.py", []),
    "rl": ("rl.py", []),
    "l1sparse": ("l1sparse.py", []),
    "ff": ("ff.py", []),
    "iu": ("iu.py", []),
    "ff-noise-only": ("ff.py", ["--no-zero-forget-head"]),  # FF's noise without Golatkar's head-row reset
    "rfa": ("rfa.py", []),
    "salun": ("salun.py", []),
    "scrub": ("scrub.py", []),
    "ssd": ("ssd.py", []),
    "neggradplus": ("neggradplus.py", []),
    "badteacher": ("badteacher.py", []),
    "salun-lora": ("salun.py", ["--lora"]),  # the leading methods through LoRA adapters (+ head); on an OMP
    "scrub-lora": ("scrub.py", ["--lora"]),  # model, "prune, then adapt, then unlearn"
    "neggradplus-lora": ("neggradplus.py", ["--lora"]),
    "badteacher-lora": ("badteacher.py", ["--lora"]),
}

# Candidate settings of the methods whose published default is not settled, the authors' default first. A
# profile that tunes a method runs every candidate on its first seed and first forget setting of each kind
# (class-wise, random-sample), scores them with evaluate.py --split val, and uses the one with the smallest
# validation Avg Gap to Retrain in the whole grid of that kind (ties: the earlier candidate).
TUNING = {
    "ga": [["--lr", "1e-4"], ["--lr", "5e-4"]],  # the Unlearn-Sparse README's; the maintainers' later advice
    "ff": [["--alpha", "1e-6"], ["--alpha", "1e-7"], ["--alpha", "1e-8"]],  # Golatkar et al.'s range
    "iu": [["--alpha", "1"], ["--alpha", "2"], ["--damping", "1"], ["--damping", "0.1"]],  # Newton step, twice it;
    # the Fisher damping 3x either side of iu.py's 0.3
    "l1sparse": [["--alpha", "5e-5"], ["--alpha", "1e-4"]],  # the useful range for small nets (l1sparse.py)
    "rfa": [["--target", "nearest-class-mean"], ["--target", "teacher-ce"]],
    # The leading methods: no upstream recipe for these small settings (SCRUB, NegGrad+, SSD) or an lr tuned for
    # CIFAR-10 ResNet-18 (SalUn); adapters usually want a larger step than full weights.
    "salun": [[], ["--lr", "0.005"]],
    "salun-lora": [[], ["--lr", "0.05"]],
    "scrub": [[], ["--lr", "0.005"], ["--max-steps", "3", "--epochs", "5", "--gamma", "1", "--alpha", "0.5",
                                      "--temperature", "2"]],  # the large-scale setting, 10x its lr, small-scale
    "scrub-lora": [[], ["--lr", "0.005"], ["--lr", "0.05"]],
    "ssd": [["--selection", "10"], ["--selection", "3"], ["--selection", "30"], ["--selection", "100"]],  # alpha;
    # larger dampens fewer weights
    "neggradplus": [["--beta", "0.9999"], ["--beta", "0.999"], ["--beta", "0.99"], ["--beta", "0.95"]],
    "neggradplus-lora": [["--beta", "0.9999"], ["--beta", "0.999"], ["--beta", "0.99"], ["--beta", "0.95"]],
}

# The CPU profiles' pretraining recipe: a 12,000-image subset, 15 epochs, no augmentation. It converges (about
# 99% training accuracy; validation accuracy flat over the last 4 epochs) and memorises its training images, so
# random-sample forgetting is measurable (the original's MIA-efficacy is well below Retrain's). Chosen on the
# validation split and the training accuracy only (RESULTS.md).
CPU_CONVERGED = ["--train-subset", "12000", "--epochs", "15", "--augment", "false"]
MIN_RETRAIN_SEEDS = 3  # Retrains per forget set, at least: the seed-noise floor needs pairs

# A profile: dataset and architectures, pretraining flags, forget settings, seeds, methods (with per-profile
# extra flags), OMP sparsities whose pruned originals every method also runs on, and the method whose pruning
# mask gives the sparse Retrain that rows pruning during unlearning are also compared with (sparse_reference_of).
PROFILES = {
    "cpu-fashion": dict(  # the PruneLoRA methods at the paper's defaults, on CPU, converged originals
        dataset="fashion-mnist", archs=["resnet_tiny"], pretrain=CPU_CONVERGED,
        forgets=[["--forget-class", "3"], ["--forget-class", "0"], ["--forget-class", "8"],
                 ["--forget-random", "1200"]], seeds=[0, 1, 2],
        methods=["finetune", "pruneft", "lora", "loraprune"], sparse_reference_of="pruneft"),
    "cpu-fashion-sparse": dict(  # the Unlearn-Sparse methods, dense and at 50% OMP sparsity
        dataset="fashion-mnist", archs=["resnet_tiny"], pretrain=CPU_CONVERGED,
        forgets=[["--forget-class", "3"], ["--forget-random", "1200"]], seeds=[0, 1, 2],
        methods=["ft-sparse", "ga", "rl", "ff", "iu", "l1sparse"], omp=[0.5], tune=["ga", "ff", "iu", "l1sparse"]),
    "cpu-fashion-rfa": dict(  # RFA-style, its shift target chosen on the validation split
        dataset="fashion-mnist", archs=["resnet_tiny"], pretrain=CPU_CONVERGED,
        forgets=[["--forget-class", "3"], ["--forget-random", "1200"]], seeds=[0, 1, 2],
        methods=["rfa"], tune=["rfa"]),  # compare with the cpu-fashion rows of the same forget sets
    "cpu-fashion-leading": dict(  # SalUn, SCRUB, SSD, NegGrad+, Bad Teacher: dense, OMP 50%, LoRA, OMP + LoRA
        dataset="fashion-mnist", archs=["resnet_tiny"], pretrain=CPU_CONVERGED,
        forgets=[["--forget-class", "3"], ["--forget-random", "1200"]], seeds=[0, 1, 2],
        methods=["salun", "scrub", "ssd", "neggradplus", "badteacher", "salun-lora", "scrub-lora",
                 "neggradplus-lora", "badteacher-lora"], omp=[0.5],
        tune=["salun", "salun-lora", "scrub", "scrub-lora", "ssd", "neggradplus", "neggradplus-lora"]),
    "paper-cifar10": dict(  # PruneLoRA paper: CIFAR-10, all 50,000 training images, class 3 (cat); GPU
        dataset="cifar10", archs=["resnet50", "vit_small"], pretrain=["--val-fraction", "0"],
        forgets=[["--forget-class", "3"]], seeds=[0], methods=["finetune", "pruneft", "lora", "loraprune"],
        sparse_reference_of="pruneft"),
    "unlearn-sparse-cifar10": dict(  # Unlearn-Sparse: ResNet-18, class 0 and random 10%, OMP 50%/95%; GPU
        dataset="cifar10", archs=["resnet18"], pretrain=[],
        forgets=[["--forget-class", "0"], ["--forget-random", "4500"]], seeds=[0],
        methods=["ft-sparse", "ga", "rl", "ff", "iu", "l1sparse"], omp=[0.5, 0.95],
        tune=["ga", "ff", "iu", "l1sparse"]),
    "smoke": dict(  # seconds-sized, for the tests
        dataset="fashion-mnist", archs=["resnet_tiny"], pretrain=["--epochs", "1", "--train-subset", "2000"],
        forgets=[["--forget-class", "3"]], seeds=[0], methods=["finetune", "loraprune"], omp=[0.5],
        omp_flags=["--rewind-epoch", "0"],
        method_flags={"finetune": ["--epochs", "1"], "loraprune": ["--epochs", "1"]}),
}
# Audit profiles: audit.py's probe and relearn on every model of finished profiles (their results.csv; seed and
# forget settings as listed), and U-LiRA on a shadow population of its own (audit.py lira; None: left out).
AUDIT_PROFILES = {
    "cpu-fashion-audit": dict(
        of=["cpu-fashion", "cpu-fashion-sparse", "cpu-fashion-rfa", "cpu-fashion-leading"], seeds=[0],
        probe=["class3", "random1200"],
        relearn=["class3"],  # a Retrain already classifies held-out random Df images near the original's level
        lira=dict(  # random-sample forgetting on 2,000-image halves; settings the random1200 tuning chose
            pretrain=["--dataset", "fashion-mnist", "--arch", "resnet_tiny", "--train-subset", "4000", "--epochs",
                      "30", "--augment", "false"],  # converged: 100% train accuracy, validation flat
            methods=["finetune", "loraprune", "ga", "salun", "scrub", "ssd", "neggradplus", "badteacher"],
            method_flags={"ga": ["--lr", "5e-4"], "salun": ["--lr", "0.005"], "scrub": ["--lr", "0.005"],
                          "ssd": ["--selection", "3"], "neggradplus": ["--beta", "0.95"]},
            shadows=16, pool=500)),
    "smoke-audit": dict(of=["smoke"], seeds=[0], probe=["class3"], relearn=["class3"], lira=None,
                        relearn_settings=dict(relearn_steps=20, relearn_forget=100, relearn_retain=300)),
}
KIND_NAMES = {"class": "class-wise", "random": "random-sample"}
METRICS = ["UA", "RA", "TA", "FTA", "mia_efficacy", "mia_efficacy_std", "mia_loss", "mia_loss_std", "mia_entropy",
           "mia_entropy_std", "act_dist_forget", "act_dist_retain", "js_forget", "avg_gap", "avg_gap_other",
           "wall_time_s", "peak_mem_mb", "trainable_params", "sparsity"]


def forget_tag(forget: list[str]) -> str:
    return ("class" if forget[0] == "--forget-class" else "random") + forget[1]


def kind_of(tag: str) -> str:
    return "class" if tag.startswith("class") else "random"


def retrain_seeds(seeds: list[int]) -> list[int]:
    """The method seeds, topped up with the next unused seeds to MIN_RETRAIN_SEEDS Retrains."""
    extra = (s for s in range(max(seeds) + 1, max(seeds) + 1 + MIN_RETRAIN_SEEDS))
    return seeds + [next(extra) for _ in range(MIN_RETRAIN_SEEDS - len(seeds))]


def _base(profile: dict, arch: str, ckpt: Path) -> tuple[Path, list]:
    """The checkpoint folder of one (dataset, arch, pretraining flags), and pretrain.py's command prefix."""
    base = ckpt / f"{profile['dataset']}_{arch}_{'_'.join(profile['pretrain']).replace('--', '') or 'default'}"
    return base, ["pretrain.py", "--dataset", profile["dataset"], "--arch", arch, *profile["pretrain"]]


def _method_run(profile: dict, base: Path, method: str, tuned: list[str], *, label: str, tag: str, forget: list,
                source: Path, seed: int) -> dict:
    """One unlearning run; the tuned flags are part of its file name, so another setting is another file."""
    script, flags = METHODS[method]
    slug = "-".join(f.removeprefix("--") for f in tuned)
    out = base / f"{tag}_{label.replace('@', '_')}{'-' + slug if slug else ''}_s{seed}.safetensors"
    extra = profile.get("method_flags", {}).get(method, [])
    return dict(kind="method", out=out, cmd=[script, "--model", source, *forget, *flags, *tuned, *extra,
                                             "--seed", seed])


def plan_tuning(profile: dict, methods: list[str], seeds: list[int], ckpt: Path) -> tuple[list[dict], list[dict]]:
    """The candidate runs of the profile's tuned methods (first seed, first forget setting of each kind, dense
    original) and one validation-split evaluation group per (arch, forget setting)."""
    runs, groups = [], []
    seed = seeds[0]
    for arch in profile["archs"]:
        base, pretrain = _base(profile, arch, ckpt)
        original = base / f"original_s{seed}.safetensors"
        runs.append(dict(kind="original", out=original, cmd=[*pretrain, "--seed", seed]))
        for kind in ("class", "random"):
            forget = next((f for f in profile["forgets"] if kind_of(forget_tag(f)) == kind), None)
            tuned = [m for m in profile.get("tune", []) if m in methods]
            if forget is None or not tuned:
                continue
            tag = forget_tag(forget)
            retrain = base / f"{tag}_retrain_s{seed}.safetensors"
            runs.append(dict(kind="retrain", out=retrain, cmd=[*pretrain, "--retrain", *forget, "--seed", seed]))
            group = dict(arch=arch, forget=tag, seed=seed, variant="dense", retrain=retrain, floor=None,
                         source=original, methods={}, sparse_retrain=None, candidates={})
            for method in tuned:
                for candidate in TUNING[method]:
                    run = _method_run(profile, base, method, candidate, label=method, tag=tag, forget=forget,
                                      source=original, seed=seed)
                    runs.append(run)
                    label = f"{method} {' '.join(candidate)}"
                    group["methods"][label] = run["out"]
                    group["candidates"][label] = (method, candidate)
            groups.append(group)
    return runs, groups


def select_settings(tuning_rows: list[dict], groups: list[dict]) -> tuple[dict, list[dict]]:
    """The candidate with the smallest validation Avg Gap per (method, kind); and the table of all candidates."""
    chosen, table = {}, []
    for group in groups:
        kind = kind_of(group["forget"])
        rows = {r["label"]: r for r in tuning_rows if r["forget"] == group["forget"] and r["arch"] == group["arch"]}
        for method in dict.fromkeys(m for m, _ in group["candidates"].values()):
            candidates = [(label, flags) for label, (m, flags) in group["candidates"].items() if m == method]
            if not candidates:
                continue  # every candidate failed: the grid runs the script's own default (and fails alike)
            best_label, best_flags = min(candidates, key=lambda c: rows[c[0]]["avg_gap"])  # min keeps the first tie
            chosen[(method, kind)] = best_flags
            table += [dict(arch=group["arch"], forget=group["forget"], method=method, setting=" ".join(flags),
                           val_avg_gap=rows[label]["avg_gap"], val_UA=rows[label]["UA"], val_TA=rows[label]["TA"],
                           chosen=label == best_label) for label, flags in candidates]
    return chosen, table


def plan(profile: dict, methods: list[str], seeds: list[int], ckpt: Path,
         chosen: dict | None = None) -> tuple[list[dict], list[dict]]:
    """Every training run in dependency order ({kind, out, cmd}), and the evaluation groups.

    A group is one evaluate.py call: the models that start from one original (dense or OMP) for one forget set
    and seed, with their references: Retrain of that seed, the next seed's Retrain (the floor) and a sparse
    Retrain (the OMP model's mask, or the mask of the profile's sparse_reference_of method). chosen maps
    (method, kind) to the tuned flags selected on the validation split (select_settings)."""
    runs, groups = [], []
    chosen = chosen or {}
    all_seeds = retrain_seeds(seeds)
    for arch in profile["archs"]:
        base, pretrain = _base(profile, arch, ckpt)
        for seed in seeds:
            originals = {"dense": base / f"original_s{seed}.safetensors"}
            runs.append(dict(kind="original", out=originals["dense"], cmd=[*pretrain, "--seed", seed]))
            for sparsity in profile.get("omp", []):
                omp = base / f"omp{round(sparsity * 100)}_s{seed}.safetensors"
                runs.append(dict(kind="omp", out=omp, cmd=["prune.py", "--model", originals["dense"], "--sparsity",
                                                           sparsity, *profile.get("omp_flags", []), "--seed", seed]))
                originals[f"omp{round(sparsity * 100)}"] = omp
            for forget in profile["forgets"]:
                tag = forget_tag(forget)
                retrain_of = {s: base / f"{tag}_retrain_s{s}.safetensors" for s in all_seeds}
                for s in all_seeds:
                    if not any(r["out"] == retrain_of[s] for r in runs):
                        runs.append(dict(kind="retrain", out=retrain_of[s],
                                         cmd=[*pretrain, "--retrain", *forget, "--seed", s]))
                floor = retrain_of[all_seeds[(all_seeds.index(seed) + 1) % len(all_seeds)]]
                for variant, source in originals.items():
                    group = dict(arch=arch, forget=tag, seed=seed, variant=variant, retrain=retrain_of[seed],
                                 floor=floor, source=source, methods={}, sparse_retrain=None)
                    for method in methods:
                        label = method if variant == "dense" else f"{method}@{variant}"
                        runs.append(_method_run(profile, base, method, chosen.get((method, kind_of(tag)), []),
                                                label=label, tag=tag, forget=forget, source=source, seed=seed))
                        group["methods"][label] = runs[-1]["out"]
                    mask_source = source if variant != "dense" else group["methods"].get(
                        profile.get("sparse_reference_of"))
                    if mask_source:
                        sparse = base / f"{tag}_retrain-sparse-{variant if variant != 'dense' else 'pruned'}" \
                                        f"_s{seed}.safetensors"
                        runs.append(dict(kind="retrain-sparse", out=sparse, cmd=[
                            *pretrain, "--retrain", *forget, "--mask-from", mask_source, "--seed", seed]))
                        group["sparse_retrain"] = sparse
                    groups.append(group)
    return runs, groups


def stale_reason(run: dict) -> str | None:
    """Why a finished checkpoint at run["out"] is not this run's: made by other flags (its sidecar's argv), or
    unreadable. None when it is this run's own result (or predates the argv record)."""
    try:
        argv = common.read_sidecar(run["out"]).get("argv")
    except common.UserError as err:
        return str(err)
    if argv is None:
        return None  # made before sidecars recorded argv: trusted, as its path encodes the profile's flags
    planned = [str(a) for a in run["cmd"][1:]]
    kept = [a for i, a in enumerate(argv) if a not in PLUMBING_FLAGS + PLUMBING_OPTIONS
            and (i == 0 or argv[i - 1] not in PLUMBING_OPTIONS)]
    return None if kept == planned else f"made with other flags ({' '.join(kept)})"


PLUMBING_OPTIONS = ("--out", "--data-dir", "--device")  # flags (and their values) that do not change a result
PLUMBING_FLAGS = ("--overwrite",)


def inputs_of(run: dict) -> list[Path]:
    """The files a run reads: the Paths in its command (checkpoints that other runs of the sweep may write)."""
    return [arg for arg in run["cmd"] if isinstance(arg, Path)]


def redo_reason(run: dict, overwrite: bool) -> str | None:
    """None when the run's own result exists; else why it runs: "" the first time, " (redone: ...)" when a
    checkpoint there was made with other flags or is unreadable. An evaluation's JSON is its own result while it
    is newer than every checkpoint it read (its file name carries a digest of its command)."""
    out = run["out"]
    if overwrite:
        return ""
    if run["kind"] == "evaluation":
        inputs = [p for path in inputs_of(run) for p in (path, common.sidecar_path(path))]
        fresh = out.is_file() and all(p.exists() and p.stat().st_mtime <= out.stat().st_mtime for p in inputs)
        return None if fresh else ""
    if not common.finished(out):
        return ""
    reason = stale_reason(run)
    return None if reason is None else f" (redone: {reason})"


@dataclass
class Executor:
    """Where a sweep's runs execute. serial: one after another in this process tree. local: `workers` at a time on
    this machine, each pinned to its own GPU (round robin over the visible ones) or to `threads` CPU threads.
    slurm: one submitit job per run (partition, time, GPUs, CPUs, at most `parallelism` in flight); submitit-local:
    the same jobs as local processes (slurm's code path without a cluster). Every executor runs the same commands,
    so a sweep's results do not depend on it, given the same CPU threads per run (a different thread count
    changes the order of float reductions, and with it the trained weights' last digits and what follows).
    ddp > 1 runs pretrain.py and prune.py data-parallel under torchrun on that many GPUs (a slurm job asks for
    them; a local worker owns that many): faster Retrains, but per-GPU BatchNorm statistics change the results."""
    kind: str = "serial"
    workers: int = 1
    threads: int | None = None  # CPU threads per run (OMP_NUM_THREADS); None: the scripts' default (all cores)
    partition: str | None = None
    time_min: int = 600
    gpus: int = 1
    cpus: int = 8
    parallelism: int = 64
    ddp: int = 1  # processes (GPUs) of each run that trains a network from scratch, under torchrun

    @property
    def job_cpus(self) -> int:
        """CPUs (and OMP threads) of one SLURM or submitit job."""
        return self.threads or self.cpus


EXECUTORS = ("serial", "local", "slurm", "submitit-local")


def make_executor(kind: str, *, workers: int | None = None, threads: int | None = None, ddp: int = 1,
                  **slurm) -> Executor:
    """An Executor with its defaults resolved: local workers = the GPU count / ddp (1 without CUDA), and each
    run's share of the CPU threads."""
    if kind not in EXECUTORS:
        raise common.UserError(f"unknown executor {kind!r}; choose one of {', '.join(EXECUTORS)}")
    if kind != "local":
        if workers:
            raise common.UserError(f"--workers is for --executor local (slurm: --slurm-parallelism), not {kind}")
        return Executor(kind, 1, threads, ddp=ddp, **slurm)
    workers = workers or max(torch.cuda.device_count() // ddp, 1)
    return Executor(kind, workers, threads or max(len(os.sched_getaffinity(0)) // workers, 1), ddp=ddp, **slurm)


def add_executor_args(parser: argparse.ArgumentParser) -> None:
    """The flags of make_executor (reproduce.py, and audit.py lira for its shadow population)."""
    g = parser.add_argument_group("executor (where the runs go; the results do not depend on it, given the same "
                                  "--threads-per-run)")
    g.add_argument("--executor", choices=EXECUTORS, default="serial",
                   help="serial: one run at a time; local: --workers at once on this machine; slurm: jobs through "
                        "submitit; submitit-local: those jobs as local processes (default: %(default)s)")
    g.add_argument("--workers", type=common.positive_int, default=None,
                   help="local: concurrent runs, each on its own GPU (round robin over the visible ones) or its "
                        "share of the CPU (default: the GPU count / --ddp, or 1 without CUDA)")
    g.add_argument("--threads-per-run", type=common.positive_int, default=None,
                   help="CPU threads of each run (default: serial all, local cores/workers, slurm --slurm-cpus)")
    g.add_argument("--ddp", type=common.positive_int, default=1,
                   help="processes (GPUs) per training-from-scratch run (pretrain.py, prune.py) under torchrun; "
                        "changes the results (per-GPU BatchNorm statistics) (default: %(default)s)")
    g.add_argument("--slurm-partition", default=None, help="(default: the cluster's)")
    g.add_argument("--slurm-time", type=common.positive_int, default=600, help="minutes per job (default: %(default)s)")
    g.add_argument("--slurm-gpus", type=common.non_negative_int, default=1,
                   help="GPUs per job; a --ddp run's job asks for --ddp (default: %(default)s)")
    g.add_argument("--slurm-cpus", type=common.positive_int, default=8, help="CPUs per job (default: %(default)s)")
    g.add_argument("--slurm-parallelism", type=common.positive_int, default=64,
                   help="jobs in flight at most (default: %(default)s)")


DATA_PARALLEL_SCRIPTS = ("pretrain.py", "prune.py")  # whole training runs: torchrun-aware


def _processes(run: dict, executor: Executor) -> int:
    return executor.ddp if run["cmd"][0] in DATA_PARALLEL_SCRIPTS else 1


def job_gpus(run: dict, executor: Executor) -> int:
    """The GPUs a SLURM job of this run asks for: one per torchrun process, else --slurm-gpus."""
    processes = _processes(run, executor)
    return processes if processes > 1 else executor.gpus


def script_argv(run: dict, executor: Executor, *, data_dir: str, device: str) -> list[str]:
    """The command line of one run as the executor starts it."""
    script, *args = map(str, run["cmd"])
    if not Path(script).exists():
        raise common.UserError(f"script {script} does not exist in this checkout")
    processes = _processes(run, executor)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                str(processes)] if processes > 1 else [sys.executable]
    output_flag = "--json" if run["kind"] == "evaluation" else "--out"
    return [*launcher, script, *args, "--data-dir", data_dir, "--device", device, output_flag, str(run["out"]),
            "--overwrite"]


def command_line(run: dict, executor: Executor, *, data_dir: str, device: str) -> str:
    """script_argv as a user would type it (for --dry-run)."""
    return " ".join(["python", *script_argv(run, executor, data_dir=data_dir, device=device)[1:]])


def _run_process(argv: list[str], env: dict, log: Path) -> None:
    """One run as a subprocess of this one, its output in log; a failure raises its last line of stderr."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env, text=True)
    if proc.returncode:
        raise common.UserError(f"{_script_error(log.read_text())} (log: {log})")


def _script_error(text: str) -> str:
    """The one-line reason a run failed, out of its whole log: the script's own `error: ...` line; else the
    exception that ended a crashed process (under torchrun, a worker's, not the launcher's ChildFailedError
    report); else the exit code torchrun reports for a worker killed without one; else the last line."""
    lines = [line.strip() for line in text.splitlines() if re.search(r"\w", line)] or ["?"]
    # from the last "error: " of a line: under torchrun every process may print the same error into one line
    errors = [line[line.rindex("error: "):] for line in lines if "error: " in line]
    exceptions = [line for line in lines if re.match(r"[\w.]*(Error|Exception|Interrupt)\b", line)
                  and "ChildFailedError" not in line]
    exit_codes = [f"a torchrun worker exited with {' '.join(line.split())}" for line in lines
                  if line.startswith("exitcode")]
    return (errors or exceptions or exit_codes or lines)[-1]


def _slot_envs(executor: Executor, device: str) -> list[dict]:
    """Per local worker slot, the environment that pins its runs to its GPUs (executor.ddp of them, round robin
    over the visible ones) or to its share of CPU threads."""
    envs = [dict(os.environ) for _ in range(executor.workers)]
    if executor.threads:
        for env in envs:
            env.update(OMP_NUM_THREADS=str(executor.threads), MKL_NUM_THREADS=str(executor.threads))
    if executor.kind == "local" and device != "cpu" and torch.cuda.is_available():
        if ":" in device:
            raise common.UserError(f"--executor local pins each run to one GPU: use --device auto or cuda, "
                                   f"not {device}")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(torch.cuda.device_count()))))
        gpus = visible.split(",")
        for slot, env in enumerate(envs):
            mine = range(slot * executor.ddp, (slot + 1) * executor.ddp)
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[i % len(gpus)] for i in mine)
    return envs


def _submitit_executor(executor: Executor, log_dir: Path, gpus: int):
    """submitit's SlurmExecutor (or LocalExecutor for submitit-local) for jobs of `gpus` GPUs."""
    try:
        import submitit
    except ImportError:
        raise common.UserError("--executor slurm needs submitit: pip install submitit") from None
    if executor.kind == "submitit-local":
        pool = submitit.LocalExecutor(folder=log_dir / "%j")
        pool.update_parameters(timeout_min=executor.time_min)
        return pool
    if not shutil.which("sbatch"):
        raise common.UserError("--executor slurm: no sbatch on this machine (run it on the cluster's login node)")
    pool = submitit.SlurmExecutor(folder=log_dir / "%j")
    pool.update_parameters(job_name="unlearn", partition=executor.partition, time=executor.time_min, nodes=1,
                           ntasks_per_node=1, cpus_per_task=executor.job_cpus, gpus_per_node=gpus or None)
    return pool


def run_graph(runs: list[dict], executor: Executor, *, data_dir: str, device: str, log_dir: Path,
              overwrite: bool = False, may_fail: Callable[[dict], bool] = lambda run: False) -> set[Path]:
    """Execute the runs, each once the runs that write its inputs have finished; a run whose own result exists is
    skipped (redo_reason), so an interrupted sweep resumes with any executor. A failed run's dependants do not
    start; everything else still runs. Returns the outputs of the failed runs for which may_fail(run) holds (tuning
    candidates: dropped); any other failure raises once nothing more can run, naming the logs."""
    by_out = {run["out"]: run for run in runs}
    runs = list(by_out.values())
    needs = {run["out"]: [p for p in inputs_of(run) if p in by_out] for run in runs}
    done, failed, errors, pending = set(), set(), [], []
    start, counter = time.perf_counter(), iter(range(1, len(runs) + 1))

    def report(run, status):
        print(f"[{next(counter)}/{len(runs)}] {run['out'].name}: {status} "
              f"({time.perf_counter() - start:.0f}s total)", flush=True)

    for run in runs:
        reason = redo_reason(run, overwrite)
        if reason is None:
            done.add(run["out"])
            report(run, "skipped (exists)")
        else:
            pending.append((run, reason))
    in_process_tree = executor.kind in ("serial", "local")  # else submitit jobs
    if in_process_tree:
        capacity, envs = executor.workers, _slot_envs(executor, device)
        pool = concurrent.futures.ThreadPoolExecutor(capacity)
    else:
        capacity, clusters = executor.parallelism, {}
    free_slots, running = list(range(capacity)), {}

    def submit(run: dict, slot: int):
        """Start one run in a free slot: a thread's future, or a submitted job."""
        run["out"].parent.mkdir(parents=True, exist_ok=True)
        argv = script_argv(run, executor, data_dir=data_dir, device=device)
        if in_process_tree:
            return pool.submit(_run_process, argv, envs[slot], log_dir / f"{run['out'].name}.log")
        gpus = job_gpus(run, executor)
        if gpus not in clusters:
            clusters[gpus] = _submitit_executor(executor, log_dir / "submitit", gpus)
        import submitit
        # The threads are set in the job: the login node's environment stays there.
        return clusters[gpus].submit(submitit.helpers.CommandFunction(
            ["env", f"OMP_NUM_THREADS={executor.job_cpus}", *argv], cwd=os.getcwd(), verbose=True))

    def finish(run: dict, reason: str, handle, began: float) -> None:
        """A run whose handle is done: done, or failed (the sweep goes on without it and its dependants)."""
        try:
            handle.result()
        except Exception as err:  # a script's failure, reported with its log
            failed.add(run["out"])
            message = str(err) if in_process_tree else f"{_script_error(str(err))} (log: {handle.paths.stderr})"
            if not may_fail(run):
                errors.append(f"{run['out'].name}: {message}")
            report(run, f"FAILED: {message}")
            return
        done.add(run["out"])
        report(run, f"done in {time.perf_counter() - began:.0f}s{reason}")

    try:
        while pending or running:
            for run, reason in list(pending):
                if any(p in failed for p in needs[run["out"]]):
                    pending.remove((run, reason))
                    failed.add(run["out"])
                    report(run, "not run (an input failed)")
                elif free_slots and all(p in done for p in needs[run["out"]]):
                    pending.remove((run, reason))
                    slot = free_slots.pop(0)
                    running[run["out"]] = (run, reason, slot, submit(run, slot), time.perf_counter())
            if not running:
                continue
            time.sleep(0.2 if in_process_tree else 2.0)
            for out, (run, reason, slot, handle, began) in list(running.items()):
                if handle.done():
                    del running[out]
                    free_slots.append(slot)
                    finish(run, reason, handle, began)
    except KeyboardInterrupt:
        # Ctrl-C reaches this process's own children, not jobs on a cluster: those would run on, unwatched.
        jobs = [] if in_process_tree else [handle for *_, handle, _ in running.values()]
        for handle in jobs:
            handle.cancel(check=False)
        stopped = f"interrupted: {len(running)} run(s) stopped"
        if jobs:
            stopped += f", {len(jobs)} submitted job(s) cancelled"
        raise common.UserError(f"{stopped}; finished runs are kept, the same command again resumes") from None
    if in_process_tree:
        pool.shutdown()
    if errors:
        raise common.UserError(f"{len(errors)} run(s) failed, first {errors[0]}; the finished runs are kept: "
                               "run the same command again to redo the others")
    return {out for out in failed if may_fail(by_out[out])}


def evaluation_run(group: dict, out_dir: Path, *, split: str, mia_draws: int) -> dict:
    """The evaluate.py run of one group (its JSON named by the group and a digest of the command, so a group with
    other models or references is another file)."""
    floor = ["--floor", group["floor"]] if group["floor"] else []
    sparse = ["--sparse-retrain", group["sparse_retrain"]] if group["sparse_retrain"] else []
    cmd = ["evaluate.py", group["source"], *group["methods"].values(), "--retrain", group["retrain"], *floor,
           *sparse, "--split", split, "--mia-draws", mia_draws]
    digest = hashlib.sha1(" ".join(map(str, cmd)).encode()).hexdigest()[:10]
    name = f"{group['arch']}_{group['forget']}_s{group['seed']}_{group['variant']}_{split}_{digest}.json"
    return dict(kind="evaluation", out=out_dir / "evaluations" / name, cmd=cmd)


def evaluation_rows(groups: list[dict], evaluations: list[dict]) -> list[dict]:
    """The rows of each group's evaluation, labelled; the references' rows kept once per (arch, forget, seed)."""
    rows, seen = [], set()
    for group, evaluation in zip(groups, evaluations):
        variant = "" if group["variant"] == "dense" else f"@{group['variant']}"
        labels = {str(group["retrain"]): "retrain", str(group["source"]): f"original{variant}",
                  **{str(out): label for label, out in group["methods"].items()}}
        if group["floor"]:
            labels[str(group["floor"])] = "retrain-floor"
        if group["sparse_retrain"]:
            labels[str(group["sparse_retrain"])] = f"retrain-sparse{variant or '-pruned'}"
        for row in json.loads(evaluation["out"].read_text())["rows"]:
            key = (group["arch"], group["forget"], group["seed"], row["path"])
            if key not in seen:
                seen.add(key)
                rows.append(dict(row, arch=group["arch"], forget=group["forget"], seed=group["seed"],
                                 label=labels[row["path"]]))
    return rows


def selection_report(table: list[dict]) -> str:
    """Markdown: every candidate's validation figures and which one the grid uses."""
    lines = ["Settings chosen on the VALIDATION split (evaluate.py --split val): per method and forget kind, the "
             "candidate with the smallest validation Avg Gap to Retrain; the test set was not read.\n",
             "| arch | forget | method | setting | val Avg Gap ↓ | val UA | val TA | chosen |", "|" + "---|" * 8]
    lines += [f"| {r['arch']} | {r['forget']} | {r['method']} | `{r['setting']}` | {r['val_avg_gap']:.2f} | "
              f"{r['val_UA']:.2f} | {r['val_TA']:.2f} | {'**yes**' if r['chosen'] else ''} |" for r in table]
    return "\n".join(lines) + "\n"


CSV_FIELDS = ["profile", "arch", "forget", "seed", "label", "method", "path", "reference", *METRICS]


def write_rows(path: Path, rows: list[dict], profile: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(dict(r, profile=profile) for r in rows)


def read_rows(path: Path) -> list[dict]:
    """The rows of an earlier run's results.csv, checked and parsed (an empty cell: a metric that does not apply)."""
    if not path.exists():
        raise common.UserError(f"{path} not found: run the profile first (without --report-only)")
    if not path.is_file():
        raise common.UserError(f"{path} is not a regular file")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != CSV_FIELDS:
                raise common.UserError(f"{path} does not have results.csv's columns: not this version's output")
            rows = list(reader)
        for line, row in enumerate(rows, 2):
            if None in row or None in row.values():
                raise common.UserError(f"{path} line {line} has a missing or extra cell: truncated or edited")
            row["seed"] = int(row["seed"])
            row.update({k: float(row[k]) if row[k] else None for k in METRICS})
    except (ValueError, UnicodeDecodeError, csv.Error) as err:
        raise common.UserError(f"{path} is malformed ({str(err)[:80]})") from None
    if not rows:
        raise common.UserError(f"{path} has no rows")
    return rows


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """A rerun's rows replace the earlier rows of the same (arch, forget, seed, label); the others stay."""
    def key(row):
        return row["arch"], row["forget"], row["seed"], row["label"]
    fresh = {key(r): r for r in new}
    kept = [fresh.pop(key(r), r) for r in old]  # in place, so the table keeps its order
    return kept + list(fresh.values())


def compare_rows(profiles: list[str], root: Path, forgets: list[str] | None = None) -> list[dict]:
    """The rows of several finished profiles (their results.csv), on the forget settings and seeds all of them
    have (and in forgets, if given); a model that several profiles evaluated (Retrain, the original) once."""
    per_profile = [read_rows(root / name / "results.csv") for name in profiles]
    settings = set.intersection(*({r["forget"] for r in rows} for rows in per_profile))
    if forgets:
        settings &= set(forgets)
    seeds = set.intersection(*({r["seed"] for r in rows} for rows in per_profile))
    if not settings or not seeds:
        raise common.UserError(f"profiles {', '.join(profiles)} share no forget setting and seed")
    merged, seen = [], set()
    for rows in per_profile:
        for row in rows:
            key = row["arch"], row["forget"], row["seed"], Path(row["path"]).resolve()  # profiles run from other cwds
            if row["forget"] in settings and row["seed"] in seeds and key not in seen:
                seen.add(key)
                merged.append(row)
    return merged


def audit_groups(profiles: list[str], root: Path, forgets: list[str], seeds: list[int]) -> list[dict]:
    """Per (arch, forget setting, seed) of finished profiles: the Retrain, its floor Retrains and every other model
    once, labelled as in their tables (sparse Retrains left out: references for pruning, not methods)."""
    groups = {}
    for row in compare_rows(profiles, root, forgets):
        if row["seed"] not in seeds:
            continue
        key = row["arch"], row["forget"], row["seed"]
        group = groups.setdefault(key, dict(zip(("arch", "forget", "seed"), key), retrain=None, floor=[], models={}))
        if row["label"] == "retrain":
            group["retrain"] = row["path"]
        elif row["label"] == "retrain-floor":
            group["floor"].append(row["path"])
        elif not row["label"].startswith("retrain-sparse"):
            group["models"][row["label"]] = row["path"]
    return list(groups.values())


def relearn_plot(rows: list[dict], path: Path) -> None:
    """Accuracy on the held-out forgotten data against relearning steps, one panel per forget setting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    settings = list(dict.fromkeys((r["forget"], r["seed"]) for r in rows))
    fig, axes = plt.subplots(1, len(settings), figsize=(11 * len(settings), 6), squeeze=False)
    for ax, (forget, seed) in zip(axes[0], settings):
        group = [r for r in rows if (r["forget"], r["seed"]) == (forget, seed)]
        colours = iter([*plt.get_cmap("tab20").colors, *plt.get_cmap("tab20b").colors] * 2)
        for row in group:
            style = dict(color="black", linewidth=2.5) if row["model"] == "retrain" else \
                dict(color="black", linewidth=1.5, linestyle="--") if row["model"].startswith("retrain") else \
                dict(color="grey", linestyle=":") if row["model"] == "original" else dict(color=next(colours))
            ax.plot(row["curve"], label=row["model"], **style)
        ax.axhline(group[0]["target_acc"], color="red", linewidth=0.8, linestyle="--")
        ax.set_xscale("symlog", linthresh=1)
        ax.set(xlim=(0, len(group[0]["curve"]) - 1), xlabel="relearning steps (Adam, batch 64; log scale past 1)",
               ylabel="accuracy on held-out forgotten data (%)",
               title=f"{forget}, seed {seed}: Retrain (black) has to learn it; the others get it back (red: target)")
        ax.legend(fontsize=6, ncol=2, loc="center left", bbox_to_anchor=(1.01, 0.5))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    common.save_png(fig, path)


def lira_setup(lira: dict, root: Path) -> tuple[dict, Path]:
    """An audit profile's U-LiRA methods (name -> command) and its shadows' checkpoint folder."""
    import audit
    methods = audit.method_commands(lira["methods"], lira["method_flags"])
    return methods, root / "ckpt" / ("lira_" + "_".join(a.removeprefix("--") for a in lira["pretrain"]
                                                       if a not in ("--dataset", "--arch")))


def run_audit_profile(name: str, spec: dict, root: Path, data_dir: str, device: str, *,
                      executor: Executor | None = None, dry_run: bool = False) -> list[Path]:
    """probe and relearn on every model of the audited profiles, then U-LiRA; returns the files written."""
    import audit
    import evaluate
    out_dir, written = root / name, []
    relearn_settings = spec.get("relearn_settings", {})  # audit.audit's keywords; its defaults otherwise
    relearn_steps = relearn_settings.get("relearn_steps", audit.RELEARN_STEPS)
    if dry_run:
        if spec["lira"]:
            methods, ckpt = lira_setup(spec["lira"], root)
            runs, _ = audit.shadow_runs(spec["lira"]["pretrain"], methods, shadows=spec["lira"]["shadows"],
                                        pool=spec["lira"]["pool"], pool_seed=0, ckpt_dir=ckpt)
            print("\n".join(command_line(r, executor or Executor(), data_dir=data_dir, device=device) for r in runs))
        print(f"then probe {spec['probe']} and relearn {spec['relearn']} on every seed-{spec['seeds']} model of "
              f"{', '.join(spec['of'])} (their results.csv)")
        return []
    for kind in [k for k in ("probe", "relearn") if spec[k]]:
        rows, report = [], []
        for group in audit_groups(spec["of"], root, spec[kind], spec["seeds"]):
            labels = {path: label for label, path in group["models"].items()}
            print(f"{kind}: {group['forget']} seed {group['seed']}, {len(labels)} models", flush=True)
            mine = [dict(row, model=labels.get(row["path"], row["model"]), forget=group["forget"], seed=group["seed"])
                    for row in audit.audit(kind, list(labels), group["retrain"], floor=tuple(group["floor"]),
                                           data_dir=data_dir, device=device,
                                           **(relearn_settings if kind == "relearn" else {}))]
            report.append(f"### {group['arch']}, {group['forget']}, seed {group['seed']}\n\n"
                          f"{audit.markdown(kind, mine, relearn_steps)}\n")
            rows += mine
        written += [out_dir / f"{kind}.md", out_dir / f"{kind}.json"]
        evaluate.write_text(written[-2], "\n".join(report))
        evaluate.write_text(written[-1], json.dumps(rows, indent=1))
        if kind == "relearn" and rows:
            written.append(out_dir / "relearn_curves.png")
            relearn_plot(rows, written[-1])
    if spec["lira"]:
        lira = spec["lira"]
        methods, ckpt = lira_setup(lira, root)
        result = audit.lira(lira["pretrain"], methods, shadows=lira["shadows"], pool=lira["pool"], ckpt_dir=ckpt,
                            data_dir=data_dir, device=device, executor=executor)
        written += [out_dir / "lira.md", out_dir / "lira.json", out_dir / "lira_roc.png"]
        audit.write_lira(result, pretrain=lira["pretrain"], methods=methods, md=written[-3], json_path=written[-2],
                         plot=written[-1])
    return written


def mean_std(values: list) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "-"
    mean, std = float(np.mean(values)), float(np.std(values))
    digits = 4 if abs(mean) < 1 and mean != 0 else (0 if abs(mean) >= 1000 else 2)
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if len(values) > 1 else "")


# (header, row key or function of a label's rows): the summary's columns, mean ± std over runs.
SUMMARY_COLUMNS = ["UA", "RA", "TA", "FTA", "mia_efficacy", "mia_efficacy_std", "mia_loss", "mia_entropy",
                   "act_dist_forget", "act_dist_retain", "js_forget", "avg_gap", "reference", "avg_gap_other",
                   "within_floor", "wall_time_s", "peak_mem_mb", "trainable_params", "sparsity"]
SUMMARY_HEADERS = {"mia_efficacy_std": "MIA-eff draw sd"}


def summary_table(rows: list[dict]) -> str:
    """Mean +/- std per (arch, forget kind, model) over forget settings and seeds, references first.

    "≈ Retrain" says whether the model's mean Avg Gap is at most the largest Avg Gap between two Retrains of
    different seeds in the same runs (the floor): if so, it cannot be told apart from Retrain here."""
    import evaluate
    headers = {k: h for k, h, _ in evaluate.COLUMNS}
    out = []
    for arch in dict.fromkeys(r["arch"] for r in rows):
        for kind in ("class", "random"):
            group = [r for r in rows if r["arch"] == arch and r["forget"].startswith(kind)]
            if not group:
                continue
            settings = sorted({r["forget"] for r in group})
            seeds = sorted({r["seed"] for r in group})
            floor = max((r["avg_gap"] for r in group if r["label"] == "retrain-floor"), default=None)
            out.append(f"### {arch}, {KIND_NAMES[kind]} forgetting: {', '.join(settings)} x seeds {seeds} "
                       f"({len(settings) * len(seeds)} runs per row)\n")
            if floor is not None:
                out.append(f"Retrain-vs-Retrain floor: the largest Avg Gap between two Retrains of different seeds "
                           f"is {floor:.2f}.\n")
            header = ["model"] + [evaluate.HEADER_DIRECTIONS.get(h, h) for h in
                                  (SUMMARY_HEADERS.get(k, headers.get(k, k)) for k in SUMMARY_COLUMNS)]
            out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            for label in dict.fromkeys(r["label"] for r in group):
                mine = [r for r in group if r["label"] == label]
                cells = []
                for key in SUMMARY_COLUMNS:
                    if key == "reference":
                        cells.append(" ".join(sorted({r["reference"] or "-" for r in mine})))
                    elif key == "within_floor":
                        gap = np.mean([r["avg_gap"] for r in mine])
                        cells.append("-" if floor is None or label.startswith("retrain")
                                     else ("yes" if gap <= floor else "no"))
                    else:
                        cells.append(mean_std([r[key] for r in mine]))
                out.append(f"| {label} | " + " | ".join(cells) + " |")
            out.append("")
    return "\n".join(out) + "\n" + evaluate.LEGEND + "\n" + \
        "- MIA-eff draw sd: the mean over runs of MIA-eff's standard deviation over the attack's member draws.\n"


def plots(rows: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    kinds = [k for k in ("class", "random") if any(r["forget"].startswith(k) for r in rows)]
    # One colour per method, one marker per starting model (dense circle, pruned square), so that a grid of a
    # dozen methods x {dense, OMP} stays readable.
    bases = list(dict.fromkeys(r["label"].split("@")[0] for r in rows))
    colours = dict(zip(bases, [*plt.get_cmap("tab10").colors, *plt.get_cmap("Dark2").colors]))
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds) + 2, 5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        group = [r for r in rows if r["forget"].startswith(kind)]
        for label in dict.fromkeys(r["label"] for r in group):
            ua = [r["UA"] for r in group if r["label"] == label]
            ra = [r["RA"] for r in group if r["label"] == label]
            marker = "*" if label == "retrain" else "s" if "@" in label else "o"
            ax.errorbar(np.mean(ra), np.mean(ua), xerr=np.std(ra), yerr=np.std(ua), fmt=marker,
                        color=colours[label.split("@")[0]], markersize=14 if label == "retrain" else 7, capsize=3,
                        label=label)
        ax.set(xlabel="RA = Acc(Dr) % (higher = better)", ylabel="UA = 100 - Acc(Df) % (higher = more forgotten)",
               title=f"{KIND_NAMES[kind]} forgetting (mean ± std; Retrain = star"
                     + (", from the OMP model = square)" if any("@" in r["label"] for r in rows) else ")"))
        ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))  # outside: points stay visible
    fig.tight_layout()
    written.append(out_dir / "ua_vs_ra.png")
    common.save_png(fig, written[-1])

    labels = list(dict.fromkeys(r["label"] for r in rows if r["label"] != "original"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (key, title) in zip(axes, [("wall_time_s", "wall time of the run (s)"),
                                       ("peak_mem_mb", "peak memory (MB)"),
                                       ("trainable_params", "trainable parameters")]):
        means = [np.mean([r[key] for r in rows if r["label"] == label and r[key] is not None]) for label in labels]
        ax.bar(range(len(labels)), means, color="tab:blue")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_title(title)
    fig.tight_layout()
    written.append(out_dir / "cost.png")
    common.save_png(fig, written[-1])
    return written


def main():
    parser = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--profile", help=f"one of {', '.join([*PROFILES, *AUDIT_PROFILES])}")
    what.add_argument("--compare", metavar="P1,P2,...",
                      help="write <out-root>/compare.md: the finished profiles' rows on the forget settings and "
                           "seeds they all have, in one table; runs nothing")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the profile's methods")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the profile's)")
    parser.add_argument("--forgets", default=None,
                        help="comma-separated subset of the profile's forget settings, e.g. class3,random1200")
    parser.add_argument("--out-root", default="results", help="(default: %(default)s)")
    parser.add_argument("--data-dir", default="./data", help="(default: %(default)s)")
    parser.add_argument("--device", type=common.device_name, default="auto", help="(default: %(default)s)")
    parser.add_argument("--mia-draws", type=common.positive_int, default=None,
                        help="evaluate.py's draws of the attacks' member set (default: evaluate.py's)")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo every run of the grid and replace results.csv instead of merging into it")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    add_executor_args(parser)
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild table.md and the plots from an earlier run's results.csv; runs nothing")
    args = parser.parse_args()
    executor = make_executor(args.executor, workers=args.workers, threads=args.threads_per_run,
                             partition=args.slurm_partition, time_min=args.slurm_time, gpus=args.slurm_gpus,
                             cpus=args.slurm_cpus, parallelism=args.slurm_parallelism, ddp=args.ddp)
    if args.compare:
        rows = compare_rows(args.compare.split(","), Path(args.out_root),
                            args.forgets.split(",") if args.forgets else None)
        out = Path(args.out_root) / "compare.md"
        common.atomic_write(out, lambda tmp: tmp.write_text(summary_table(rows)))
        print(summary_table(rows))
        print(f"compared {args.compare}: {len(rows)} rows -> {out}")
        return
    if args.profile in AUDIT_PROFILES:
        start = time.perf_counter()
        written = run_audit_profile(args.profile, AUDIT_PROFILES[args.profile], Path(args.out_root), args.data_dir,
                                    args.device, executor=executor, dry_run=args.dry_run)
        if args.dry_run:
            return
        print(f"{args.profile}: {time.perf_counter() - start:.0f}s -> " + ", ".join(map(str, written)))
        return
    if args.profile not in PROFILES:
        raise common.UserError(f"unknown profile {args.profile!r}; choose one of "
                               f"{', '.join([*PROFILES, *AUDIT_PROFILES])}")
    profile = PROFILES[args.profile]
    if args.forgets:
        tags = [forget_tag(f) for f in profile["forgets"]]
        wanted = args.forgets.split(",")
        if not set(wanted) <= set(tags):
            raise common.UserError(f"--forgets {args.forgets}: the profile's forget settings are {', '.join(tags)}")
        profile = dict(profile, forgets=[f for f in profile["forgets"] if forget_tag(f) in wanted])
    methods = args.methods.split(",") if args.methods else profile["methods"]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise common.UserError(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else profile["seeds"]
    except ValueError:
        raise common.UserError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    root = Path(args.out_root)
    if any(s < 0 for s in seeds):
        raise common.UserError(f"--seeds must be non-negative, got {seeds}")
    tune_runs, tune_groups = plan_tuning(profile, methods, seeds, root / "ckpt")
    print(f"{args.profile}: {methods} x {[forget_tag(f) for f in profile['forgets']]} x seeds {seeds}"
          + (f"; tuning {profile['tune']} on the validation split first" if tune_groups else ""))
    out_dir = root / args.profile
    import evaluate
    mia_draws = args.mia_draws or evaluate.MIA_DRAWS
    if args.dry_run:
        defaults = {(m, kind_of(g["forget"])): TUNING[m][0] for g in tune_groups for m, _ in g["candidates"].values()}
        runs, groups = plan(profile, methods, seeds, root / "ckpt", defaults)
        runs += [evaluation_run(g, out_dir, split="test", mia_draws=mia_draws) for g in groups]
        tune_runs = tune_runs if tune_groups else []  # without tuning they are the grid's originals
        if tune_groups:
            print("# tuning runs (then evaluate.py --split val picks each method's setting):")
        for run in tune_runs + ([dict(cmd=["# grid, shown with the first candidates:"], out=None)] if tune_groups
                                else []) + runs:
            print(command_line(run, executor, data_dir=args.data_dir, device=args.device) if run["out"]
                  else run["cmd"][0])
        kinds = collections.Counter(run["kind"] for run in {r["out"]: r for r in [*tune_runs, *runs]}.values())
        print(f"{sum(kinds.values())} runs (" + ", ".join(f"{n} {kind}" for kind, n in kinds.items())
              + f"); executor {executor.kind}")
        return

    start = time.perf_counter()
    log_dir = out_dir / "logs"
    run_all = functools.partial(run_graph, executor=executor, data_dir=args.data_dir, device=args.device,
                                log_dir=log_dir, overwrite=args.overwrite)
    if args.report_only:
        rows = read_rows(out_dir / "results.csv")
    else:
        # An earlier results.csv is merged into, so it is checked before any work.
        previous = read_rows(out_dir / "results.csv") if (out_dir / "results.csv").exists() and not args.overwrite \
            else []
        chosen = {}
        out_dir.mkdir(parents=True, exist_ok=True)
        if tune_groups:
            # A failed candidate (e.g. a learning rate that diverges) is dropped, not fatal.
            failed = run_all(tune_runs, may_fail=lambda run: run["kind"] == "method")
            for group in tune_groups:
                for label in [label for label, out in group["methods"].items() if out in failed]:
                    del group["methods"][label], group["candidates"][label]
            evaluations = [evaluation_run(g, out_dir, split="val", mia_draws=mia_draws) for g in tune_groups]
            run_all(evaluations)
            chosen, table = select_settings(evaluation_rows(tune_groups, evaluations), tune_groups)
            report = selection_report(table)
            common.atomic_write(out_dir / "selection.md", lambda tmp: tmp.write_text(report))
            print(report)
        runs, groups = plan(profile, methods, seeds, root / "ckpt", chosen)
        evaluations = [evaluation_run(g, out_dir, split="test", mia_draws=mia_draws) for g in groups]
        run_all(runs + evaluations)
        rows = evaluation_rows(groups, evaluations)
        rows = merge_rows(previous, rows)
        common.atomic_write(out_dir / "results.csv", lambda tmp: write_rows(tmp, rows, args.profile))
    common.atomic_write(out_dir / "table.md", lambda tmp: tmp.write_text(summary_table(rows)))
    written = plots(rows, out_dir)
    print(summary_table(rows))
    done = "report rebuilt from results.csv" if args.report_only else f"{len(rows)} rows"
    print(f"{args.profile}: {done}, {time.perf_counter() - start:.0f}s -> "
          + ", ".join(str(p) for p in [out_dir / "results.csv", out_dir / "table.md", *written]))


if __name__ == "__main__":
    common.run_main(main)
