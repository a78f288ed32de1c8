"""Per-example membership on a shadow population (audit.py lira, rmia): U-LiRA (Hayes et al. 2024, Sec. 4), the
NeurIPS 2023 challenge's forget quality (Triantafillou et al. 2024, Sec. 3; google-deepmind/unlearning_evaluation,
metric.py) and offline RMIA (Zarifzadeh et al. 2024; privacytrustlab/ml_privacy_meter, attacks.py). Shadow k of
N trains an original on its half of the training split (each image in exactly N/2 halves), forgets the images of
one fixed target pool that its half holds with each method, and is retrained without them."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import UserError
from .system import pick_device
from .data import Data, data_from_spec
from .models import ARCHS
from .training import accuracy, predict
from .outputs import save_png, write_text
from .checkpoints import load_checkpoint, read_sidecar
from .executors import Executor
from .rungraph import run_graph


# U-LiRA: the shadow population. Hayes et al. use 64-128 models; N = 16 tiny ones with the 16 audited methods take
# about an hour on 2 CPU cores (8 shadows: 27 minutes, RESULTS.md).
SHADOWS = 16


POOL = 500  # target images; each shadow forgets the ~POOL/2 of them its half holds


BOOTSTRAP = 200  # resamples of the target images for the sampling error


# The NeurIPS 2023 challenge's forget quality (google-deepmind/unlearning_evaluation, metric.py)
DELTA = 1e-5


EPSILON_CAP = 50.0


THRESHOLDS_PER_UNIT = 100


# Offline RMIA (privacytrustlab/ml_privacy_meter, attacks.py): gamma 1; a is tuned per target on a paired model
RMIA_GAMMA = 1.0


RMIA_A_GRID = tuple(round(0.1 * i, 1) for i in range(11))


def logit_confidence(logits: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """log p_y - log sum_{k != y} p_k, computed from the logits (the softmax's normaliser cancels), float64."""
    logits = logits.double()
    correct = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return (correct - torch.logsumexp(others, dim=1)).numpy()


def shadow_runs(pretrain: list[str], methods: dict[str, list[str]], *, shadows: int, pool: int, pool_seed: int,
                ckpt_dir: Path) -> tuple[list[dict], dict[str, list[Path]]]:
    """The population's training runs in dependency order ({kind, out, cmd}, as run_graph takes them), and
    per model name ("original", "retrain", each method) its N checkpoints. Shadow k trains with seed k."""
    if shadows < 6 or shadows % 2:
        raise UserError(f"--shadows {shadows}: need an even number, at least 6 (each world's Gaussian "
                               "needs two models after leaving one out)")
    forget = ["--forget-random", pool, "--forget-seed", pool_seed]
    runs, models = [], {name: [] for name in ("original", "retrain", *methods)}
    for k in range(shadows):
        base = ["pretrain.py", *pretrain, "--shadow", f"{k}/{shadows}"]
        tag = f"shadow{k}of{shadows}"
        original = ckpt_dir / f"{tag}_original.safetensors"
        runs.append(dict(kind="original", out=original, cmd=[*base, "--seed", k]))
        runs.append(dict(kind="retrain", out=ckpt_dir / f"{tag}_retrain.safetensors",
                         cmd=[*base, "--retrain", *forget, "--seed", k]))
        for name, (script, *flags) in methods.items():
            runs.append(dict(kind="method", out=ckpt_dir / f"{tag}_{name}.safetensors",
                             cmd=[script, "--model", original, *forget, *flags, "--seed", k]))
        for name, run in zip(models, runs[-len(models):]):
            models[name].append(run["out"])
    return runs, models


def lira_scores(confidence: np.ndarray, members: np.ndarray) -> np.ndarray:
    """U-LiRA's per-example likelihood ratio, leave one shadow out.

    confidence [N shadows, n images]: one model per shadow (a method's, Retrain's or the original's);
    members [N, n]: the shadow's half held the image (so the method forgot it; elsewhere it never saw it). Each
    (shadow, image) is scored with Gaussians fit on the other shadows: log N(c; in) - log N(c; out), higher =
    "was learned". Means per image, each world's variance pooled over images: LiRA's fixed-variance variant
    (Carlini et al. 2022), which its authors found stronger with few shadows; per-image variances from 7 models
    bias the test towards the world with more models."""
    scores = np.empty_like(confidence)
    for k in range(len(confidence)):
        rest_c, rest_m = np.delete(confidence, k, 0), np.delete(members, k, 0)
        log_densities = []
        for world in (rest_m, ~rest_m):
            values = np.where(world, rest_c, np.nan)
            mean = np.nanmean(values, 0)
            std = np.sqrt(np.nanmean((values - mean) ** 2))
            log_densities.append(-0.5 * ((confidence[k] - mean) / std) ** 2 - np.log(std))
        scores[k] = log_densities[0] - log_densities[1]
    return scores


def _rmia_one(k: int, probability: np.ndarray, members: np.ndarray, population: np.ndarray, a: float) -> np.ndarray:
    """Offline RMIA's scores of shadow k's model on every target image; references: all other shadows but k's pair."""
    pair = k ^ 1
    refs = [j for j in range(len(probability)) if j not in (k, pair)]
    # Pr(x) from the references that never saw x (offline), scaled towards what in-models would add (a)
    mean_out_x = np.nanmean(np.where(members[refs], np.nan, probability[refs]), 0)
    ratio_x = probability[k] / ((1 + a) / 2 * mean_out_x + (1 - a) / 2)
    ratio_z = population[k] / ((1 + a) / 2 * population[refs].mean(0) + (1 - a) / 2)  # no model saw any z
    # the share of population images z with ratio_x / ratio_z > gamma
    return np.searchsorted(np.sort(ratio_z * RMIA_GAMMA), ratio_x, side="left") / len(ratio_z)


def rmia_scores(probability: np.ndarray, members: np.ndarray, population: np.ndarray) -> tuple[np.ndarray, list]:
    """Offline RMIA per (shadow, target image), higher = "was learned", and the a chosen for each shadow.

    probability [N, n]: each shadow's model's softmax probability of the true label on the target images;
    members [N, n] as for lira_scores; population [N, m]: the same on images no shadow trained on (the test split),
    the z of the test. Score = the share of z with [Pr(x|model) / Pr(x)] / [Pr(z|model) / Pr(z)] > gamma, Pr(.)
    averaged over the reference models: all shadows but the target and its pair (k xor 1); for x only those that
    never saw it, Pr(x) = (1 + a)/2 Pr_out(x) + (1 - a)/2. As upstream (tune_offline_a), a is the value of
    0, 0.1, .., 1 with the highest AUC on the paired shadow (attacked with the same references less itself and
    the target); upstream averages one reference model by default, we average all of them."""
    from sklearn.metrics import roc_auc_score
    scores, chosen = np.empty_like(probability), []
    for k in range(len(probability)):
        pair = k ^ 1
        aucs = [roc_auc_score(members[pair], _rmia_one(pair, probability, members, population, a))
                for a in RMIA_A_GRID]
        a = RMIA_A_GRID[int(np.argmax(aucs))]
        chosen.append(a)
        scores[k] = _rmia_one(k, probability, members, population, a)
    return scores, chosen


def roc_summary(scores: np.ndarray, labels: np.ndarray) -> dict:
    """AUC and the TPR at 1% and 0.1% FPR (the largest TPR whose FPR does not exceed it)."""
    from sklearn.metrics import roc_auc_score, roc_curve
    fpr, tpr, _ = roc_curve(labels, scores)
    return dict(auc=float(roc_auc_score(labels, scores)), tpr_at_1pct=float(tpr[fpr <= 0.01].max()),
                tpr_at_01pct=float(tpr[fpr <= 0.001].max()))


def lira_attack(scores: np.ndarray, members: np.ndarray, *, bootstrap: int, seed: int) -> dict:
    """roc_summary over every (shadow, image), and its standard deviation over resamples of the images."""
    summary = roc_summary(scores.ravel(), members.ravel())
    rng = np.random.default_rng(seed)
    draws = [roc_summary(scores[:, pick].ravel(), members[:, pick].ravel())
             for pick in (rng.integers(0, scores.shape[1], scores.shape[1]) for _ in range(bootstrap))]
    summary.update({f"{key}_std": float(np.std([d[key] for d in draws])) for key in list(summary)})
    return summary


def _rates(pos: np.ndarray, neg: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TPR and FPR of the rule "positive if lower <= c <= upper", one value per threshold pair."""
    def share_inside(values):
        values = np.sort(values)
        return (np.searchsorted(values, upper, "right") - np.searchsorted(values, lower, "left")) / len(values)
    return share_inside(pos), share_inside(neg)


def example_epsilon(unlearned: np.ndarray, retrained: np.ndarray, delta: float = DELTA) -> float:
    """The challenge's per-example epsilon from one image's confidences under the unlearned and the retrained
    models: the most any threshold rule (one threshold, or an interval around the peakier group) separates them,
    eps = max(log(1 - delta - FPR) - log FNR, log(1 - delta - FNR) - log FPR), clipped to [0, EPSILON_CAP]; as
    metric.py, including its edge cases (a group 100x peakier than the other scores the cap; a rule with FPR or
    FNR 0 but not both is dropped as under-sampled; perfect separation scores the cap)."""
    pos, neg = (retrained, unlearned) if np.median(retrained) > np.median(unlearned) else (unlearned, retrained)
    spread_pos, spread_neg = np.ptp(pos), np.ptp(neg)
    smallest, largest = sorted((spread_pos, spread_neg))
    if largest == 0:
        return 0.0 if pos[0] == neg[0] else EPSILON_CAP
    if smallest / largest < 0.01:
        return EPSILON_CAP
    low, high = min(pos.min(), neg.min()), max(pos.max(), neg.max())
    single = np.linspace(low, high, math.ceil((high - low) * THRESHOLDS_PER_UNIT))
    tpr_s, fpr_s = _rates(pos, neg, single, np.full_like(single, np.inf))
    peaky = pos if spread_pos < spread_neg else neg  # the double rule: an interval of about its width
    other = neg if spread_pos < spread_neg else pos
    buffer = 2.0
    right = np.linspace(peaky.min() + smallest - buffer, peaky.max() + buffer,
                        math.ceil((peaky.max() - peaky.min() - smallest + 2 * buffer) * THRESHOLDS_PER_UNIT))
    offsets = np.linspace(-smallest - buffer, -smallest + buffer, math.ceil(2 * buffer * THRESHOLDS_PER_UNIT))
    tpr_d, fpr_d = _rates(peaky, other, (right[:, None] + offsets).ravel(), np.repeat(right, len(offsets)))
    tpr, fpr = np.concatenate([tpr_s, tpr_d]), np.concatenate([fpr_s, fpr_d])
    fnr = 1 - tpr
    if np.any((fpr == 0) & (fnr == 0)):
        return EPSILON_CAP
    keep = (fpr > 0) & (fnr > 0)
    if not keep.any():
        return 0.0
    fpr, fnr = fpr[keep], fnr[keep]
    with np.errstate(invalid="ignore", divide="ignore"):
        eps = np.fmax(np.log(1 - delta - fpr) - np.log(fnr), np.log(1 - delta - fnr) - np.log(fpr))
    return float(np.clip(np.nanmax(eps), 0, EPSILON_CAP))


def challenge_points(epsilons: np.ndarray, n_models: int) -> np.ndarray:
    """The challenge's points per example (forget quality is their mean): 1 for eps in [0, 0.5), halving per
    0.5-wide bucket up to ceil(log(n_models - 1)), 0 beyond; with few models the buckets are few and coarse."""
    max_epsilon = math.ceil(math.log(n_models - 1))
    buckets = np.floor(np.asarray(epsilons) / 0.5)
    return np.where(buckets < 2 * max_epsilon, 0.5 ** buckets, 0.0)


def model_outputs(path: Path, sets: dict[str, tuple[torch.Tensor, torch.Tensor]], info, device) -> dict:
    """{set name: (confidence, accuracy)}: one checkpoint's logit-scaled confidence on each image of each named
    (images, labels) set [n], and its accuracy there, both from float32 logits."""
    model, meta = load_checkpoint(path, device)
    input_size = ARCHS[meta["arch"]].input_size
    outputs = {}
    for name, (x, y) in sets.items():
        logits = predict(model, x, info, input_size, fp32=True)
        outputs[name] = (logit_confidence(logits, y.cpu()), accuracy(logits, y))
    return outputs


def score_populations(populations: dict[str, list[Path]], score: Callable[[list[Path]], object]) -> dict:
    """{name: score(its checkpoints)}, with a progress line per population on stderr (minutes each on a CPU)."""
    scores = {}
    for i, (name, paths) in enumerate(populations.items()):
        start = time.perf_counter()
        scores[name] = score(paths)
        print(f"[{i + 1}/{len(populations)}] {name}: {len(paths)} models scored in {time.perf_counter() - start:.0f}s",
              file=sys.stderr, flush=True)
    return scores


def shadow_outputs(paths: list[Path], shadow_data: list[Data], pool: tuple, test: tuple,
                   device) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Per shadow model, its logit-scaled confidence on each pool image [N, n] and on each test image [N, m]; and
    (RA, TA) averaged over them: accuracy on each shadow's own retain set and on the test set."""
    outputs = [model_outputs(path, dict(pool=pool, retain=data.subset("retain"), test=test), data.info, device)
               for path, data in zip(paths, shadow_data)]
    return (np.stack([o["pool"][0] for o in outputs]), np.stack([o["test"][0] for o in outputs]),
            (float(np.mean([o["retain"][1] for o in outputs])), float(np.mean([o["test"][1] for o in outputs]))))


def probability_of_label(confidence: np.ndarray) -> np.ndarray:
    """The softmax probability of the true label, from the logit-scaled confidence log(p / (1 - p))."""
    return np.exp(-np.logaddexp(0, -confidence))  # 1 / (1 + e^-c), without overflow for very negative c


def lira(pretrain: list[str], methods: dict[str, list[str]], *, shadows: int = SHADOWS, pool: int = POOL,
         pool_seed: int = 0, ckpt_dir: str | Path, data_dir: str = "./data", device: str = "auto",
         bootstrap: int = BOOTSTRAP, seed: int = 0, executor=None) -> dict:
    """Train (or resume) the shadow population (on executor, an Executor; default serial) and score every
    method, the original (ceiling) and Retrain against itself (floor) with U-LiRA, the challenge's forget quality
    and offline RMIA. Returns {rows, roc, rmia_roc, ...} (roc, rmia_roc: per model the attack's ROC curve's
    points, for the plot)."""
    from sklearn.metrics import roc_curve
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    runs, models = shadow_runs(pretrain, methods, shadows=shadows, pool=pool, pool_seed=pool_seed,
                               ckpt_dir=ckpt_dir)
    run_graph(runs, executor or Executor(), data_dir=data_dir, device=device, log_dir=ckpt_dir / "logs")
    device = pick_device(device)
    # The pool as the un-halved split draws it; a shadow's members are the pool images its own forget set holds.
    spec = dict(read_sidecar(models["retrain"][0])["data"], shadow=None)
    pool_data = data_from_spec(dict(spec, forget_hash=None), data_dir, device)
    shadow_data = [data_from_spec(read_sidecar(path)["data"], data_dir, device)
                   for path in models["retrain"]]
    members = np.stack([torch.isin(pool_data.forget, data.forget).cpu().numpy() for data in shadow_data])
    outputs = score_populations(models, lambda paths: shadow_outputs(
        paths, shadow_data, pool_data.subset("forget"), pool_data.subset("test"), device))
    confidence = {name: o[0] for name, o in outputs.items()}  # [models, pool images]
    population = {name: o[1] for name, o in outputs.items()}  # [models, test images]: RMIA's reference z
    utility = {name: o[2] for name, o in outputs.items()}  # (RA, TA)
    rows, roc, rmia_roc = [], {}, {}
    n_models = shadows // 2
    for name in ("retrain", "original", *methods):
        scores = lira_scores(confidence[name], members)
        row = dict(model=name, **lira_attack(scores, members, bootstrap=bootstrap, seed=seed))
        # The challenge's pair per image: the method's models that forgot it, the Retrains that never saw it.
        epsilons = np.array([example_epsilon(confidence[name][members[:, i], i],
                                             confidence["retrain"][~members[:, i], i])
                             for i in range(members.shape[1])])
        points = challenge_points(epsilons, n_models)
        quality = float(points.mean())
        (ra_u, ta_u), (ra_r, ta_r) = utility[name], utility["retrain"]
        row.update(forget_quality=quality, forget_quality_std=float(points.std() / math.sqrt(len(points))),
                   challenge_score=quality * (ra_u / ra_r) * (ta_u / ta_r),
                   median_epsilon=float(np.median(epsilons)), RA=ra_u, TA=ta_u)
        rmia, chosen_a = rmia_scores(probability_of_label(confidence[name]), members,
                                     probability_of_label(population[name]))
        row.update({f"rmia_{key}": value for key, value in
                    lira_attack(rmia, members, bootstrap=bootstrap, seed=seed).items()}, rmia_a=chosen_a)
        rows.append(row)
        fpr, tpr, _ = roc_curve(members.ravel(), scores.ravel())
        roc[name] = dict(fpr=fpr.tolist(), tpr=tpr.tolist())
        fpr, tpr, _ = roc_curve(members.ravel(), rmia.ravel())
        rmia_roc[name] = dict(fpr=fpr.tolist(), tpr=tpr.tolist())
    return dict(rows=rows, roc=roc, rmia_roc=rmia_roc, shadows=shadows, pool=pool, models_per_world=n_models,
                population=population["retrain"].shape[1])


def _pm(row: dict, key: str, scale: float = 1.0, digits: int = 3) -> str:
    return f"{row[key] * scale:.{digits}f} ± {row[key + '_std'] * scale:.{digits}f}"


def _population(result: dict) -> str:
    k = result["models_per_world"]
    return (f"{result['shadows']} shadow models, {result['pool']} target images, each learned (then unlearned) by "
            f"{k} shadows and never seen by {k}")


def lira_markdown(result: dict) -> str:
    """U-LiRA's and the challenge's table: mean (± sd over resamples of the target images); directions stated."""
    lines = ["| model | U-LiRA AUC (0.5 = as Retrain) ↓ | TPR @ 1% FPR (%) ↓ | TPR @ 0.1% FPR (%) ↓ | "
             "challenge forget quality ↑ | challenge score ↑ | median eps ↓ | RA | TA |", "|" + "---|" * 9]
    lines += [f"| {r['model']} | {_pm(r, 'auc')} | {_pm(r, 'tpr_at_1pct', 100, 2)} | "
              f"{_pm(r, 'tpr_at_01pct', 100, 2)} | {_pm(r, 'forget_quality')} | {r['challenge_score']:.3f} | "
              f"{r['median_epsilon']:.2f} | {r['RA']:.2f} | {r['TA']:.2f} |" for r in result["rows"]]
    k = result["models_per_world"]
    legend = (f"{_population(result)}. U-LiRA: can a method's model tell an image it forgot from one it "
              "never saw? ↓ = less, down to 0.5: below it the forgotten images read as less member-like than "
              "never-seen ones (over-forgetting), as detectable as 1 - AUC. retrain (exact unlearning) is the floor "
              "this many shadows allow (0.5 up to sampling error), original (no unlearning) the ceiling. "
              "± = sd over bootstrap resamples of the target "
              f"images. Challenge forget quality: per forgotten image, {k} of the method's models against {k} "
              f"Retrains that never saw it (the challenge used 512 each), eps in 0.5-wide buckets up to "
              f"ceil(log({k} - 1)), so it is coarse and Retrain against Retrain scores below 1; score = quality x "
              "RA/RA_retrain x TA/TA_retrain (± for quality: its standard error over the images). RA, TA: mean "
              "accuracy (%) over the shadows.")
    return "\n".join(lines) + "\n\n" + legend


def rmia_markdown(result: dict) -> str:
    """Offline RMIA's table beside U-LiRA's AUC and TPR for the same models; directions stated."""
    lines = ["| model | RMIA AUC (0.5 = as Retrain) ↓ | RMIA TPR @ 1% FPR (%) ↓ | RMIA TPR @ 0.1% FPR (%) ↓ | "
             "U-LiRA AUC ↓ | U-LiRA TPR @ 1% FPR (%) ↓ | a (per shadow) |", "|" + "---|" * 7]
    lines += [f"| {r['model']} | {_pm(r, 'rmia_auc')} | {_pm(r, 'rmia_tpr_at_1pct', 100, 2)} | "
              f"{_pm(r, 'rmia_tpr_at_01pct', 100, 2)} | {_pm(r, 'auc')} | {_pm(r, 'tpr_at_1pct', 100, 2)} | "
              f"{min(r['rmia_a'])}-{max(r['rmia_a'])} |" for r in result["rows"]]
    legend = (f"{_population(result)}; population z: the {result['population']} test images. Offline "
              "RMIA asks of each method's model U-LiRA's question (forgotten, or never seen?) with a likelihood ratio "
              "against population images, its references the other shadows' models of the same method (all but "
              "the target's pair, which tunes a). ↓ = less told apart, down to 0.5 (an AUC below it is as "
              "detectable as 1 - AUC: over-forgetting); retrain is the floor this population allows, original the "
              "ceiling. ± = sd over bootstrap resamples of the target images.")
    return "\n".join(lines) + "\n\n" + legend


def write_lira(result: dict, *, pretrain: list[str], methods: dict[str, list[str]], md: str | Path | None = None,
               json_path: str | Path | None = None, plot: str | Path | None = None, audit: str = "lira") -> str:
    """The report of audit.py lira or rmia on a shadow population (returned), and on request its markdown, its
    JSON (rows, both attacks' ROC curves, settings) and the audit's ROC plot."""
    table = rmia_markdown(result) if audit == "rmia" else lira_markdown(result)
    report = f"{audit}: {' '.join(pretrain)}\n\n{table}\n"
    if json_path:
        # One line: the ROC curves hold a point per threshold, thousands per model.
        write_text(Path(json_path), json.dumps(dict(audit=audit, pretrain=pretrain, methods=methods,
                                                             **result)))
    if md:
        write_text(Path(md), report)
    if plot:
        roc_plot(result, Path(plot), audit=audit)
    return report


def roc_plot(result: dict, path: Path, *, audit: str = "lira") -> None:
    """The attack's ROC curve per model (U-LiRA's, or RMIA's with audit="rmia"), both axes logarithmic (the low-FPR
    regime is what matters)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    curves = result["rmia_roc" if audit == "rmia" else "roc"]
    for i, (name, curve) in enumerate(curves.items()):
        style = dict(color="black", linestyle="--") if name == "retrain" else \
            dict(color="grey", linestyle=":") if name == "original" else dict(color=plt.get_cmap("tab20")(i))
        ax.plot(curve["fpr"], curve["tpr"], label=name, **style)
    ax.plot([1e-4, 1], [1e-4, 1], color="lightgrey", linewidth=0.8)
    ax.set(xscale="log", yscale="log", xlim=(1e-4, 1), ylim=(1e-4, 1), xlabel="false positive rate",
           ylabel="true positive rate",
           title=f"{'RMIA' if audit == 'rmia' else 'U-LiRA'}, {result['shadows']} shadows: unlearned vs never seen")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)
