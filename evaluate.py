"""Compare checkpoints that forgot the same set with each other and with Retrain.

    python evaluate.py ORIGINAL.safetensors FT.safetensors LORA.safetensors ... --retrain RETRAIN.safetensors \
        [--floor RETRAIN_SEED1.safetensors] [--sparse-retrain RETRAIN_MASKED.safetensors] [--split val] \
        [--json rows.json] [--md table.md]

prints one markdown row per model (the references first: Retrain, the other-seed Retrains of the floor, the
sparse Retrain; then the checkpoints in the order given) with accuracies, membership-inference scores (mean ±
std over draws of the attack's member set), distances to the row's reference and cost, and a legend that
states the direction of every column. All checkpoints must share dataset, architecture, train/val split and
forget set (the forget-index hash); the original (pretrain.py output, no forget set) may stand beside them as
the before-unlearning row. A reference must be a Retrain of the originals' recipe. Logits are computed once
per model and split, in float32; every metric is derived from them. --split val reports on the validation
split instead of the test set: choose a method's settings there, and read the test set only for the report.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import common


def _metrics(logits: dict, labels: dict, mia_draws: int) -> dict:
    forget_acc = common.accuracy(logits["forget"], labels["forget"])
    row = dict(forget_acc=forget_acc, UA=100 - forget_acc, RA=common.accuracy(logits["retain"], labels["retain"]),
               TA=common.accuracy(logits["held_retain"], labels["held_retain"]),
               FTA=common.accuracy(logits["held_forget"], labels["held_forget"]) if len(labels["held_forget"])
               else None)
    # Members: draws of |held-out| retain images; non-members: the held-out set without the forgotten class.
    row.update(common.membership_attacks(*((logits[s], labels[s]) for s in ("retain", "held_retain", "forget")),
                                  draws=mia_draws))
    return row


def _distances(row: dict, logits: dict, reference_row: dict, reference_logits: dict) -> dict:
    return dict(act_dist_forget=common.activation_distance(logits["forget"], reference_logits["forget"]),
                act_dist_retain=common.activation_distance(logits["retain"], reference_logits["retain"]),
                js_forget=common.js_divergence(logits["forget"], reference_logits["forget"]),
                avg_gap=common.avg_gap(row, reference_row))


def evaluate_checkpoints(paths: list[str], retrain: str | None = None, *, sparse_retrain: str | None = None,
                         floor: tuple[str, ...] = (), data_dir: str = "./data", device: str = "auto",
                         split: str = "test", mia_draws: int = common.MIA_DRAWS) -> list[dict]:
    """Rows of metrics for the references (Retrain, its other-seed floor, the sparse Retrain) and each checkpoint.

    Each row's Avg Gap, activation distances and JS are to its reference: the sparse Retrain for a model whose
    unlearning started from a sparse model (when given), else Retrain. avg_gap_other is the gap to the other one."""
    if split not in ("test", "val"):
        raise common.UserError(f"--split must be test or val, got {split!r}")
    if mia_draws < 1:
        raise common.UserError(f"--mia-draws must be >= 1, got {mia_draws}")
    device = common.pick_device(device)
    roles = ([(retrain, "--retrain")] if retrain else []) + [(p, "--floor") for p in floor] \
        + ([(sparse_retrain, "--sparse-retrain")] if sparse_retrain else [])
    references = {str(p): role for p, role in roles}
    if (floor or sparse_retrain) and not retrain:
        raise common.UserError("--floor and --sparse-retrain need --retrain")
    metas, data = common.checked_models(paths, references, data_dir=data_dir, device=device)
    if split == "val" and not len(data.val):
        raise common.UserError("--split val needs a validation split; these models were trained with --val-fraction 0")
    parts = dict(forget=data.subset("forget"), retain=data.subset("retain"), **common.held_out(data, split))
    labels = {s: y.cpu() for s, (_, y) in parts.items()}
    rows, logits_of = [], {}
    for i, (path, meta) in enumerate(metas.items()):
        start = time.perf_counter()
        model, _ = common.load_checkpoint(path, device)
        input_size = common.ARCHS[meta["arch"]].input_size
        logits_of[path] = {s: common.predict(model, x, data.info, input_size, fp32=True) for s, (x, _) in parts.items()}
        del model
        name = common.reference_name(references.get(path), meta) or meta["method"]
        row = dict(name=name, method=meta["method"], path=path, arch=meta["arch"], eval_split=split,
                   **_metrics(logits_of[path], labels, mia_draws))
        row.update({k: meta.get(k) for k in ("wall_time_s", "peak_mem_mb", "trainable_params", "total_params",
                                             "sparsity")})
        rows.append(row)
        # Progress on stderr (stdout is the report): scoring a model takes seconds to minutes on a CPU.
        print(f"[{i + 1}/{len(metas)}] {name}: scored in {time.perf_counter() - start:.1f}s ({path})",
              file=sys.stderr, flush=True)
    if retrain:
        by_path = {r["path"]: r for r in rows}
        dense, sparse = str(retrain), str(sparse_retrain) if sparse_retrain else None
        for row in rows:
            use_sparse = (sparse is not None and row["path"] not in references
                          and common.starts_sparse(metas[row["path"]]))
            reference, other = (sparse, dense) if use_sparse else (dense, sparse)
            row["reference"] = "retrain-sparse" if use_sparse else "retrain"
            row.update(_distances(row, logits_of[row["path"]], by_path[reference], logits_of[reference]))
            # The other reference matters for sparse models: a sparse start scored against Retrain too, and a model
            # pruned during unlearning against the Retrain that has its sparsity.
            sparse_model = bool(row["sparsity"]) or use_sparse
            row["avg_gap_other"] = common.avg_gap(row, by_path[other]) if other and sparse_model else None
        floor_gaps = [r["avg_gap"] for r in rows if references.get(r["path"]) == "--floor"]
        for row in rows:
            row["within_floor"] = (row["avg_gap"] <= max(floor_gaps)) if floor_gaps and row["path"] not in references \
                else None
    return rows


def main():
    parser = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="checkpoints to compare (.safetensors with sidecars)")
    g = parser.add_argument_group("references")
    g.add_argument("--retrain", default=None, help="the Retrain checkpoint of the same forget set and recipe")
    g.add_argument("--floor", nargs="+", default=[], metavar="RETRAIN",
                   help="Retrains of other seeds: rows that measure how far two Retrains are apart")
    g.add_argument("--sparse-retrain", default=None,
                   help="Retrain with the sparse model's mask (pretrain.py --retrain --mask-from): the reference "
                        "of models whose unlearning started from that sparse model")
    g = parser.add_argument_group("protocol")
    g.add_argument("--split", default="test", choices=["test", "val"],
                   help="held-out data for TA, FTA and the attacks' non-members; choose settings on val "
                        "(default: %(default)s)")
    g.add_argument("--mia-draws", type=common.positive_int, default=common.MIA_DRAWS,
                   help="draws of the attacks' member set; draw 0 is the Unlearn-Sparse protocol "
                        "(default: %(default)s)")
    g = parser.add_argument_group("output")
    g.add_argument("--json", default=None, help="write the rows as JSON here")
    g.add_argument("--md", default=None, help="write the markdown table and legend here")
    g.add_argument("--overwrite", action="store_true", help="replace existing --json/--md files")
    parser.add_argument("--data-dir", default="./data", help="torchvision dataset root (default: %(default)s)")
    parser.add_argument("--device", type=common.device_name, default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    args = parser.parse_args()
    outputs = common.check_output_files((args.json, args.md), args.overwrite)

    rows = evaluate_checkpoints(args.checkpoints, args.retrain, sparse_retrain=args.sparse_retrain,
                                floor=tuple(args.floor), data_dir=args.data_dir, device=args.device,
                                split=args.split, mia_draws=args.mia_draws)
    spec = next(meta["data"] for meta in map(common.read_sidecar, (r["path"] for r in rows))
                if meta["data"]["forget_hash"])
    held = "test set" if args.split == "test" else "VALIDATION split (for choosing settings)"
    report = (f"{common.describe_forget(spec)}; {rows[0]['arch']}; TA, FTA and MIA non-members from the {held}; "
              f"MIAs over {args.mia_draws} member draws\n\n{common.markdown_table(rows)}\n\n{common.LEGEND}\n")
    print(report)
    if args.json:
        common.write_text(Path(args.json), json.dumps(dict(forget=spec, split=args.split, mia_draws=args.mia_draws,
                                                    rows=rows), indent=1))
    if args.md:
        common.write_text(Path(args.md), report)
    if outputs:
        print("wrote " + ", ".join(map(str, outputs)))


if __name__ == "__main__":
    common.run_main(main)
