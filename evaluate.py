"""Compare checkpoints that forgot the same set with each other and with Retrain (REFERENCE §6).

    python evaluate.py ORIGINAL.safetensors FT.safetensors LORA.safetensors ... --retrain RETRAIN.safetensors \
        [--json rows.json] [--md table.md]

prints one markdown row per model (Retrain first, then the checkpoints in the order given) with accuracies,
membership-inference scores, distances to Retrain and cost, and a legend that states the direction of every
column. All checkpoints must share dataset, architecture, train/val split and forget set (the forget-index
hash); the original (pretrain.py output, no forget set) may stand beside them as the before-unlearning row.
Logits are computed once per model and split; every metric is derived from them.
"""
import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.svm import SVC

import common

SVC_C = 3.0  # Unlearn-Sparse MIA-efficacy attacker: SVC(C=3, gamma='auto', kernel='rbf')
SVC_MAX_PER_SIDE = 5000  # members/non-members the SVC is fit on (its fit is quadratic); 0 = all
ATTACK_SEED = 0
SPLITS = ("forget", "retain", "test_retain", "test_forget")

LEGEND = """\
Directions (the header's arrows point to more forgotten for UA, FTA and the MIAs, to better elsewhere):
- UA = 100 - Acc(Df): higher = more forgotten; the target is Retrain's value (not 100 in random-sample forgetting).
- RA = Acc(Dr); TA = test accuracy on the retained classes (class-wise) or the whole test set (random-sample):
  higher = better.
- FTA = test accuracy on the forgotten class (class-wise only; Retrain's is ~0): lower = more forgotten.
- MIA-eff: % of Df that an RBF SVC on true-class confidence, fit on Dr members vs test non-members (at most 5,000
  each, fixed seed), calls non-member (Unlearn-Sparse protocol): higher = more forgotten; the target is Retrain's.
- MIA-loss: % of Df that logistic regression on per-sample CE loss (balanced Dr vs test) calls non-member
  (PruneLoRA paper): higher = more forgotten.
- MIA-ent: % of Df that logistic regression on prediction entropy flags as MEMBER (RFA/SSD convention):
  lower = more forgotten. Unstable where Dr's and the test set's entropies hardly differ (a model that has not
  memorised its training data): the one-feature attacker then calls nearly all of Df member or nearly none, so
  the score jumps between ~0 and ~100 on small changes.
- ActDist Df/Dr: mean L2 distance of softmax outputs to Retrain's; JS Df: mean per-sample Jensen-Shannon
  divergence (nats) to Retrain's outputs on Df; Avg Gap: mean |model - Retrain| over UA, RA, TA, MIA-eff:
  lower = closer to Retrain.
- Cost: wall time of the run, peak memory (CUDA max allocated, or process peak RSS on CPU), trainable parameters,
  sparsity of the prunable layers.
Class-wise, confidence and entropy MIAs are near-saturated for every method, Retrain included (REFERENCE §6):
they cannot rank methods there."""


# ---------------------------------------------------------------------------------------------------------
# Metrics: pure functions of logits/probabilities.

def true_class_confidence(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    return F.softmax(logits, 1).gather(1, labels.view(-1, 1)).flatten().numpy()


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    return F.cross_entropy(logits, labels, reduction="none").numpy()


def prediction_entropy(logits: torch.Tensor) -> np.ndarray:
    return torch.special.entr(F.softmax(logits, 1)).sum(1).numpy()


def _balanced(members: np.ndarray, non_members: np.ndarray, cap: int, seed: int):
    """Equal numbers of members and non-members (at most cap each; 0 = no cap), drawn with a fixed seed."""
    rng = np.random.default_rng(seed)
    n = min(len(members), len(non_members))
    if cap:
        n = min(n, cap)
    members = members[rng.permutation(len(members))[:n]]
    non_members = non_members[rng.permutation(len(non_members))[:n]]
    x = np.concatenate([members, non_members]).reshape(-1, 1)
    y = np.concatenate([np.ones(n), np.zeros(n)])
    return x, y


def mia_efficacy(member_conf: np.ndarray, non_member_conf: np.ndarray, forget_conf: np.ndarray,
                 cap: int = SVC_MAX_PER_SIDE, seed: int = ATTACK_SEED) -> float:
    """Unlearn-Sparse MIA-efficacy: % of Df an RBF SVC on true-class confidence predicts non-member."""
    x, y = _balanced(member_conf, non_member_conf, cap, seed)
    attacker = SVC(C=SVC_C, gamma="auto", kernel="rbf").fit(x, y)
    return float((attacker.predict(forget_conf.reshape(-1, 1)) == 0).mean() * 100)


def loss_mia(member_loss: np.ndarray, non_member_loss: np.ndarray, forget_loss: np.ndarray,
             seed: int = ATTACK_SEED) -> float:
    """PruneLoRA paper's loss attack: % of Df that logistic regression on CE loss predicts non-member."""
    x, y = _balanced(member_loss, non_member_loss, 0, seed)
    attacker = LogisticRegression().fit(x, y)
    return float((attacker.predict(forget_loss.reshape(-1, 1)) == 0).mean() * 100)


def entropy_mia(member_entropy: np.ndarray, non_member_entropy: np.ndarray, forget_entropy: np.ndarray,
                seed: int = ATTACK_SEED) -> float:
    """RFA/SSD entropy attack: % of Df that logistic regression on prediction entropy flags as member."""
    x, y = _balanced(member_entropy, non_member_entropy, 0, seed)
    attacker = LogisticRegression().fit(x, y)
    return float((attacker.predict(forget_entropy.reshape(-1, 1)) == 1).mean() * 100)


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

def _check_compatible(metas: dict[str, dict]) -> dict:
    """All checkpoints share dataset, split and architecture; those with a forget set share it. Returns the spec."""
    first_path, first = next(iter(metas.items()))
    split_keys = ("dataset", "val_fraction", "split_seed", "train_subset")
    for path, meta in metas.items():
        if meta["arch"] != first["arch"]:
            raise common.UserError(f"{path} is a {meta['arch']} model but {first_path} a {first['arch']}: "
                                   "compare one architecture at a time")
        for key in split_keys:
            if meta["data"][key] != first["data"][key]:
                raise common.UserError(f"{path} and {first_path} differ in data {key} "
                                       f"({meta['data'][key]} vs {first['data'][key]})")
    with_forget = {p: m for p, m in metas.items() if m["data"]["forget_hash"]}
    if not with_forget:
        raise common.UserError("no checkpoint carries a forget set: pass an unlearned model or --retrain")
    ref_path, ref = next(iter(with_forget.items()))
    for path, meta in with_forget.items():
        if meta["data"]["forget_hash"] != ref["data"]["forget_hash"]:
            raise common.UserError(f"{path} forgot a different set than {ref_path} "
                                   f"(forget hash {meta['data']['forget_hash']} vs {ref['data']['forget_hash']})")
    return ref["data"]


def _metrics(logits: dict, data: common.Data) -> dict:
    y = {s: data.subset(s)[1].cpu() for s in SPLITS}
    forget_acc = common.accuracy(logits["forget"], y["forget"])
    row = dict(forget_acc=forget_acc, UA=100 - forget_acc, RA=common.accuracy(logits["retain"], y["retain"]),
               TA=common.accuracy(logits["test_retain"], y["test_retain"]),
               FTA=common.accuracy(logits["test_forget"], y["test_forget"]) if len(y["test_forget"]) else None)
    # Non-members: the test set without the forgotten class; members: the first |test| retain images.
    n_test = len(y["test_retain"])
    member = {k: v[:n_test] for k, v in (("logits", logits["retain"]), ("y", y["retain"]))}
    non_member = dict(logits=logits["test_retain"], y=y["test_retain"])
    row["mia_efficacy"] = mia_efficacy(true_class_confidence(member["logits"], member["y"]),
                                       true_class_confidence(non_member["logits"], non_member["y"]),
                                       true_class_confidence(logits["forget"], y["forget"]))
    row["mia_loss"] = loss_mia(per_sample_loss(logits["retain"], y["retain"]),
                               per_sample_loss(non_member["logits"], non_member["y"]),
                               per_sample_loss(logits["forget"], y["forget"]))
    row["mia_entropy"] = entropy_mia(prediction_entropy(logits["retain"]), prediction_entropy(non_member["logits"]),
                                     prediction_entropy(logits["forget"]))
    return row


def evaluate_checkpoints(paths: list[str], retrain: str | None = None, data_dir: str = "./data",
                         device: str = "auto") -> list[dict]:
    """Rows of metrics for Retrain (first, if given) and each checkpoint, on their shared forget set."""
    device = common.pick_device(device)
    ordered = ([retrain] if retrain else []) + [p for p in paths if p != retrain]
    metas = {str(p): common.read_sidecar(p) for p in ordered}
    spec = _check_compatible(metas)
    data = common.data_from_spec(spec, data_dir, device)
    rows, retrain_logits = [], None
    for path, meta in metas.items():
        model, _ = common.load_checkpoint(path, device)
        input_size = common.ARCHS[meta["arch"]].input_size
        logits = {s: common.predict(model, data.subset(s)[0], data.info, input_size) for s in SPLITS}
        del model
        row = dict(method=meta["method"], path=path, arch=meta["arch"], **_metrics(logits, data))
        if retrain and path == str(retrain):
            retrain_logits, retrain_row = logits, row
        if retrain_logits is not None:
            row.update(act_dist_forget=activation_distance(logits["forget"], retrain_logits["forget"]),
                       act_dist_retain=activation_distance(logits["retain"], retrain_logits["retain"]),
                       js_forget=js_divergence(logits["forget"], retrain_logits["forget"]),
                       avg_gap=avg_gap(row, retrain_row))
        else:
            row.update(act_dist_forget=None, act_dist_retain=None, js_forget=None, avg_gap=None)
        row.update({k: meta.get(k) for k in ("wall_time_s", "peak_mem_mb", "trainable_params", "total_params",
                                             "sparsity")})
        rows.append(row)
    return rows


COLUMNS = [  # (key, header, format)
    ("method", "method", "{}"), ("UA", "UA", "{:.2f}"), ("RA", "RA", "{:.2f}"), ("TA", "TA", "{:.2f}"),
    ("FTA", "FTA", "{:.2f}"), ("mia_efficacy", "MIA-eff", "{:.2f}"), ("mia_loss", "MIA-loss", "{:.2f}"),
    ("mia_entropy", "MIA-ent", "{:.2f}"), ("act_dist_forget", "ActDist Df", "{:.4f}"),
    ("act_dist_retain", "ActDist Dr", "{:.4f}"), ("js_forget", "JS Df", "{:.4f}"), ("avg_gap", "Avg Gap", "{:.2f}"),
    ("wall_time_s", "time s", "{:.1f}"), ("peak_mem_mb", "peak MB", "{:.0f}"),
    ("trainable_params", "trainable", "{:,}"), ("sparsity", "sparsity", "{:.3f}"),
]
HEADER_DIRECTIONS = {"UA": "UA ↑", "FTA": "FTA ↓", "MIA-eff": "MIA-eff ↑", "MIA-loss": "MIA-loss ↑",
                     "MIA-ent": "MIA-ent ↓", "RA": "RA ↑", "TA": "TA ↑", "Avg Gap": "Avg Gap ↓",
                     "ActDist Df": "ActDist Df ↓", "ActDist Dr": "ActDist Dr ↓", "JS Df": "JS Df ↓"}


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def markdown_table(rows: list[dict]) -> str:
    """Markdown table of evaluate_checkpoints' rows; arrows give the direction of more forgetting / better."""
    columns = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    header = [HEADER_DIRECTIONS.get(h, h) for _, h, _ in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(k), f) for k, _, f in columns) + " |" for r in rows]
    return "\n".join(lines)


def describe_forget(spec: dict) -> str:
    if spec["forget_class"] is not None:
        what = f"class {spec['forget_class']}"
    else:
        what = f"{spec['forget_random']} random images (forget seed {spec['forget_seed']})"
    return f"{spec['dataset']}, forget set: {what}, {spec['forget_count']} images, hash {spec['forget_hash']}"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    common.atomic_write(path, lambda tmp: tmp.write_text(text))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="checkpoints to compare (.safetensors with sidecars)")
    parser.add_argument("--retrain", default=None, help="the Retrain checkpoint of the same forget set")
    parser.add_argument("--json", default=None, help="write the rows as JSON here")
    parser.add_argument("--md", default=None, help="write the markdown table and legend here")
    parser.add_argument("--data-dir", default="./data", help="torchvision dataset root (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing --json/--md files")
    args = parser.parse_args()
    outputs = [Path(p) for p in (args.json, args.md) if p]
    for path in outputs:
        if path.exists() and not args.overwrite:
            raise common.UserError(f"{path} exists; pass --overwrite to replace it")

    rows = evaluate_checkpoints(args.checkpoints, args.retrain, args.data_dir, args.device)
    spec = next(meta["data"] for meta in map(common.read_sidecar, (r["path"] for r in rows))
                if meta["data"]["forget_hash"])
    report = f"{describe_forget(spec)}; {rows[0]['arch']}\n\n{markdown_table(rows)}\n\n{LEGEND}\n"
    print(report)
    if args.json:
        _write(Path(args.json), json.dumps(dict(forget=spec, rows=rows), indent=1))
    if args.md:
        _write(Path(args.md), report)
    if outputs:
        print("wrote " + ", ".join(map(str, outputs)))


if __name__ == "__main__":
    common.run_main(main)
