"""evaluate.py's metrics, pure functions of logits: accuracies' companions (membership attacks over draws
of the attacker's members, activation distance, JS divergence), Avg Gap to Retrain, and the table's columns with
their directions and legend."""
from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F


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


def true_class_confidence(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    return F.softmax(logits, 1).gather(1, labels.view(-1, 1)).flatten().numpy()


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    return F.cross_entropy(logits, labels, reduction="none").numpy()


def prediction_entropy(logits: torch.Tensor) -> np.ndarray:
    return torch.special.entr(F.softmax(logits, 1)).sum(1).numpy()


def mia_members(n_retain: int, n_non_members: int, draw: int) -> np.ndarray:
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
    from sklearn.svm import SVC
    attacker = SVC(C=SVC_C, gamma="auto", kernel="rbf").fit(*_attack_data(member_conf, non_member_conf))
    return float((attacker.predict(forget_conf.reshape(-1, 1)) == 0).mean() * 100)


def loss_mia(member_loss: np.ndarray, non_member_loss: np.ndarray, forget_loss: np.ndarray) -> float:
    """PruneLoRA paper's loss attack: % of Df that logistic regression on CE loss predicts non-member."""
    from sklearn.linear_model import LogisticRegression
    attacker = LogisticRegression().fit(*_attack_data(member_loss, non_member_loss))
    return float((attacker.predict(forget_loss.reshape(-1, 1)) == 0).mean() * 100)


def entropy_mia(member_entropy: np.ndarray, non_member_entropy: np.ndarray, forget_entropy: np.ndarray) -> float:
    """RFA/SSD entropy attack: % of Df that logistic regression on prediction entropy flags as member."""
    from sklearn.linear_model import LogisticRegression
    attacker = LogisticRegression().fit(*_attack_data(member_entropy, non_member_entropy))
    return float((attacker.predict(forget_entropy.reshape(-1, 1)) == 1).mean() * 100)


ATTACKS = {  # row key -> (per-sample feature of (logits, labels), attack)
    "mia_efficacy": (lambda logits, y: true_class_confidence(logits, y), mia_efficacy),
    "mia_loss": (lambda logits, y: per_sample_loss(logits, y), loss_mia),
    "mia_entropy": (lambda logits, y: prediction_entropy(logits), entropy_mia),
}


def membership_attacks(retain: tuple, non_member: tuple, forget: tuple, draws: int) -> dict:
    """Every attack over `draws` draws of the shadow members: mean, std and the values per draw.

    Each argument is (logits, labels). The fits run in parallel threads: libsvm's SVC fit, the slow one, is
    single-threaded and releases the GIL, and threads start at once where worker processes would each import
    this package (seconds) on every evaluate.py call."""
    from joblib import Parallel, delayed
    features = {key: [feature(*part) for part in (retain, non_member, forget)]
                for key, (feature, _) in ATTACKS.items()}
    members = [mia_members(len(retain[1]), len(non_member[1]), d) for d in range(draws)]
    jobs = [(key, d) for key in ATTACKS for d in range(draws)]
    values = Parallel(n_jobs=min(len(jobs), os.cpu_count() or 1), prefer="threads")(
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
