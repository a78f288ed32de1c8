"""A sweep's results: results.csv (one row per model and run, checked on reading), rows of several profiles
compared on their shared settings, the summary table (mean +/- std, Retrain first, the seed-noise floor) and the
plots."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from .errors import UserError
from .outputs import save_png
from .metrics import COLUMNS, HEADER_DIRECTIONS, LEGEND


KIND_NAMES = {"class": "class-wise", "random": "random-sample"}


METRICS = ["UA", "RA", "TA", "FTA", "mia_efficacy", "mia_efficacy_std", "mia_loss", "mia_loss_std", "mia_entropy",
           "mia_entropy_std", "act_dist_forget", "act_dist_retain", "js_forget", "avg_gap", "avg_gap_other",
           "wall_time_s", "peak_mem_mb", "trainable_params", "sparsity"]


CSV_FIELDS = ["profile", "arch", "forget", "seed", "label", "method", "path", "reference", *METRICS]
COUNTS = ("trainable_params",)  # read back as integers: a narrower rerun rewrites the rows it keeps as they were


def write_rows(path: Path, rows: list[dict], profile: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(dict(r, profile=profile) for r in rows)


def read_rows(path: Path) -> list[dict]:
    """The rows of an earlier run's results.csv, checked and parsed (an empty cell: a metric that does not apply)."""
    if not path.exists():
        raise UserError(f"{path} not found: run the profile first (without --report-only)")
    if not path.is_file():
        raise UserError(f"{path} is not a regular file")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != CSV_FIELDS:
                raise UserError(f"{path} does not have results.csv's columns: not this version's output")
            rows = list(reader)
        for line, row in enumerate(rows, 2):
            if None in row or None in row.values():
                raise UserError(f"{path} line {line} has a missing or extra cell: truncated or edited")
            row["seed"] = int(row["seed"])
            row.update({k: float(row[k]) if row[k] else None for k in METRICS})
            row.update({k: int(row[k]) for k in COUNTS if row[k] is not None})
    except (ValueError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"{path} is malformed ({str(err)[:80]})") from None
    if not rows:
        raise UserError(f"{path} has no rows")
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
        raise UserError(f"profiles {', '.join(profiles)} share no forget setting and seed")
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
    save_png(fig, path)


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
    headers = {k: h for k, h, _ in COLUMNS}
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
            header = ["model"] + [HEADER_DIRECTIONS.get(h, h) for h in
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
    return "\n".join(out) + "\n" + LEGEND + "\n" + \
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
    colours = dict(zip(bases, [*plt.get_cmap("tab10").colors, *plt.get_cmap("tab20").colors[1::2],  # then the
                               *plt.get_cmap("Dark2").colors]))  # light twins of tab10's: told apart from them
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
               title=f"{KIND_NAMES[kind]} forgetting")
        ax.grid(alpha=0.3)
    fig.suptitle("mean ± std over seeds; Retrain = star"
                 + (", from the OMP model = square" if any("@" in r["label"] for r in rows) else ""))
    axes[0, -1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))  # outside: points stay visible
    fig.tight_layout()
    written.append(out_dir / "ua_vs_ra.png")
    save_png(fig, written[-1])

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
    save_png(fig, written[-1])
    return written
