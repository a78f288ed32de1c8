"""Run a grid of methods x forget settings x seeds for a named profile, evaluate every unlearned model against
the Retrain of the same forget set and seed, and report mean +/- std with plots.

    python reproduce.py --profile cpu-fashion            # ~55 min on 2 CPU cores (RESULTS.md)
    python reproduce.py --profile paper-cifar10 --dry-run
    python reproduce.py --profile cpu-fashion --report-only   # table.md and plots again from results.csv

Each run is one of the project's scripts in a subprocess. Checkpoints go to <out-root>/ckpt/ (shared by the
profiles, so the same original or Retrain is trained once); a run whose checkpoint exists is skipped, so an
interrupted sweep resumes. Writes <out-root>/<profile>/results.csv (one row per model and run),
table.md (mean +/- std per forget kind and method, Retrain first, directions stated) and PNG plots.
"""
import argparse
import csv
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

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
    "ga-lr5e-4": ("ga.py", ["--lr", "5e-4"]),  # the learning rate the Unlearn-Sparse maintainers advised later
    "rl": ("rl.py", []),
    "l1sparse": ("l1sparse.py", []),
    "ff": ("ff.py", []),
    "iu": ("iu.py", []),
    "iu-a2": ("iu.py", ["--alpha", "2"]),  # twice the Newton step: what makes IU forget a class here (README)
    "ff-noise-only": ("ff.py", ["--no-zero-forget-head"]),  # FF's noise without Golatkar's head-row reset
    "rfa": ("rfa.py", ["--target", "nearest-class-mean"]),
    "rfa-ce": ("rfa.py", ["--target", "teacher-ce"]),
}

# A profile: dataset and architectures, pretraining flags, forget settings, seeds, methods (with per-profile
# extra flags), and OMP sparsities whose pruned originals every method also runs on.
PROFILES = {
    "cpu-fashion": dict(  # the PruneLoRA methods at the paper's defaults, on CPU
        dataset="fashion-mnist", archs=["resnet_tiny"], pretrain=["--epochs", "3"],
        forgets=[["--forget-class", "3"], ["--forget-class", "0"], ["--forget-class", "8"]], seeds=[0, 1],
        methods=["finetune", "pruneft", "lora", "loraprune"]),
    "cpu-fashion-sparse": dict(  # the Unlearn-Sparse methods, dense and at 50% OMP sparsity, CPU-sized epochs
        dataset="fashion-mnist", archs=["resnet_tiny"], pretrain=["--epochs", "3"],
        forgets=[["--forget-class", "3"], ["--forget-random", "6000"]], seeds=[0],
        methods=["ft-sparse", "ga", "ga-lr5e-4", "rl", "ff", "ff-noise-only", "iu", "iu-a2", "l1sparse"], omp=[0.5],
        omp_flags=["--rewind-epoch", "1"],
        method_flags={"ft-sparse": ["--epochs", "3"], "l1sparse": ["--epochs", "3"]}),
    "cpu-fashion-rfa": dict(  # RFA-style beside the PruneLoRA methods and GA
        dataset="fashion-mnist", archs=["resnet_tiny"], pretrain=["--epochs", "3"],
        forgets=[["--forget-class", "3"], ["--forget-random", "6000"]], seeds=[0],
        methods=["rfa", "rfa-ce", "finetune", "loraprune", "ga"]),
    "paper-cifar10": dict(  # PruneLoRA paper: CIFAR-10, all 50,000 training images, class 3 (cat); GPU
        dataset="cifar10", archs=["resnet50", "vit_small"], pretrain=["--val-fraction", "0"],
        forgets=[["--forget-class", "3"]], seeds=[0], methods=["finetune", "pruneft", "lora", "loraprune"]),
    "unlearn-sparse-cifar10": dict(  # Unlearn-Sparse: ResNet-18, class 0 and random 10%, OMP 50%/95%; GPU
        dataset="cifar10", archs=["resnet18"], pretrain=[],
        forgets=[["--forget-class", "0"], ["--forget-random", "4500"]], seeds=[0],
        methods=["ft-sparse", "ga", "rl", "ff", "iu", "l1sparse"], omp=[0.5, 0.95],
        method_flags={"ga": ["--lr", "5e-4"]}),
    "smoke": dict(  # seconds-sized, for the tests
        dataset="fashion-mnist", archs=["resnet_tiny"], pretrain=["--epochs", "1", "--train-subset", "2000"],
        forgets=[["--forget-class", "3"]], seeds=[0], methods=["finetune", "loraprune"],
        method_flags={"finetune": ["--epochs", "1"], "loraprune": ["--epochs", "1"]}),
}
KIND_NAMES = {"class": "class-wise", "random": "random-sample"}
METRICS = ["UA", "RA", "TA", "FTA", "mia_efficacy", "mia_loss", "mia_entropy", "act_dist_forget", "act_dist_retain",
           "js_forget", "avg_gap", "wall_time_s", "peak_mem_mb", "trainable_params", "sparsity"]


def forget_tag(forget: list[str]) -> str:
    return ("class" if forget[0] == "--forget-class" else "random") + forget[1]


def plan(profile: dict, methods: list[str], seeds: list[int], ckpt: Path) -> list[dict]:
    """Every run of the grid, in dependency order: {kind, out, cmd, arch, forget, seed, method, base}."""
    runs = []
    for arch in profile["archs"]:
        base = ckpt / f"{profile['dataset']}_{arch}_{'_'.join(profile['pretrain']).replace('--', '') or 'default'}"
        pretrain = ["pretrain.py", "--dataset", profile["dataset"], "--arch", arch, *profile["pretrain"]]
        for seed in seeds:
            original = base / f"original_s{seed}.safetensors"
            runs.append(dict(kind="original", out=original, cmd=[*pretrain, "--seed", seed]))
            originals = {"dense": original}
            for sparsity in profile.get("omp", []):
                omp = base / f"omp{round(sparsity * 100)}_s{seed}.safetensors"
                runs.append(dict(kind="omp", out=omp, cmd=["prune.py", "--model", original, "--sparsity", sparsity,
                                                           *profile.get("omp_flags", []), "--seed", seed]))
                originals[f"omp{round(sparsity * 100)}"] = omp
            for forget in profile["forgets"]:
                tag = forget_tag(forget)
                retrain = base / f"{tag}_retrain_s{seed}.safetensors"
                runs.append(dict(kind="retrain", out=retrain, cmd=[*pretrain, "--retrain", *forget, "--seed", seed],
                                 arch=arch, forget=tag, seed=seed))
                for variant, model in originals.items():
                    for method in methods:
                        script, flags = METHODS[method]
                        label = method if variant == "dense" else f"{method}@{variant}"
                        out = base / f"{tag}_{label.replace('@', '_')}_s{seed}.safetensors"
                        extra = profile.get("method_flags", {}).get(method, [])
                        runs.append(dict(kind="method", out=out, method=label, arch=arch, forget=tag, seed=seed,
                                         source=model, variant=variant, retrain=retrain,
                                         cmd=[script, "--model", model, *forget, *flags, *extra, "--seed", seed]))
    return runs


def execute(run: dict, data_dir: str, device: str) -> str:
    """Run one script unless its checkpoint exists; returns 'skipped' or the time taken."""
    if run["out"].exists() and common.sidecar_path(run["out"]).exists():
        return "skipped (exists)"
    script, *args = map(str, run["cmd"])
    if not Path(script).exists():
        raise common.UserError(f"method script {script} does not exist in this checkout")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, script, *args, "--data-dir", data_dir, "--device", device,
                           "--out", str(run["out"])], capture_output=True, text=True)
    if proc.returncode:
        raise common.UserError(f"{script} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return f"done in {time.perf_counter() - start:.0f}s"


def evaluate_grid(runs: list[dict], data_dir: str, device: str) -> list[dict]:
    """One evaluate_checkpoints call per (arch, forget, seed): original and methods against their Retrain."""
    import evaluate
    rows = []
    for retrain in (r for r in runs if r["kind"] == "retrain"):
        group = [r for r in runs if r["kind"] == "method" and r["retrain"] == retrain["out"]]
        sources = {r["source"]: "original" if r["variant"] == "dense" else f"original@{r['variant']}" for r in group}
        paths = [str(p) for p in sources] + [str(r["out"]) for r in group]
        labels = ["retrain", *sources.values()] + [r["method"] for r in group]
        for label, row in zip(labels, evaluate.evaluate_checkpoints(paths, str(retrain["out"]), data_dir, device)):
            rows.append(dict(row, arch=retrain["arch"], forget=retrain["forget"], seed=retrain["seed"], label=label))
    return rows


CSV_FIELDS = ["profile", "arch", "forget", "seed", "label", "method", "path", *METRICS]


def write_rows(path: Path, rows: list[dict], profile: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(dict(r, profile=profile) for r in rows)


def read_rows(path: Path) -> list[dict]:
    """The rows of an earlier run's results.csv, numbers parsed (an empty cell is a metric that does not apply)."""
    if not path.exists():
        raise common.UserError(f"{path} not found: run the profile first (without --report-only)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["seed"] = int(row["seed"])
        row.update({k: float(row[k]) if row[k] else None for k in METRICS})
    return rows


def mean_std(values: list) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "-"
    mean, std = float(np.mean(values)), float(np.std(values))
    digits = 4 if abs(mean) < 1 and mean != 0 else (0 if abs(mean) >= 1000 else 2)
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if len(values) > 1 else "")


def summary_table(rows: list[dict]) -> str:
    """Mean +/- std per (arch, forget kind, method) over forget settings and seeds."""
    import evaluate
    columns = [c for c in evaluate.COLUMNS if c[0] in METRICS]
    out = []
    for arch in dict.fromkeys(r["arch"] for r in rows):
        for kind in ("class", "random"):
            group = [r for r in rows if r["arch"] == arch and r["forget"].startswith(kind)]
            if not group:
                continue
            settings = sorted({r["forget"] for r in group})
            seeds = sorted({r["seed"] for r in group})
            out.append(f"### {arch}, {KIND_NAMES[kind]} forgetting: {', '.join(settings)} x seeds {seeds} "
                       f"({len(settings) * len(seeds)} runs per row)\n")
            header = ["method"] + [evaluate.HEADER_DIRECTIONS.get(h, h) for _, h, _ in columns]
            out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            for label in dict.fromkeys(r["label"] for r in group):
                cells = [mean_std([r[k] for r in group if r["label"] == label]) for k, _, _ in columns]
                out.append(f"| {label} | " + " | ".join(cells) + " |")
            out.append("")
    return "\n".join(out) + "\n" + evaluate.LEGEND + "\n"


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
    common.atomic_write(written[-1], lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)

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
    common.atomic_write(written[-1], lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return written


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", required=True, help=f"one of {', '.join(PROFILES)}")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the profile's methods")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the profile's)")
    parser.add_argument("--out-root", default="results", help="(default: %(default)s)")
    parser.add_argument("--data-dir", default="./data", help="(default: %(default)s)")
    parser.add_argument("--device", default="auto", help="(default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild table.md and the plots from an earlier run's results.csv; runs nothing")
    args = parser.parse_args()
    if args.profile not in PROFILES:
        raise common.UserError(f"unknown profile {args.profile!r}; choose one of {', '.join(PROFILES)}")
    profile = PROFILES[args.profile]
    methods = args.methods.split(",") if args.methods else profile["methods"]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise common.UserError(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else profile["seeds"]
    root = Path(args.out_root)
    runs = plan(profile, methods, seeds, root / "ckpt")
    print(f"{args.profile}: {len(runs)} runs, {methods} x {[forget_tag(f) for f in profile['forgets']]} x seeds {seeds}")
    if args.dry_run:
        for run in runs:
            print("python " + " ".join(map(str, run["cmd"])) + f" --out {run['out']}")
        return

    out_dir = root / args.profile
    start = time.perf_counter()
    if args.report_only:
        rows = read_rows(out_dir / "results.csv")
    else:
        for i, run in enumerate(runs, 1):
            run["out"].parent.mkdir(parents=True, exist_ok=True)
            status = execute(run, args.data_dir, args.device)
            print(f"[{i}/{len(runs)}] {run['out'].name}: {status} ({time.perf_counter() - start:.0f}s total)",
                  flush=True)
        rows = evaluate_grid(runs, args.data_dir, args.device)
        out_dir.mkdir(parents=True, exist_ok=True)
        common.atomic_write(out_dir / "results.csv", lambda tmp: write_rows(tmp, rows, args.profile))
    common.atomic_write(out_dir / "table.md", lambda tmp: tmp.write_text(summary_table(rows)))
    written = plots(rows, out_dir)
    print(summary_table(rows))
    done = "report rebuilt from results.csv" if args.report_only else f"{len(runs)} runs"
    print(f"{args.profile}: {done}, {time.perf_counter() - start:.0f}s -> "
          + ", ".join(str(p) for p in [out_dir / "results.csv", out_dir / "table.md", *written]))


if __name__ == "__main__":
    common.run_main(main)
