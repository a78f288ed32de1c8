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
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.svm import SVC

import common
import pretrain

SVC_C = 3.0  # Unlearn-Sparse MIA-efficacy attacker: SVC(C=3, gamma='auto', kernel='rbf')
MIA_DRAWS = 5  # draws of the attack's shadow members; draw 0 is the Unlearn-Sparse protocol exactly

LEGEND = """\
Directions (the header's arrows point to more forgotten for UA, FTA and the MIAs, to better elsewhere):
- UA = 100 - Acc(Df): higher = more forgotten; the target is Retrain's value (not 100 in random-sample forgetting).
- RA = Acc(Dr); TA = held-out accuracy on the retained classes (class-wise) or on all classes (random-sample):
  higher = better. Held out = the test set, or the validation split with --split val (the header says which).
- FTA = held-out accuracy on the forgotten class (class-wise only; Retrain's is ~0): lower = more forgotten.
- The three MIAs are mean ± std over --mia-draws draws of the attack's member set (|held-out| Dr images; draw 0
  = the first ones in Dr order, exactly the Unlearn-Sparse protocol; the others random); non-members = the
  held-out set without the forgotten class. All logits in float32.
- MIA-eff: % of Df that an RBF SVC (C=3, gamma='auto') on true-class confidence, fit on all members and
  non-members, calls non-member (Unlearn-Sparse): higher = more forgotten; the target is Retrain's.
- MIA-loss: % of Df that logistic regression on per-sample CE loss calls non-member (PruneLoRA paper):
  higher = more forgotten.
- MIA-ent: % of Df that logistic regression on prediction entropy flags as MEMBER (RFA/SSD convention):
  lower = more forgotten. Unstable where Dr's and the held-out set's entropies hardly differ (a model that has
  not memorised its training data): the one-feature attacker then calls nearly all of Df member or nearly none.
- ActDist Df/Dr: mean L2 distance of softmax outputs to the reference's; JS Df: mean per-sample Jensen-Shannon
  divergence (nats) to the reference's outputs on Df; Avg Gap: mean |model - reference| over UA, RA, TA,
  MIA-eff (its mean over draws): lower = closer to exact unlearning.
- ref: the reference of that row. retrain = Retrain (trained from scratch on Dr with the original's recipe);
  retrain-sparse = Retrain with the sparse model's mask held fixed (pretrain.py --mask-from), the exact
  reference of a model whose unlearning started from a sparse model. Avg Gap other ref: the gap to the other.
- retrain-floor sN: a Retrain of another seed, scored against the reference Retrain: the seed-noise floor.
  ≈ Retrain = yes when the row's Avg Gap is at most the largest floor Avg Gap: indistinguishable from Retrain.
- Cost: wall time of the run, peak memory (CUDA max allocated, or process peak RSS on CPU), trainable parameters,
  sparsity of the prunable layers.
Class-wise, confidence and entropy MIAs are near-saturated for every method, Retrain included (Unlearn-Sparse's
class-wise Retrain scores MIA-efficacy 100): they cannot rank methods there."""


# ---------------------------------------------------------------------------------------------------------
# Metrics: pure functions of logits/probabilities.

def true_class_confidence(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    return F.softmax(logits, 1).gather(1, labels.view(-1, 1)).flatten().numpy()


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    return F.cross_entropy(logits, labels, reduction="none").numpy()


def prediction_entropy(logits: torch.Tensor) -> np.ndarray:
    return torch.special.entr(F.softmax(logits, 1)).sum(1).numpy()


def shadow_members(n_retain: int, n_non_members: int, draw: int) -> np.ndarray:
    """Indices into Dr of the attack's member (shadow-train) set, as many as there are non-members.

    Draw 0 is Unlearn-Sparse's exactly (evaluation/SVC_MIA.py as main_forget.py calls it): the first
    |test| retain images in retain order. Draw d > 0 is a random subset of that size (seed d); the spread
    over draws is the attack's own noise, several points."""
    n = min(n_retain, n_non_members)
    if draw == 0:
        return np.arange(n)
    return np.sort(np.random.default_rng(draw).permutation(n_retain)[:n])


def _attack_data(members: np.ndarray, non_members: np.ndarray):
    x = np.concatenate([members, non_members]).reshape(-1, 1)
    return x, np.concatenate([np.ones(len(members)), np.zeros(len(non_members))])


def mia_efficacy(member_conf: np.ndarray, non_member_conf: np.ndarray, forget_conf: np.ndarray) -> float:
    """Unlearn-Sparse MIA-efficacy: % of Df that an RBF SVC on true-class confidence predicts non-member.

    Fit on every member and non-member given (no cap, no rebalancing), as the upstream code does."""
    attacker = SVC(C=SVC_C, gamma="auto", kernel="rbf").fit(*_attack_data(member_conf, non_member_conf))
    return float((attacker.predict(forget_conf.reshape(-1, 1)) == 0).mean() * 100)


def loss_mia(member_loss: np.ndarray, non_member_loss: np.ndarray, forget_loss: np.ndarray) -> float:
    """PruneLoRA paper's loss attack: % of Df that logistic regression on CE loss predicts non-member."""
    attacker = LogisticRegression().fit(*_attack_data(member_loss, non_member_loss))
    return float((attacker.predict(forget_loss.reshape(-1, 1)) == 0).mean() * 100)


def entropy_mia(member_entropy: np.ndarray, non_member_entropy: np.ndarray, forget_entropy: np.ndarray) -> float:
    """RFA/SSD entropy attack: % of Df that logistic regression on prediction entropy flags as member."""
    attacker = LogisticRegression().fit(*_attack_data(member_entropy, non_member_entropy))
    return float((attacker.predict(forget_entropy.reshape(-1, 1)) == 1).mean() * 100)


ATTACKS = {  # row key -> (per-sample feature of (logits, labels), attack)
    "mia_efficacy": (lambda logits, y: true_class_confidence(logits, y), mia_efficacy),
    "mia_loss": (lambda logits, y: per_sample_loss(logits, y), loss_mia),
    "mia_entropy": (lambda logits, y: prediction_entropy(logits), entropy_mia),
}


def membership_attacks(retain: tuple, non_member: tuple, forget: tuple, draws: int) -> dict:
    """Every attack over `draws` draws of the shadow members: mean, std and the values per draw.

    Each argument is (logits, labels). The draws run in parallel processes (the SVC fit is single-threaded)."""
    from joblib import Parallel, delayed
    features = {key: [feature(*part) for part in (retain, non_member, forget)]
                for key, (feature, _) in ATTACKS.items()}
    members = [shadow_members(len(retain[1]), len(non_member[1]), d) for d in range(draws)]
    jobs = [(key, d) for key in ATTACKS for d in range(draws)]
    values = Parallel(n_jobs=min(len(jobs), os.cpu_count() or 1))(
        delayed(ATTACKS[key][1])(features[key][0][members[d]], features[key][1], features[key][2])
        for key, d in jobs)
    out = {}
    for key in ATTACKS:
        per_draw = [v for (k, _), v in zip(jobs, values) if k == key]
        out.update({key: float(np.mean(per_draw)), f"{key}_std": float(np.std(per_draw)), f"{key}_draws": per_draw})
    return out


def activation_distance(logits: torch.Tensor, reference_logits: torch.Tensor) -> float:
    """Mean over samples of the L2 distance between the two models' softmax outputs."""
    return float((F.softmax(logits, 1) - F.softmax(reference_logits, 1)).norm(dim=1).mean())


def js_divergence(logits: torch.Tensor, reference_logits: torch.Tensor) -> float:
    """Mean over samples of the Jensen-Shannon divergence (nats) between the two softmax outputs."""
    p, q = F.softmax(logits.double(), 1), F.softmax(reference_logits.double(), 1)
    m = (p + q) / 2
    kl = lambda a, b: (torch.special.xlogy(a, a) - torch.special.xlogy(a, b)).sum(1)  # noqa: E731
    return float((0.5 * kl(p, m) + 0.5 * kl(q, m)).mean())


def avg_gap(row: dict, retrain_row: dict, keys=("UA", "RA", "TA", "mia_efficacy")) -> float:
    """Mean absolute difference to Retrain over UA, RA, TA and MIA-efficacy (lower = closer)."""
    return float(np.mean([abs(row[k] - retrain_row[k]) for k in keys]))


# ---------------------------------------------------------------------------------------------------------
# Checkpoints -> rows.

def check_compatible(metas: dict[str, dict]) -> dict:
    """All checkpoints share dataset, split and architecture; those with a forget set share it. Returns the spec."""
    first_path, first = next(iter(metas.items()))
    for path, meta in metas.items():
        if meta["arch"] != first["arch"]:
            raise common.UserError(f"{path} is a {meta['arch']} model but {first_path} a {first['arch']}: "
                                   "compare one architecture at a time")
        key = common.split_mismatch(meta["data"], first["data"])
        if key:
            raise common.UserError(f"{path} and {first_path} differ in data {key} "
                                   f"({meta['data'].get(key)} vs {first['data'].get(key)})")
    with_forget = {p: m for p, m in metas.items() if m["data"]["forget_hash"]}
    if not with_forget:
        raise common.UserError("no checkpoint carries a forget set: pass an unlearned model or --retrain")
    ref_path, ref = next(iter(with_forget.items()))
    for path, meta in with_forget.items():
        if meta["data"]["forget_hash"] != ref["data"]["forget_hash"]:
            raise common.UserError(f"{path} forgot a different set than {ref_path} "
                                   f"(forget hash {meta['data']['forget_hash']} vs {ref['data']['forget_hash']})")
    return ref["data"]


# The pretraining recipe: a Retrain is a reference only if it was trained exactly as the original was.
RECIPE_KEYS = ("arch", *pretrain.RECIPE_KEYS)
RECIPE_DEFAULTS = dict(label_smoothing=0.0)  # sidecars written before the key existed trained without it


def _recipe(meta: dict) -> dict:
    config = meta["config"]
    return {k: config.get(k, RECIPE_DEFAULTS.get(k)) for k in RECIPE_KEYS}


def pretrained_ancestor(path: str, meta: dict) -> tuple[str, dict] | None:
    """The pretrain.py original a checkpoint descends from (following the sidecars' parent links), if on disk."""
    seen = set()
    while meta["method"] != "original":
        parent = meta.get("parent")
        if not parent or parent in seen or not common.sidecar_path(parent).exists():
            return None
        seen.add(parent)
        path, meta = parent, common.read_sidecar(parent)
    return path, meta


def starts_sparse(meta: dict) -> bool:
    """Did this model's unlearning start from a sparse (OMP/IMP) model? Then its exact reference is sparse."""
    if meta["method"] in ("omp", "imp"):
        return True
    if "source_pruned" in meta:
        return bool(meta["source_pruned"])
    parent = meta.get("parent")
    return bool(parent and common.sidecar_path(parent).exists()
                and common.read_sidecar(parent).get("pruned_modules"))


def check_references(metas: dict[str, dict], references: dict[str, str]) -> None:
    """Every reference is a Retrain (a sparse one where asked) of the originals' recipe; refuse it otherwise."""
    originals = {}
    for path, meta in metas.items():
        found = pretrained_ancestor(path, meta)
        if found:
            originals[found[0]] = found[1]
    for path, role in references.items():
        meta = metas[path]
        if meta["method"] != "retrain":
            raise common.UserError(f"{role} {path} is not a Retrain (its sidecar says method {meta['method']!r}); "
                                   "pass pretrain.py --retrain's output")
        sparse = bool(meta["config"].get("mask_from"))
        if sparse != (role == "--sparse-retrain"):
            raise common.UserError(f"{role} {path} is a {'sparse' if sparse else 'dense'} Retrain; "
                                   + ("--sparse-retrain takes pretrain.py --retrain --mask-from's output" if
                                      role == "--sparse-retrain" else "pass it as --sparse-retrain"))
        for original_path, original in originals.items():
            if _recipe(meta) != _recipe(original):
                diff = {k: (v, _recipe(original)[k]) for k, v in _recipe(meta).items() if v != _recipe(original)[k]}
                raise common.UserError(f"{role} {path} was trained with another recipe than {original_path} "
                                       f"(retrain vs original: {diff}): it is not this original's Retrain")


def checked_models(paths: list[str], references: dict[str, str], *, data_dir: str,
                   device: torch.device) -> tuple[dict[str, dict], common.Data]:
    """The sidecars of the references (path -> its flag) then the other paths, checked to share a dataset, split,
    architecture and forget set and the references to be Retrains of the originals' recipe; and their data."""
    ordered = list(references) + [str(p) for p in paths if str(p) not in references]
    metas = {p: common.read_sidecar(p) for p in ordered}
    spec = check_compatible(metas)
    check_references(metas, references)
    return metas, common.data_from_spec(spec, data_dir, device)


def held_out(data: common.Data, split: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The held-out images TA, FTA and the attacks' non-members come from: the test set, or the validation split
    (for choosing a method's settings without looking at the test set). Split into retained and forgotten classes."""
    if split == "test":
        return dict(held_retain=data.subset("test_retain"), held_forget=data.subset("test_forget"))
    x, y = data.subset("val")
    forgotten = (y == data.forget_class) if data.forget_class is not None else torch.zeros_like(y, dtype=torch.bool)
    return dict(held_retain=(x[~forgotten], y[~forgotten]), held_forget=(x[forgotten], y[forgotten]))


def _metrics(logits: dict, labels: dict, mia_draws: int) -> dict:
    forget_acc = common.accuracy(logits["forget"], labels["forget"])
    row = dict(forget_acc=forget_acc, UA=100 - forget_acc, RA=common.accuracy(logits["retain"], labels["retain"]),
               TA=common.accuracy(logits["held_retain"], labels["held_retain"]),
               FTA=common.accuracy(logits["held_forget"], labels["held_forget"]) if len(labels["held_forget"])
               else None)
    # Members: draws of |held-out| retain images; non-members: the held-out set without the forgotten class.
    row.update(membership_attacks(*((logits[s], labels[s]) for s in ("retain", "held_retain", "forget")),
                                  draws=mia_draws))
    return row


def _distances(row: dict, logits: dict, reference_row: dict, reference_logits: dict) -> dict:
    return dict(act_dist_forget=activation_distance(logits["forget"], reference_logits["forget"]),
                act_dist_retain=activation_distance(logits["retain"], reference_logits["retain"]),
                js_forget=js_divergence(logits["forget"], reference_logits["forget"]),
                avg_gap=avg_gap(row, reference_row))


def evaluate_checkpoints(paths: list[str], retrain: str | None = None, *, sparse_retrain: str | None = None,
                         floor: tuple[str, ...] = (), data_dir: str = "./data", device: str = "auto",
                         split: str = "test", mia_draws: int = MIA_DRAWS) -> list[dict]:
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
    metas, data = checked_models(paths, references, data_dir=data_dir, device=device)
    if split == "val" and not len(data.val):
        raise common.UserError("--split val needs a validation split; these models were trained with --val-fraction 0")
    parts = dict(forget=data.subset("forget"), retain=data.subset("retain"), **held_out(data, split))
    labels = {s: y.cpu() for s, (_, y) in parts.items()}
    rows, logits_of = [], {}
    for path, meta in metas.items():
        model, _ = common.load_checkpoint(path, device)
        input_size = common.ARCHS[meta["arch"]].input_size
        logits_of[path] = {s: common.predict(model, x, data.info, input_size, fp32=True) for s, (x, _) in parts.items()}
        del model
        role = references.get(path)
        name = {"--retrain": "retrain", "--sparse-retrain": "retrain-sparse",
                "--floor": f"retrain-floor s{meta['config']['seed']}"}.get(role, meta["method"])
        row = dict(name=name, method=meta["method"], path=path, arch=meta["arch"], eval_split=split,
                   **_metrics(logits_of[path], labels, mia_draws))
        row.update({k: meta.get(k) for k in ("wall_time_s", "peak_mem_mb", "trainable_params", "total_params",
                                             "sparsity")})
        rows.append(row)
    if retrain:
        by_path = {r["path"]: r for r in rows}
        dense, sparse = str(retrain), str(sparse_retrain) if sparse_retrain else None
        for row in rows:
            use_sparse = sparse is not None and row["path"] not in references and starts_sparse(metas[row["path"]])
            reference, other = (sparse, dense) if use_sparse else (dense, sparse)
            row["reference"] = "retrain-sparse" if use_sparse else "retrain"
            row.update(_distances(row, logits_of[row["path"]], by_path[reference], logits_of[reference]))
            # The other reference matters for sparse models: a sparse start scored against Retrain too, and a model
            # pruned during unlearning against the Retrain that has its sparsity.
            sparse_model = bool(row["sparsity"]) or use_sparse
            row["avg_gap_other"] = avg_gap(row, by_path[other]) if other and sparse_model else None
        floor_gaps = [r["avg_gap"] for r in rows if references.get(r["path"]) == "--floor"]
        for row in rows:
            row["within_floor"] = (row["avg_gap"] <= max(floor_gaps)) if floor_gaps and row["path"] not in references \
                else None
    return rows


COLUMNS = [  # (key, header, format); a key with a "<key>_std" in the row prints as mean ± std over the draws
    ("name", "model", "{}"), ("UA", "UA", "{:.2f}"), ("RA", "RA", "{:.2f}"), ("TA", "TA", "{:.2f}"),
    ("FTA", "FTA", "{:.2f}"), ("mia_efficacy", "MIA-eff", "{:.2f}"), ("mia_loss", "MIA-loss", "{:.2f}"),
    ("mia_entropy", "MIA-ent", "{:.2f}"), ("act_dist_forget", "ActDist Df", "{:.4f}"),
    ("act_dist_retain", "ActDist Dr", "{:.4f}"), ("js_forget", "JS Df", "{:.4f}"), ("avg_gap", "Avg Gap", "{:.2f}"),
    ("reference", "ref", "{}"), ("avg_gap_other", "Avg Gap other ref", "{:.2f}"),
    ("within_floor", "≈ Retrain", "{}"),
    ("wall_time_s", "time s", "{:.1f}"), ("peak_mem_mb", "peak MB", "{:.0f}"),
    ("trainable_params", "trainable", "{:,}"), ("sparsity", "sparsity", "{:.3f}"),
]
HEADER_DIRECTIONS = {"UA": "UA ↑", "FTA": "FTA ↓", "MIA-eff": "MIA-eff ↑", "MIA-loss": "MIA-loss ↑",
                     "MIA-ent": "MIA-ent ↓", "RA": "RA ↑", "TA": "TA ↑", "Avg Gap": "Avg Gap ↓",
                     "Avg Gap other ref": "Avg Gap other ref ↓",
                     "ActDist Df": "ActDist Df ↓", "ActDist Dr": "ActDist Dr ↓", "JS Df": "JS Df ↓"}


def _cell(value, fmt: str, std=None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return fmt.format(value) + (f" ± {fmt.format(std)}" if std is not None else "")


def markdown_table(rows: list[dict]) -> str:
    """Markdown table of evaluate_checkpoints' rows; arrows give the direction of more forgetting / better."""
    columns = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    header = [HEADER_DIRECTIONS.get(h, h) for _, h, _ in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(k), f, r.get(f"{k}_std")) for k, _, f in columns) + " |" for r in rows]
    return "\n".join(lines)


def describe_forget(spec: dict) -> str:
    if spec["forget_class"] is not None:
        what = f"class {spec['forget_class']}"
    else:
        what = f"{spec['forget_random']} random images (forget seed {spec['forget_seed']})"
    return f"{spec['dataset']}, forget set: {what}, {spec['forget_count']} images, hash {spec['forget_hash']}"


def write_text(path: Path, text: str) -> None:
    """Write text to path atomically, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    common.atomic_write(path, lambda tmp: tmp.write_text(text))


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
    g.add_argument("--mia-draws", type=common.positive_int, default=MIA_DRAWS,
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
    report = (f"{describe_forget(spec)}; {rows[0]['arch']}; TA, FTA and MIA non-members from the {held}; "
              f"MIAs over {args.mia_draws} member draws\n\n{markdown_table(rows)}\n\n{LEGEND}\n")
    print(report)
    if args.json:
        write_text(Path(args.json), json.dumps(dict(forget=spec, split=args.split, mia_draws=args.mia_draws,
                                                    rows=rows), indent=1))
    if args.md:
        write_text(Path(args.md), report)
    if outputs:
        print("wrote " + ", ".join(map(str, outputs)))


if __name__ == "__main__":
    common.run_main(main)
