"""Speed and cost benchmark (not a test): prints figures for whatever device it runs on.

    python bench.py                      # parts 1-3 and 5: 30 min on 2 free CPU cores, 4 on an H200
    python bench.py --json bench.json --md bench.md
    python bench.py --parts whole-runs --archs resnet50 --data-dir data   # part 4 alone
    python bench.py --quick --archs resnet_tiny,vit_tiny   # tiny step counts and models: checks that it runs

1. Loop overhead: throughput of common.train_loop (CE loss, on-device uint8 batches from common.batches,
   per-batch normalisation, loss bookkeeping) over the raw model step (forward, backward, optimizer step on
   batches already normalised in memory), same resnet_tiny, 28 px, batch 128, same steps; best of three
   interleaved passes each. Goal: ratio >= 0.9.
2. Cost of FT, Prune+FT, LoRA and PruneLoRA for ResNet-50 and ViT-S/4 on 32 px CIFAR-10-shaped random images
   (the dataset random-cifar10), at batch 32 and 128: each method's own script run as a user runs it
   (`python loraprune.py --model ORIGINAL --forget-class 3 --epochs 2 --batch-size B`, its defaults otherwise),
   on a random-initialised original of just enough images for --steps batches per epoch; the figures are read
   from the checkpoint's sidecar. Seconds per step: the second epoch's time over its images, times the batch
   (the first epoch holds the warm-up: allocation, kernel selection); activation memory (bytes autograd keeps for
   backward in the first step, the sidecar's activation_mb: the same figure on CPU and GPU); the first step's
   FLOPs (its step_gflop) and the arithmetic rate they make at the timed step's speed, also as a share of the
   device's rate on a large matrix product in the same precision (the part's first measurement); peak memory;
   trainable parameters; preparation (pruning, BatchNorm re-estimation, adapters); each figure's ratio to FT at
   the same arch and batch. FT runs again after every method, and a method's step is compared with the mean of
   the FT runs just before and after it (a shared machine's speed drifts over the minutes this part takes). Also
   the per-epoch time EXTRAPOLATED to a 45,000-image Dr. Prune+FT and PruneLoRA also with --shrink
   (pruneft-shrink, loraprune-shrink). Peak memory is CUDA max allocated (reset by common.train_loop), or on CPU
   the process's peak RSS, data included as in any sidecar: on CPU each run is its own process (RSS peaks cannot
   be reset); on CUDA each runs in this process (its main()). ResNets add LoRA with adapter dropout 0
   (lora-dropout0, `--lora-dropout 0`): the cost of the paper's dropout 0.1, whose mask is drawn over every
   adapted layer's full-size input.
3. CUDA only (skipped with a printed reason elsewhere): the end-to-end time of one PruneLoRA class-unlearning
   run, loraprune.py's main() at its defaults (prune, LoRA, 5 epochs over 45,000 random 32 px images, merge,
   Df/Dr/test accuracies, save) on ResNet-50. With --compile, part 2 again with the scripts' --compile
   (torch.compile; its compilation in the first epoch).
4. Whole runs (--parts ...,whole-runs; ~35 min per arch on 2 CPU cores): each method's script run as a user runs
   it, on one unlearning epoch at batch 32 (68 steps) of a short original trained here on 2,400 Fashion-MNIST
   images (--data-dir: the real files, or Debian's dataset-fashion-mnist): the sidecar's wall time (preparation,
   i.e. pruning, BatchNorm re-estimation and adapters, included) and the whole process's. FT runs before and
   after every method, and each method is compared with the mean of those two, so that a drift of the machine's
   speed while the part runs moves both sides of the ratio.
5. CUDA only (else skipped with a printed reason; --quick: 500 images, to check that it runs): the Unlearn-Sparse
   Retrain, pretrain.py's class-wise --retrain of resnet18 at its recipe (batch 256; 45,000 random CIFAR-10-shaped
   training images, 10% of them the forgotten class), two epochs, the second timed (its validation pass
   included), EXTRAPOLATED to the recipe's 182 epochs; with --compile also in that mode. Part 1 also runs with
   --compile: the loop against the raw step, both compiled.

Prints one JSON line per measurement, then a markdown summary; --json/--md write the figures to files.
"""
import argparse
import itertools
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import common
import finetune
import lora
import loraprune
import pretrain
import pruneft

BATCH_SIZE = 128  # the PruneLoRA paper's (its four scripts' default)
BATCH_SIZES = "32,128"  # the per-method cost at a small and at the paper's batch
DR_IMAGES = 45_000  # CIFAR-10 retain set of class-wise forgetting (50,000 - 5,000 cats): one epoch
FORGET_CLASS = 3  # the PruneLoRA paper's class (cat)
ARCHS = "resnet50,vit_small"  # the PruneLoRA paper's architectures
DATASET = "random-cifar10"  # parts 2 and 3: random images of CIFAR-10's shape (a step's cost ignores the pixels)
LOOP_STEPS = 60  # steps per pass of the loop-overhead measurement (10 with --quick)
PARTS = ("loop", "cost", "end-to-end", "whole-runs", "retrain")
DEFAULT_PARTS = "loop,cost,end-to-end,retrain"  # whole-runs (part 4) on request: it trains real models, minutes each
RETRAIN_FLAGS = ("--arch", "resnet18", "--retrain", "--forget-class", "0")  # unlearn-sparse-cifar10's class-wise
RETRAIN_EPOCHS = 182  # the resnet18 recipe's (Unlearn-Sparse), which part 5 extrapolates its two epochs to
WHOLE_RUN_METHODS = "lora,loraprune,loraprune-shrink"  # part 4's methods, each between two FT runs
WHOLE_RUN_ORIGINAL = ("--dataset", "fashion-mnist", "--train-subset", "2400", "--epochs", "1")
WHOLE_RUN_FLAGS = ("--forget-class", "3", "--batch-size", "32", "--epochs", "1")  # one pass over Dr: 68 steps
METHODS = {  # name -> (its script, the flags that make the script run this variant)
    "finetune": (finetune, ()),
    "pruneft": (pruneft, ()),
    "lora": (lora, ()),
    "lora-dropout0": (lora, ("--lora-dropout", "0")),  # what the paper's ResNet adapter dropout 0.1 costs
    "loraprune": (loraprune, ()),
    "pruneft-shrink": (pruneft, ("--shrink",)),  # the pruned filters removed while training
    "loraprune-shrink": (loraprune, ("--shrink",)),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loop_overhead(device: torch.device, steps: int, compile_mode: str | None = None) -> dict:
    """Ratio of train_loop's throughput to the raw step's, for resnet_tiny on 28 px batches of 128; with
    compile_mode, both through torch.compile in that mode."""
    info = common.DATASETS["fashion-mnist"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (steps * BATCH_SIZE, info.channels, info.size, info.size), dtype=torch.uint8,
                      generator=gen).to(device)
    y = torch.randint(0, info.num_classes, (len(x),), generator=gen).to(device)
    common.seed_everything(0)
    model = common.prepare_model(common.build_model("resnet_tiny", info), device)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    normalised = [(common.normalize(xb, info), yb) for xb, yb in common.batches(x, y, BATCH_SIZE)]
    forward = common.compiled(model, compile_mode) if compile_mode else model
    mark_step = compile_mode == "reduce-overhead" and device.type == "cuda"  # as train_loop does

    def raw_pass():
        model.train()
        for xb, yb in normalised:
            if mark_step:
                torch.compiler.cudagraph_mark_step_begin()
            with common.autocast(device):
                loss = F.cross_entropy(forward(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        sync(device)

    def loop_pass():
        common.train_loop(model, optimizer, 1, lambda epoch: common.batches(x, y, BATCH_SIZE),
                          common.ce_loss(info, None, False), device=device, desc="bench", compile_mode=compile_mode)

    raw_pass(), loop_pass()  # warm-up
    timings = {"raw": [], "loop": []}
    for _ in range(3):  # interleaved, best of three: robust to background load
        for name, fn in (("raw", raw_pass), ("loop", loop_pass)):
            start = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - start)
    raw, loop = min(timings["raw"]), min(timings["loop"])
    return dict(steps=steps, precision=precision(device, compile_mode), raw_img_s=round(steps * BATCH_SIZE / raw),
                loop_img_s=round(steps * BATCH_SIZE / loop), ratio=round(raw / loop, 3))


def matmul_tflops(device: torch.device) -> float:
    """The device's rate on a large square matrix product in the steps' precision (bf16 on CUDA, fp32 on the CPU),
    in TFLOP/s, best of three: what a step's arithmetic could reach at most."""
    cuda = device.type == "cuda"
    n, reps = (8192, 20) if cuda else (1024, 4)
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(device, torch.bfloat16 if cuda else torch.float32) for _ in "ab")
    a @ b  # warm-up: kernel selection
    best = math.inf
    for _ in range(3):
        sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 * reps / best / 1e12


def random_original(arch: str, folder: Path, images: int = 0) -> Path:
    """A randomly initialised `arch` saved as the original of `images` random CIFAR-10-shaped training images (0:
    all 50,000), with no validation split (the PruneLoRA paper's setting): what parts 2 and 3 unlearn from."""
    path = folder / f"original_{arch}_{images}.safetensors"
    if not path.exists():
        data = common.make_data(DATASET, folder, val_fraction=0.0, train_subset=images)
        common.seed_everything(0)
        model = common.build_model(arch, data.info)
        common.save_checkpoint(model, path, arch=arch, method="original", data=data, config={}, result=None,
                               trainable_params=common.count_params(model)[0])
    return path


def run_script(script: str, *args, label: str | None = None) -> str:
    """Run one of the project's scripts in a subprocess; its standard output, or a UserError naming `label` (by
    default the script) with the last line of its errors if it fails."""
    proc = subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True)
    if proc.returncode:
        raise common.UserError(f"{label or Path(script).name} failed: "
                               f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return proc.stdout


def run_main(script, *args) -> None:
    """Run a method script's main() in this process, with this command line (its UserError propagates)."""
    saved, sys.argv = sys.argv, [script.__file__, *map(str, args)]
    try:
        script.main()
    finally:
        sys.argv = saved


def run_method(method: str, original: Path, out: Path, device: torch.device, *flags, in_process: bool) -> dict:
    """One run of the method's script from `original` to `out`, as a user runs it: its main() in this process, or
    a process of its own (on CPU, so that the peak memory in its sidecar is its own); its sidecar."""
    script, variant_flags = METHODS[method]
    args = ["--model", original, "--forget-class", FORGET_CLASS, "--device", device, "--data-dir", out.parent,
            "--out", out, *variant_flags, *flags]
    if in_process:
        run_main(script, *args)
    else:
        run_script(script.__file__, *args, label=f"{method} ({' '.join(map(str, flags))})")
    return common.read_sidecar(out)


def method_cost(arch: str, method: str, batch_size: int, device: torch.device, steps: int, folder: Path, *,
                compile_mode: str | None = None, in_process: bool) -> dict:
    """The cost of one method's script: two epochs of at least `steps` batches each over Dr; the first holds the
    warm-up (and torch.compile's compilation, with compile_mode), the second is timed (its images per second
    times the batch: the step a full batch takes). in_process: as run_method."""
    # Dr is about 9/10 of the images (random labels, class 3 forgotten): 15% more than `steps` batches need.
    original = random_original(arch, folder, images=math.ceil(steps * batch_size / 0.85))
    out = folder / f"{len(list(folder.glob('*.json')))}_{method}.safetensors"
    meta = run_method(method, original, out, device, "--epochs", 2, "--batch-size", batch_size,
                      *(["--compile", compile_mode] if compile_mode else []), in_process=in_process)
    first, second = meta["history"]
    retain_images = meta["data"]["train_subset"] - meta["data"]["forget_count"]
    step_s = (second["time_s"] - first["time_s"]) * batch_size / retain_images
    return dict(arch=arch, method=method, batch_size=batch_size, device=str(device),
                precision=precision(device, compile_mode), timed_steps=math.ceil(retain_images / batch_size),
                step_s=round(step_s, 4), step_gflop=meta["step_gflop"], activation_mb=meta["activation_mb"],
                epoch_s_extrapolated=round(step_s * DR_IMAGES / batch_size, 1), prep_s=round(meta["prep_time_s"], 2),
                peak_mem_mb=round(meta["peak_mem_mb"]), trainable_params=meta["trainable_params"],
                total_params=meta["total_params"],
                trainable_pct=round(100 * meta["trainable_params"] / meta["total_params"], 2))


def compared_methods(arch: str) -> list[str]:
    """The methods part 2 compares with FT on `arch`: lora-dropout0 only where LoRA's default has dropout."""
    dropout = common.lora_settings(common.ARCHS[arch].family)["dropout"]
    return [m for m in METHODS if m != "finetune" and (m != "lora-dropout0" or dropout)]


def method_costs(archs: list[str], batch_sizes: list[int], variants: list[str | None], device: torch.device,
                 steps: int, folder: Path, *, in_process: bool) -> list[dict]:
    """Part 2: method_cost of every configuration (variants: None for eager, or a --compile mode). Per arch, batch
    and variant, FT runs first and again after every method; each method row carries the mean FT step of the runs
    just before and after it (ft_step_s), and FT's row the median of all its runs and their range (ft_range_s)."""
    rows = []
    for arch, batch_size, compile_mode in itertools.product(archs, batch_sizes, variants):
        def measure(method: str) -> dict:
            row = method_cost(arch, method, batch_size, device, steps, folder, compile_mode=compile_mode,
                              in_process=in_process)
            print(json.dumps(dict(part="method_cost", **row)), flush=True)
            return row

        ft_runs, group = [measure("finetune")], []
        for method in compared_methods(arch):
            row = measure(method)
            ft_runs.append(measure("finetune"))
            group.append(dict(row, ft_step_s=round((ft_runs[-2]["step_s"] + ft_runs[-1]["step_s"]) / 2, 4)))
        ft_steps = [r["step_s"] for r in ft_runs]
        ft_step_s = statistics.median(ft_steps)
        rows += [dict(ft_runs[0], step_s=round(ft_step_s, 4), ft_runs=len(ft_runs),
                      epoch_s_extrapolated=round(ft_step_s * DR_IMAGES / batch_size, 1),
                      ft_range_s=[min(ft_steps), max(ft_steps)]), *group]
    return rows


def with_ratios(rows: list[dict], peak_tflops: float) -> list[dict]:
    """Each row's step time as a ratio to the FT steps measured beside it (ft_step_s; FT's own row: 1), its
    activation memory to FT's at the same arch, batch and precision, and its arithmetic rate (the step's FLOPs over
    its time; a compiled run computes the products its eager run counted) as a fraction of peak_tflops."""
    ft = {(r["arch"], r["batch_size"], r["precision"]): r for r in rows if r["method"] == "finetune"}
    flops = {(r["arch"], r["batch_size"], r["method"]): r["step_gflop"] for r in rows if r["step_gflop"]}
    out = []
    for r in rows:
        r = dict(r, step_gflop=flops.get((r["arch"], r["batch_size"], r["method"])))
        if r["step_gflop"]:
            tflops = r["step_gflop"] / r["step_s"] / 1e3
            r.update(step_tflops=round(tflops, 3), of_peak=round(tflops / peak_tflops, 4))
        if (key := (r["arch"], r["batch_size"], r["precision"])) in ft:
            r.update(step_vs_ft=round(r["step_s"] / r.get("ft_step_s", ft[key]["step_s"]), 2),
                     activation_vs_ft=(round(r["activation_mb"] / ft[key]["activation_mb"], 2)
                                       if r["activation_mb"] and ft[key]["activation_mb"] else None))
        out.append(r)
    return out


def end_to_end_loraprune(device: torch.device, folder: Path, arch: str = "resnet50") -> dict:
    """One whole PruneLoRA class-unlearning run at loraprune.py's defaults, timed from its start (the data and
    the original loaded) to the saved checkpoint."""
    original = random_original(arch, folder)
    sync(device)
    start = time.perf_counter()
    meta = run_method("loraprune", original, folder / "end_to_end_loraprune.safetensors", device, in_process=True)
    sync(device)
    total_s = time.perf_counter() - start
    return dict(arch=arch, method="loraprune", device=str(device), precision=precision(device),
                epochs=len(meta["history"]),
                retain_images=common.RANDOM_DATASETS[DATASET][1] - meta["data"]["forget_count"],
                train_loop_s=round(meta["wall_time_s"] - meta["prep_time_s"], 1), end_to_end_s=round(total_s, 1),
                peak_mem_mb=round(meta["peak_mem_mb"]), note="random 32 px images; excludes the imports")


def retrain_time(device: torch.device, folder: Path, compile_mode: str | None = None, *, quick: bool) -> dict:
    """Part 5: pretrain.py's Unlearn-Sparse Retrain (resnet18, its recipe) for two epochs in this process, the
    second timed; the whole run's time extrapolated to the recipe's epochs."""
    out = folder / f"retrain_{compile_mode or 'eager'}.safetensors"
    quick_flags = ["--train-subset", 500, "--val-fraction", 0.01] if quick else []
    run_main(pretrain, "--dataset", DATASET, *RETRAIN_FLAGS, "--epochs", 2, *quick_flags,
             *(["--compile", compile_mode] if compile_mode else []), "--data-dir", folder, "--device", device,
             "--out", out)
    meta = common.read_sidecar(out)
    first, second = meta["history"]
    epoch_s, epochs = second["time_s"] - first["time_s"], RETRAIN_EPOCHS
    return dict(arch="resnet18", device=str(device), precision=precision(device, compile_mode),
                retain_images=meta["data"]["train_subset"] - meta["data"]["forget_count"],
                batch_size=meta["config"]["batch_size"], first_epoch_s=round(first["time_s"], 1),
                epoch_s=round(epoch_s, 2), epochs=epochs, retrain_min_extrapolated=round(epoch_s * epochs / 60, 1),
                step_gflop=meta["step_gflop"])


def script_flags(method: str) -> list[str]:
    """The flags that make a method's script run the variant this benchmark names."""
    return list(METHODS[method][1])


def whole_runs(arch: str, methods: list[str], device: torch.device, data_dir: str) -> list[dict]:
    """Part 4: the scripts' whole runs, in the order FT, methods[0], FT, methods[1], ..., FT (with_ft_ratios)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        common_flags = ["--data-dir", data_dir, "--device", str(device)]
        original = Path(tmp) / "original.safetensors"
        run_script(str(Path(__file__).with_name("pretrain.py")), "--arch", arch, *WHOLE_RUN_ORIGINAL, *common_flags,
                   "--out", original)
        for i, method in enumerate(["finetune", *itertools.chain.from_iterable((m, "finetune") for m in methods)]):
            out = Path(tmp) / f"{i}_{method}.safetensors"
            start = time.perf_counter()
            run_script(METHODS[method][0].__file__, "--model", original, *WHOLE_RUN_FLAGS, *script_flags(method),
                       *common_flags, "--out", out)
            process_s = time.perf_counter() - start
            meta = common.read_sidecar(out)
            report = meta["quick_report"]
            rows.append(dict(arch=arch, run=i + 1, method=method, wall_s=round(meta["wall_time_s"], 1),
                             prep_s=round(meta["prep_time_s"], 1), process_s=round(process_s, 1),
                             peak_mem_mb=round(meta["peak_mem_mb"]), retain_acc=report["retain_acc"],
                             test_acc=report["test_retain_acc"]))
            print(json.dumps(dict(part="whole_run", **rows[-1])), flush=True)
    return with_ft_ratios(rows)


def with_ft_ratios(rows: list[dict]) -> list[dict]:
    """Whole runs in the order FT, method, FT, method, ..., FT: each method's times as ratios to the mean of the
    FT runs just before and after it."""
    for before, row, after in zip(rows[::2], rows[1::2], rows[2::2]):
        for key in ("wall_s", "process_s"):
            row[key.removesuffix("_s") + "_vs_ft"] = round(row[key] / ((before[key] + after[key]) / 2), 2)
    return rows


def precision(device: torch.device, compile_mode: str | None = None) -> str:
    """What the training steps ran in (the scripts' defaults: bf16 autocast on CUDA); compiled or not."""
    label = "bf16 autocast, channels_last" if device.type == "cuda" else "fp32, channels_last"
    return label + (f", torch.compile ({compile_mode})" if compile_mode else "")


def ft_range(row: dict) -> str:
    """' (0.97-1.05, 7 runs)': an FT row's fastest and slowest run as ratios to its median; else nothing."""
    if "ft_range_s" not in row:
        return ""
    low, high = (round(t / row["step_s"], 2) for t in row["ft_range_s"])
    return f" ({low}-{high}, {row['ft_runs']} runs)"


def markdown(figures: dict) -> str:
    lines = [f"## bench.py on {figures['device']}"]
    for lo in figures.get("loop_overhead", []):
        lines += ["", f"Loop overhead (resnet_tiny, 28 px, batch {BATCH_SIZE}, {lo['steps']} steps, best of 3, "
                  f"{lo['precision']}): raw step {lo['raw_img_s']} img/s, common.train_loop {lo['loop_img_s']} img/s, "
                  f"ratio {lo['ratio']}."]
    if "methods" in figures:
        lines += ["", "Per-method cost, 32 px, each method's script run on random images. s/step = the second "
                  "epoch's time per full batch (timed steps: its batches); activations = bytes autograd keeps "
                  "for backward in one training forward (the same on any device); step x FT = ratio to the mean "
                  "step of the FT runs just before and after the method's (FT runs again after every method, so the "
                  "machine's drift cancels; FT's row: the median of its runs, and in brackets their range as "
                  "ratios to it); activations x FT = ratio to FT at the same arch, batch and precision; prep = "
                  "pruning and adapters before the first step; GFLOP/step = the matrix products and convolutions "
                  "of one step's forward and backward (torch's FlopCounterMode), TFLOP/s = those over s/step, in "
                  f"brackets as a share of this device's rate on a large matrix product ({figures['matmul_tflops']} "
                  "TFLOP/s, the steps' precision); epoch time "
                  f"EXTRAPOLATED to {DR_IMAGES:,} images:", "",
                  "| arch | batch | method | precision | timed steps | s/step | step x FT | GFLOP/step | TFLOP/s | "
                  "activations MB | activations x FT | prep s | epoch s (extrapolated) | peak MB | trainable | "
                  "trainable % |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {m['arch']} | {m['batch_size']} | {m['method']} | {m['precision']} | {m['timed_steps']} | "
                  f"{m['step_s']} | {m.get('step_vs_ft', '')}{ft_range(m)} | {m['step_gflop'] or 'n/a'} | "
                  + (f"{m['step_tflops']} ({m['of_peak']:.1%}) | " if m.get("step_tflops") else "n/a | ")
                  + f"{m['activation_mb'] or 'n/a'} | {m.get('activation_vs_ft') or ''} | "
                  f"{m['prep_s']} | {m['epoch_s_extrapolated']} | {m['peak_mem_mb']} | {m['trainable_params']:,} | "
                  f"{m['trainable_pct']} |" for m in figures["methods"]]
    if e2e := figures.get("end_to_end_loraprune"):
        lines += ["", f"End-to-end PruneLoRA class unlearning: {e2e['end_to_end_s']} s ({e2e['train_loop_s']} s in "
                  f"the training loop), {e2e['epochs']} epochs over {e2e['retain_images']:,} images, {e2e['arch']}, "
                  f"{e2e['precision']}, peak {e2e['peak_mem_mb']} MB; {e2e['note']}."]
    elif "end_to_end_skipped" in figures:
        lines += ["", f"End-to-end PruneLoRA class unlearning: {figures['end_to_end_skipped']}"]
    for r in figures.get("retrain", []):
        lines += ["", f"Unlearn-Sparse Retrain ({r['arch']}, batch {r['batch_size']}, {r['precision']}): "
                  f"{r['epoch_s']} s per epoch over {r['retain_images']:,} images "
                  f"(first epoch {r['first_epoch_s']} s), "
                  f"{r['retrain_min_extrapolated']} min for its {r['epochs']} epochs, EXTRAPOLATED; "
                  f"{r['step_gflop']} GFLOP per step."]
    if "retrain_skipped" in figures:
        lines += ["", f"Unlearn-Sparse Retrain: {figures['retrain_skipped']}"]
    if runs := figures.get("whole_runs"):
        lines += ["", "Whole runs as a user runs them, one after the other in the order listed: `python pretrain.py "
                  f"--arch ARCH {' '.join(WHOLE_RUN_ORIGINAL)}`, then `python SCRIPT.py --model ORIGINAL "
                  f"{' '.join(WHOLE_RUN_FLAGS)}` with the row's flags. Sidecar s = the wall time the checkpoint "
                  "records (training plus preparation: pruning, BatchNorm re-estimation, adapters); process s = "
                  "the whole command (imports, data, saving, the final accuracies too); x FT = ratio to the mean "
                  "of the FT runs just before and after:", "",
                  "| arch | run | method | flags | sidecar s | sidecar x FT | of which preparation s | process s | "
                  "process x FT | peak MB | Dr / test acc. % |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['arch']} | {r['run']} | {r['method']} | {' '.join(script_flags(r['method']))} | "
                  f"{r['wall_s']} | {r.get('wall_vs_ft', '')} | {r['prep_s']} | {r['process_s']} | "
                  f"{r.get('process_vs_ft', '')} | {r['peak_mem_mb']:,} | {r['retain_acc']} / {r['test_acc']} |"
                  for r in runs]
    return "\n".join(lines) + "\n"


def main():
    parser = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", type=common.device_name, default="auto", help="(default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny step counts, every run in this process: checks that it runs")
    parser.add_argument("--steps", type=common.positive_int, default=None,
                        help="batches in each of a run's two epochs, the first the warm-up, the second timed "
                             "(default: 3 on CPU, 20 on CUDA, 2 quick)")
    parser.add_argument("--archs", default=ARCHS, help="comma-separated architectures (default: %(default)s)")
    parser.add_argument("--batch-sizes", default=BATCH_SIZES, help="comma-separated (default: %(default)s)")
    parser.add_argument("--json", default=None, help="write all figures as JSON here")
    parser.add_argument("--md", default=None, help="write the markdown summary here")
    parser.add_argument("--overwrite", action="store_true", help="replace existing --json/--md files")
    parser.add_argument("--parts", default=DEFAULT_PARTS,
                        help=f"comma-separated, of {', '.join(PARTS)} (default: %(default)s)")
    parser.add_argument("--whole-run-methods", default=WHOLE_RUN_METHODS,
                        help="part 4's methods (default: %(default)s)")
    parser.add_argument("--data-dir", default="./data", help="part 4's Fashion-MNIST root (default: %(default)s)")
    parser.add_argument("--compile", nargs="?", const="default", default=None, choices=common.COMPILE_MODES,
                        metavar="MODE", help="also measure every method with the scripts' --compile MODE (GPU; "
                                             "reduce-overhead: CUDA graphs; minutes of compilation each)")
    args = parser.parse_args()
    common.check_output_files((args.json, args.md), args.overwrite)
    device = common.pick_device(args.device)
    steps = args.steps or (2 if args.quick else 20 if device.type == "cuda" else 3)
    archs = args.archs.split(",")
    try:
        batch_sizes = [common.positive_int(b) for b in args.batch_sizes.split(",")]
    except argparse.ArgumentTypeError as err:
        raise common.UserError(f"--batch-sizes: {err}")
    unknown = [a for a in archs if a not in common.ARCHS or common.ARCHS[a].input_size]
    if unknown:
        raise common.UserError(f"--archs {unknown}: choose from the small-image architectures "
                               f"{', '.join(a for a, s in common.ARCHS.items() if not s.input_size)}")
    parts = args.parts.split(",")
    whole_run_methods = args.whole_run_methods.split(",")
    for names, known, flag in ((parts, PARTS, "--parts"), (whole_run_methods, METHODS, "--whole-run-methods")):
        if unknown := [n for n in names if n not in known]:
            raise common.UserError(f"{flag} {unknown}: choose from {', '.join(known)}")

    figures = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu, {torch.get_num_threads()} threads")
    variants = [None] + ([args.compile] if args.compile else [])
    if "loop" in parts:
        figures["loop_overhead"] = [loop_overhead(device, 10 if args.quick else LOOP_STEPS, mode) for mode in variants]
        for row in figures["loop_overhead"]:
            print(json.dumps(dict(part="loop_overhead", **row)), flush=True)

    with tempfile.TemporaryDirectory() as folder:  # the random originals and the runs' checkpoints
        if "cost" in parts:
            # On CPU a process per run (its own peak RSS), except in --quick, which checks that it runs (and so
            # runs the CUDA path, main() in this process).
            in_process = device.type == "cuda" or args.quick
            figures["matmul_tflops"] = round(matmul_tflops(device), 2)
            print(json.dumps(dict(part="matmul_tflops", value=figures["matmul_tflops"])), flush=True)
            figures["methods"] = with_ratios(method_costs(archs, batch_sizes, variants, device, steps, Path(folder),
                                                          in_process=in_process), figures["matmul_tflops"])

        if "end-to-end" in parts and device.type == "cuda" and not args.quick:
            figures["end_to_end_loraprune"] = end_to_end_loraprune(device, Path(folder))
            print(json.dumps(dict(part="end_to_end", **figures["end_to_end_loraprune"])), flush=True)
        elif "end-to-end" in parts:
            figures["end_to_end_skipped"] = ("skipped: " + ("--quick" if device.type == "cuda" else
                                             "needs CUDA (5 ResNet-50 epochs over 45,000 images take hours on CPU)"))
            print(f"end-to-end PruneLoRA: {figures['end_to_end_skipped']}")

        if "retrain" in parts and (device.type == "cuda" or args.quick):
            figures["retrain"] = [retrain_time(device, Path(folder), mode, quick=args.quick) for mode in variants]
            for row in figures["retrain"][1:]:  # a compiled run computes the products its eager run counted
                row["step_gflop"] = figures["retrain"][0]["step_gflop"]
            for row in figures["retrain"]:
                print(json.dumps(dict(part="retrain", **row)), flush=True)
        elif "retrain" in parts:
            figures["retrain_skipped"] = "skipped: needs CUDA (182 ResNet-18 epochs over 40,500 images)"
            print(f"Unlearn-Sparse Retrain: {figures['retrain_skipped']}")

    if "whole-runs" in parts:
        figures["whole_runs"] = [row for arch in archs
                                 for row in whole_runs(arch, whole_run_methods, device, args.data_dir)]

    summary = markdown(figures)
    print(summary)
    for path, text in ((args.json, json.dumps(figures, indent=1)), (args.md, summary)):
        if path:
            common.write_text(Path(path), text)
            print(f"wrote {path}")
    loop = figures.get("loop_overhead")
    print(f"bench on {figures['device']}: " + (f"loop/raw ratio {loop[0]['ratio']}" if loop else f"parts {args.parts}"))


if __name__ == "__main__":
    common.run_main(main)
