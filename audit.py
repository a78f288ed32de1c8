"""Audits: is the forgotten information still in the weights, even where accuracy and the MIAs say it is gone?

    python audit.py probe ORIGINAL.safetensors FT.safetensors ... --retrain RETRAIN.safetensors [--floor R1 ...]
    python audit.py relearn ORIGINAL.safetensors FT.safetensors ... --retrain RETRAIN.safetensors [--floor R1 ...]

probe: a linear probe on each model's frozen penultimate features, fit on the validation split (all classes,
the forgotten one included; no model trained on it), then read on the forgotten data: the test images of the
forgotten class (class-wise) and Df itself. A model whose features still separate the forgotten data as the
original's do has hidden the information behind its head, not removed it (Retrain's probe is the target).

relearn: fine-tune each model on the same small relearn set (--relearn-forget Df images mixed with
--relearn-retain Dr images; Adam, as AIN's relearn test, Chundawat et al. 2023, Sec. 5) and count the steps
until its accuracy on held-out forgotten data (class-wise: the test images of the forgotten class; random-sample:
the Df images outside the relearn set) reaches --threshold x the original's. A model that really forgot
relearns as slowly as Retrain: AIN = steps(model) / steps(Retrain), 1 is ideal, well below 1 = the information
came back fast. The whole curve goes to --json.

lira: per-example membership against a population (U-LiRA, Hayes et al. 2024, Sec. 4; the NeurIPS 2023 challenge's
forget quality, Triantafillou et al. 2024, Sec. 3). It trains its own shadow models through the project's scripts:
shadow k of --shadows N trains an original on its half of the training split (pretrain.py --shadow k/N, each image
in exactly N/2 halves), forgets the images of one fixed pool of --pool targets that its half holds (--forget-random
drawn before the halving) with each method, and is retrained without them. U-LiRA's game: given one of a
method's models, was target image x in its forget set (learned, then unlearned) or never in its training data?
Per image, a Gaussian is fit to the logit-scaled confidence log p_y - log sum_{k!=y} p_k of the method's models in
each case (the other shadows'), and every (shadow, image) is scored by the likelihood ratio: AUC 0.5 and TPR at
low FPR near the FPR mean that an unlearned image cannot be told from a never-seen one. "retrain" (exact
unlearning) is the floor the estimator reaches at this N, "original" (no unlearning: LiRA itself) the ceiling.
The challenge's forget quality instead compares a method's models with the Retrains on each forgotten image.
Runs are resumable (a finished checkpoint of the same flags is kept).

    python audit.py lira --pretrain "--dataset fashion-mnist --arch resnet_tiny --train-subset 4000 --epochs 30
        --augment false" --methods finetune,scrub --method-flags "scrub=--lr 0.005" --shadows 16 --pool 500

Every model of probe and relearn must share dataset, split, architecture and forget set (evaluate.py's checks);
the references must be Retrains of the originals' recipe. Rows: the references first, then the models in the
order given.
"""
import argparse
import json
import math
import shlex
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import common
import evaluate
import reproduce  # its scripts' runs and executors; it imports this module only inside functions

# Linear probe: scikit-learn's L2 logistic regression on standardised features.
PROBE_C = 1.0
PROBE_MAX_ITER = 2000
# Relearning: AIN's optimiser (Adam, lr 1e-3) on a small relearn set, a quarter of it from Df.
RELEARN_FORGET = 250  # Df images in the relearn set
RELEARN_RETAIN = 750  # Dr images mixed in, so that relearning is a fine-tune, not a collapse onto Df
RELEARN_LR = 1e-3
RELEARN_BATCH_SIZE = 64
RELEARN_STEPS = 300  # the most steps counted; a model still below the target reads "> RELEARN_STEPS"
# The target: this share of the original's accuracy on the held-out forgotten data. AIN uses 0.95; relearning
# from 250 images a resnet_tiny Retrain plateaus near 0.95 of the original's on Fashion-MNIST, so 0.95 is often
# never reached, and the step count would measure the plateau, not the speed.
THRESHOLD = 0.9
CURVE_STEPS = (0, 10, 25, 50, 100, 200)  # the relearning curve's points shown in the table
# U-LiRA: the shadow population. Hayes et al. use 64-128 models; N = 16 tiny ones fit 2 CPU cores in under an hour.
SHADOWS = 16
POOL = 500  # target images; each shadow forgets the ~POOL/2 of them its half holds
BOOTSTRAP = 200  # resamples of the target images for the sampling error
# The NeurIPS 2023 challenge's forget quality (google-deepmind/unlearning_evaluation, metric.py)
DELTA = 1e-5
EPSILON_CAP = 50.0
THRESHOLDS_PER_UNIT = 100


def probe_row(model, data: common.Data, input_size, seed: int) -> dict:
    """Accuracy of a linear probe (fit on the validation split's features) on the forgotten data and the rest."""
    def features(x):
        return common.predict(model, x, data.info, input_size, fp32=True, features=True).numpy()
    x_val, y_val = data.subset("val")
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=PROBE_C, max_iter=PROBE_MAX_ITER, random_state=seed))
    probe.fit(features(x_val), y_val.cpu().numpy())

    def accuracy(split):
        x, y = data.subset(split)
        if not len(y):
            return None
        return float((probe.predict(features(x)) == y.cpu().numpy()).mean() * 100)
    return dict(probe_forget_acc=accuracy("forget"), probe_test_forget_acc=accuracy("test_forget"),
                probe_test_retain_acc=accuracy("test_retain"))


def relearn_data(data: common.Data, *, n_forget: int, n_retain: int, gen: torch.Generator):
    """(relearn images, labels) and (held-out forgotten images, labels): one draw, the same for every model."""
    x_forget, y_forget = data.subset("forget")
    x_retain, y_retain = data.subset("retain")
    if n_retain > len(x_retain):
        raise common.UserError(f"--relearn-retain {n_retain}: Dr has only {len(x_retain)} images")
    if n_forget > len(x_forget) - (0 if data.forget_class is not None else 1):
        raise common.UserError(f"--relearn-forget {n_forget}: Df has only {len(x_forget)} images"
                               + ("" if data.forget_class is not None else ", and some must stay held out"))
    forget_order = torch.randperm(len(x_forget), device=x_forget.device, generator=gen)
    retain_pick = torch.randperm(len(x_retain), device=x_retain.device, generator=gen)[:n_retain]
    chosen = forget_order[:n_forget]
    relearn = (torch.cat([x_forget[chosen], x_retain[retain_pick]]),
               torch.cat([y_forget[chosen], y_retain[retain_pick]]))
    if data.forget_class is not None:
        held_out = data.subset("test_forget")
    else:  # random-sample forgetting: the Df images the relearn set does not contain
        rest = forget_order[n_forget:]
        held_out = x_forget[rest], y_forget[rest]
    return relearn, held_out


def relearn_curve(model, relearn: tuple, held_out: tuple, info, input_size, *, steps: int, lr: float,
                  batch_size: int, seed: int, device) -> list[float]:
    """Accuracy (%) on the held-out forgotten data before relearning and after each of `steps` Adam steps of
    cross-entropy on the relearn set (one seeded batch order, the same for every model)."""
    gen = torch.Generator(device=relearn[0].device).manual_seed(seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    curve = []

    def record_accuracy(step: int | None = None) -> dict:
        curve.append(common.accuracy(common.predict(model, held_out[0], info, input_size), held_out[1]))
        return {}  # nothing for train_loop to log
    record_accuracy()  # before relearning
    batch_stream = (batch for _ in range(steps) for batch in
                    common.batches(*relearn, batch_size, shuffle=True, gen=gen, drop_last=True))
    # One step per train_loop "epoch", so that the curve is read after every step.
    common.train_loop(model, optimizer, steps, lambda step: [next(batch_stream)],
                      common.ce_loss(info, input_size, augment_batches=False), device=device, desc="relearn",
                      after_epoch=record_accuracy, log=False)
    return curve


def steps_to(curve: list[float], target: float) -> int | None:
    """The first step at which the curve reaches target, or None if it never does."""
    return next((step for step, acc in enumerate(curve) if acc >= target), None)


def audit(kind: str, paths: list[str], retrain: str, *, floor: tuple[str, ...] = (), data_dir: str = "./data",
          device: str = "auto", seed: int = 0, relearn_forget: int = RELEARN_FORGET,
          relearn_retain: int = RELEARN_RETAIN, relearn_steps: int = RELEARN_STEPS, lr: float = RELEARN_LR,
          batch_size: int = RELEARN_BATCH_SIZE, threshold: float = THRESHOLD) -> list[dict]:
    """Rows of one audit ("probe" or "relearn") for Retrain, the floor Retrains and each checkpoint."""
    device = common.pick_device(device)
    references = {str(retrain): "--retrain", **{str(p): "--floor" for p in floor}}
    metas, data = evaluate.checked_models(paths, references, data_dir=data_dir, device=device)
    input_size = common.ARCHS[next(iter(metas.values()))["arch"]].input_size
    if kind == "probe" and not len(data.val):
        raise common.UserError("probe fits on the validation split; these models were trained with --val-fraction 0")
    if kind == "relearn":
        if relearn_forget + relearn_retain < batch_size:
            raise common.UserError(f"the relearn set ({relearn_forget} + {relearn_retain} images) is smaller than "
                                   f"one batch ({batch_size})")
        original = next(filter(None, (evaluate.pretrained_ancestor(p, m) for p, m in metas.items())), None)
        if original is None:
            raise common.UserError("relearn's threshold is a share of the original's accuracy: pass a checkpoint "
                                   "that is, or descends from, a pretrain.py original on disk")
        gen = torch.Generator(device=device).manual_seed(seed)
        relearn, held_out = relearn_data(data, n_forget=relearn_forget, n_retain=relearn_retain, gen=gen)
        original_model, _ = common.load_checkpoint(original[0], device)
        target = threshold * common.accuracy(common.predict(original_model, held_out[0], data.info, input_size),
                                             held_out[1])
    methods = [m["method"] for m in metas.values()]
    rows = []
    for path, meta in metas.items():
        common.seed_everything(seed)
        model, _ = common.load_checkpoint(path, device)
        label = {"--retrain": "retrain", "--floor": f"retrain-floor s{meta['config'].get('seed')}"}.get(
            references.get(path), meta["method"] if methods.count(meta["method"]) == 1 else Path(path).stem)
        row = dict(model=label, path=path)
        if kind == "probe":
            row.update(probe_row(model, data, input_size, seed))
        else:
            curve = relearn_curve(model, relearn, held_out, data.info, input_size, steps=relearn_steps, lr=lr,
                                  batch_size=batch_size, seed=seed, device=device)
            row.update(curve=[round(a, 2) for a in curve], steps_to_threshold=steps_to(curve, target),
                       target_acc=round(target, 2))
        rows.append(row)
    if kind == "relearn":
        retrain_steps = rows[0]["steps_to_threshold"]
        for row in rows:
            row["ain"] = (row["steps_to_threshold"] / retrain_steps
                          if row["steps_to_threshold"] is not None and retrain_steps else None)
    return rows


def logit_confidence(logits: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """log p_y - log sum_{k != y} p_k, computed from the logits (the softmax's normaliser cancels), float64."""
    logits = logits.double()
    correct = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return (correct - torch.logsumexp(others, dim=1)).numpy()


def shadow_runs(pretrain: list[str], methods: dict[str, list[str]], *, shadows: int, pool: int, pool_seed: int,
                ckpt_dir: Path) -> tuple[list[dict], dict[str, list[Path]]]:
    """The population's training runs in dependency order ({kind, out, cmd}, as reproduce.run_graph takes them), and
    per model name ("original", "retrain", each method) its N checkpoints. Shadow k trains with seed k."""
    if shadows < 6 or shadows % 2:
        raise common.UserError(f"--shadows {shadows}: need an even number, at least 6 (each world's Gaussian "
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


def roc_summary(scores: np.ndarray, labels: np.ndarray) -> dict:
    """AUC and the TPR at 1% and 0.1% FPR (the largest TPR whose FPR does not exceed it)."""
    fpr, tpr, _ = roc_curve(labels, scores)
    return dict(auc=float(roc_auc_score(labels, scores)), tpr_at_1pct=float(tpr[fpr <= 0.01].max()),
                tpr_at_01pct=float(tpr[fpr <= 0.001].max()))


def attack(scores: np.ndarray, members: np.ndarray, *, bootstrap: int, seed: int) -> dict:
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


def shadow_outputs(paths: list[Path], shadow_data: list[common.Data], pool: tuple, test: tuple,
                   device) -> tuple[np.ndarray, tuple[float, float]]:
    """Per shadow model, its logit-scaled confidence on each pool image [N, n]; and (RA, TA) averaged over them:
    accuracy on each shadow's own retain set and on the test set."""
    confidence, ra, ta = [], [], []
    for path, data in zip(paths, shadow_data):
        model, meta = common.load_checkpoint(path, device)
        input_size = common.ARCHS[meta["arch"]].input_size
        confidence.append(logit_confidence(common.predict(model, pool[0], data.info, input_size, fp32=True),
                                           pool[1].cpu()))
        x_retain, y_retain = data.subset("retain")
        ra.append(common.accuracy(common.predict(model, x_retain, data.info, input_size), y_retain))
        ta.append(common.accuracy(common.predict(model, test[0], data.info, input_size), test[1]))
    return np.stack(confidence), (float(np.mean(ra)), float(np.mean(ta)))


def lira(pretrain: list[str], methods: dict[str, list[str]], *, shadows: int = SHADOWS, pool: int = POOL,
         pool_seed: int = 0, ckpt_dir: str | Path, data_dir: str = "./data", device: str = "auto",
         bootstrap: int = BOOTSTRAP, seed: int = 0, executor=None) -> dict:
    """Train (or resume) the shadow population (on executor, a reproduce.Executor; default serial) and score every
    method, the original (ceiling) and Retrain against itself (floor). Returns {rows, roc, ...} (roc: per model its
    ROC curve's points, for the plot)."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    runs, models = shadow_runs(pretrain, methods, shadows=shadows, pool=pool, pool_seed=pool_seed,
                               ckpt_dir=ckpt_dir)
    reproduce.run_graph(runs, executor or reproduce.Executor(), data_dir=data_dir, device=device,
                        log_dir=ckpt_dir / "logs")
    device = common.pick_device(device)
    # The pool as the un-halved split draws it; a shadow's members are the pool images its own forget set holds.
    spec = dict(common.read_sidecar(models["retrain"][0])["data"], shadow=None)
    pool_data = common.data_from_spec(dict(spec, forget_hash=None), data_dir, device)
    shadow_data = [common.data_from_spec(common.read_sidecar(path)["data"], data_dir, device)
                   for path in models["retrain"]]
    members = np.stack([torch.isin(pool_data.forget, data.forget).cpu().numpy() for data in shadow_data])
    confidence, utility = {}, {}
    for name, paths in models.items():
        confidence[name], utility[name] = shadow_outputs(paths, shadow_data, pool_data.subset("forget"),
                                                         pool_data.subset("test"), device)
    rows, roc = [], {}
    n_models = shadows // 2
    for name in ("retrain", "original", *methods):
        scores = lira_scores(confidence[name], members)
        row = dict(model=name, **attack(scores, members, bootstrap=bootstrap, seed=seed))
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
        rows.append(row)
        fpr, tpr, _ = roc_curve(members.ravel(), scores.ravel())
        roc[name] = dict(fpr=fpr.tolist(), tpr=tpr.tolist())
    return dict(rows=rows, roc=roc, shadows=shadows, pool=pool, models_per_world=n_models)


def markdown(kind: str, rows: list[dict], relearn_steps: int) -> str:
    """The audit's table; headers state the direction."""
    def cell(value, fmt="{:.2f}"):
        return "-" if value is None else fmt.format(value)
    if kind == "probe":
        lines = ["| model | probe acc, test forgotten class ↓ | probe Acc(Df) ↓ | probe acc, test retained ↑ |",
                 "|---|---|---|---|"]
        lines += [f"| {r['model']} | {cell(r['probe_test_forget_acc'])} | {cell(r['probe_forget_acc'])} | "
                  f"{cell(r['probe_test_retain_acc'])} |" for r in rows]
        legend = ("Linear probe (standardised features, L2 logistic regression) fit on the validation split's "
                  "penultimate features, all classes. ↓: lower = less recoverable; the target is Retrain's row, "
                  "not 0 (Retrain's features still carry what the retained classes teach about the forgotten one).")
    else:
        shown = [s for s in CURVE_STEPS if s <= relearn_steps]
        lines = ["| model | " + " | ".join(f"acc @ {s}" for s in shown)
                 + " | steps to target ↑ | AIN (steps / Retrain's) ↑ |", "|" + "---|" * (len(shown) + 3)]
        lines += [f"| {r['model']} | " + " | ".join(cell(r["curve"][s]) for s in shown) + " | "
                  + (str(r["steps_to_threshold"]) if r["steps_to_threshold"] is not None else f"> {relearn_steps}")
                  + f" | {cell(r['ain'])} |" for r in rows]
        legend = (f"Accuracy (%) on held-out forgotten data after k relearning steps; target = "
                  f"{rows[0]['target_acc']:.2f}% (the share of the original's accuracy). ↑: more steps = the "
                  "information came back more slowly; AIN 1 = as slowly as Retrain, near 0 = it was still there.")
    return "\n".join(lines) + "\n\n" + legend


def lira_markdown(result: dict) -> str:
    """U-LiRA's and the challenge's table: mean (± sd over resamples of the target images); directions stated."""
    def pm(row, key, scale=1.0, digits=3):
        return f"{row[key] * scale:.{digits}f} ± {row[key + '_std'] * scale:.{digits}f}"
    lines = ["| model | U-LiRA AUC (0.5 = as Retrain) ↓ | TPR @ 1% FPR (%) ↓ | TPR @ 0.1% FPR (%) ↓ | "
             "challenge forget quality ↑ | challenge score ↑ | median eps ↓ | RA | TA |", "|" + "---|" * 9]
    lines += [f"| {r['model']} | {pm(r, 'auc')} | {pm(r, 'tpr_at_1pct', 100, 2)} | {pm(r, 'tpr_at_01pct', 100, 2)} | "
              f"{pm(r, 'forget_quality')} | {r['challenge_score']:.3f} | {r['median_epsilon']:.2f} | {r['RA']:.2f} | "
              f"{r['TA']:.2f} |" for r in result["rows"]]
    k = result["models_per_world"]
    legend = (f"{result['shadows']} shadow models, {result['pool']} target images, each learned (then unlearned) by "
              f"{k} shadows and never seen by {k}. U-LiRA: can a method's model tell an image it forgot from one it "
              "never saw? ↓ = less; retrain (exact unlearning) is the floor this many shadows allow (0.5 up to "
              "sampling error), original (no unlearning) the ceiling. ± = sd over bootstrap resamples of the target "
              f"images. Challenge forget quality: per forgotten image, {k} of the method's models against {k} "
              f"Retrains that never saw it (the challenge used 512 each), eps in 0.5-wide buckets up to "
              f"ceil(log({k} - 1)), so it is coarse and Retrain against Retrain scores below 1; score = quality x "
              "RA/RA_retrain x TA/TA_retrain (± for quality: its standard error over the images). RA, TA: mean "
              "accuracy (%) over the shadows.")
    return "\n".join(lines) + "\n\n" + legend


def write_lira(result: dict, *, pretrain: list[str], methods: dict[str, list[str]], md: str | Path | None = None,
               json_path: str | Path | None = None, plot: str | Path | None = None) -> str:
    """lira's report (returned), and on request its markdown, its JSON (rows, ROC curves, settings) and ROC plot."""
    report = f"lira: {' '.join(pretrain)}\n\n{lira_markdown(result)}\n"
    if json_path:
        # One line: the ROC curves hold a point per threshold, thousands per model.
        evaluate.write_text(Path(json_path), json.dumps(dict(audit="lira", pretrain=pretrain, methods=methods,
                                                             **result)))
    if md:
        evaluate.write_text(Path(md), report)
    if plot:
        roc_plot(result, Path(plot))
    return report


def roc_plot(result: dict, path: Path) -> None:
    """The attack's ROC curve per model, both axes logarithmic (the low-FPR regime is what matters)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    for i, (name, curve) in enumerate(result["roc"].items()):
        style = dict(color="black", linestyle="--") if name == "retrain" else \
            dict(color="grey", linestyle=":") if name == "original" else dict(color=plt.get_cmap("tab20")(i))
        ax.plot(curve["fpr"], curve["tpr"], label=name, **style)
    ax.plot([1e-4, 1], [1e-4, 1], color="lightgrey", linewidth=0.8)
    ax.set(xscale="log", yscale="log", xlim=(1e-4, 1), ylim=(1e-4, 1), xlabel="false positive rate",
           ylabel="true positive rate", title=f"U-LiRA, {result['shadows']} shadows: unlearned vs never seen")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    common.save_png(fig, path)


def method_commands(names: list[str], extra: dict[str, list[str]]) -> dict[str, list[str]]:
    """Method name -> [script, *its flags in reproduce.METHODS, *extra flags for it]."""
    unknown = [m for m in [*names, *extra] if m not in reproduce.METHODS]
    if unknown:
        raise common.UserError(f"unknown methods {unknown}; known: {', '.join(reproduce.METHODS)}")
    return {m: [reproduce.METHODS[m][0], *reproduce.METHODS[m][1], *extra.get(m, [])] for m in names}


def main():
    parser = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="audit", required=True, parser_class=common.ArgumentParser)
    subcommands = (("probe", "linear-probe leakage"), ("relearn", "relearning speed"),
                   ("lira", "per-example membership against shadow models (U-LiRA, challenge score)"))
    for name, what in subcommands:
        p = sub.add_parser(name, help=what, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        if name != "lira":
            p.add_argument("checkpoints", nargs="+", help="checkpoints to audit (.safetensors with sidecars)")
            p.add_argument("--retrain", required=True, help="the Retrain of the same forget set and recipe")
            p.add_argument("--floor", nargs="+", default=[], metavar="RETRAIN", help="Retrains of other seeds")
        p.add_argument("--seed", type=common.non_negative_int, default=0, help="(default: %(default)s)")
        p.add_argument("--json", default=None, help="write the rows as JSON here")
        p.add_argument("--md", default=None, help="write the markdown table here")
        p.add_argument("--overwrite", action="store_true", help="replace existing output files")
        p.add_argument("--data-dir", default="./data", help="torchvision dataset root (default: %(default)s)")
        p.add_argument("--device", type=common.device_name, default="auto", help="(default: %(default)s)")
        if name == "relearn":
            p.add_argument("--relearn-forget", type=common.positive_int, default=RELEARN_FORGET,
                           help="Df images in the relearn set (default: %(default)s)")
            p.add_argument("--relearn-retain", type=common.non_negative_int, default=RELEARN_RETAIN,
                           help="Dr images in the relearn set (default: %(default)s)")
            p.add_argument("--relearn-steps", type=common.positive_int, default=RELEARN_STEPS,
                           help="(default: %(default)s)")
            p.add_argument("--lr", type=common.positive_float, default=RELEARN_LR, help="(default: %(default)s)")
            p.add_argument("--batch-size", type=common.positive_int, default=RELEARN_BATCH_SIZE,
                           help="(default: %(default)s)")
            p.add_argument("--threshold", type=common.unit_fraction, default=THRESHOLD,
                           help="share of the original's held-out forgotten accuracy (default: %(default)s)")
        if name == "lira":
            p.add_argument("--pretrain", required=True, type=shlex.split,
                           help="pretrain.py's flags for every shadow (dataset, arch, recipe), one quoted string")
            p.add_argument("--methods", required=True, help="comma-separated reproduce.py method names")
            p.add_argument("--method-flags", action="append", default=[], metavar="NAME=FLAGS",
                           help="extra flags of one method, e.g. \"scrub=--lr 0.005\" (repeatable)")
            p.add_argument("--shadows", type=common.positive_int, default=SHADOWS,
                           help="N, even (default: %(default)s)")
            p.add_argument("--pool", type=common.positive_int, default=POOL,
                           help="target images (default: %(default)s)")
            p.add_argument("--pool-seed", type=common.non_negative_int, default=0,
                           help="--forget-seed that draws the pool (default: %(default)s)")
            p.add_argument("--ckpt-dir", required=True, help="where the shadow checkpoints go (resumable)")
            p.add_argument("--bootstrap", type=common.positive_int, default=BOOTSTRAP,
                           help="resamples of the target images (default: %(default)s)")
            p.add_argument("--plot", default=None, help="write the ROC plot (PNG) here")
            reproduce.add_executor_args(p)
    args = parser.parse_args()
    if args.audit == "lira":
        return main_lira(args)
    outputs = common.check_output_files((args.json, args.md), args.overwrite)
    extra = dict(relearn_forget=args.relearn_forget, relearn_retain=args.relearn_retain,
                 relearn_steps=args.relearn_steps, lr=args.lr, batch_size=args.batch_size,
                 threshold=args.threshold) if args.audit == "relearn" else {}
    rows = audit(args.audit, args.checkpoints, args.retrain, floor=tuple(args.floor), data_dir=args.data_dir,
                 device=args.device, seed=args.seed, **extra)
    spec = common.read_sidecar(args.retrain)["data"]
    report = (f"{args.audit}: {evaluate.describe_forget(spec)}\n\n"
              f"{markdown(args.audit, rows, extra.get('relearn_steps', 0))}\n")
    print(report)
    if args.json:
        evaluate.write_text(Path(args.json), json.dumps(dict(audit=args.audit, forget=spec, settings=extra,
                                                             rows=rows), indent=1))
    if args.md:
        evaluate.write_text(Path(args.md), report)
    if outputs:
        print("wrote " + ", ".join(map(str, outputs)))


def main_lira(args) -> None:
    names, extra = args.methods.split(","), {}
    for item in args.method_flags:
        name, sep, value = item.partition("=")
        if not sep or name not in names:
            raise common.UserError(f"--method-flags {item!r}: expected NAME=FLAGS for one of --methods")
        extra[name] = shlex.split(value)
    methods = method_commands(names, extra)
    outputs = common.check_output_files((args.json, args.md, args.plot), args.overwrite)
    common.print_config("audit lira", vars(args))
    executor = reproduce.make_executor(args.executor, workers=args.workers, threads=args.threads_per_run,
                                       partition=args.slurm_partition, time_min=args.slurm_time,
                                       gpus=args.slurm_gpus, cpus=args.slurm_cpus, parallelism=args.slurm_parallelism,
                                       ddp=args.ddp)
    result = lira(args.pretrain, methods, shadows=args.shadows, pool=args.pool, pool_seed=args.pool_seed,
                  ckpt_dir=args.ckpt_dir, data_dir=args.data_dir, device=args.device, bootstrap=args.bootstrap,
                  seed=args.seed, executor=executor)
    print(write_lira(result, pretrain=args.pretrain, methods=methods, md=args.md, json_path=args.json,
                     plot=args.plot))
    if outputs:
        print("wrote " + ", ".join(map(str, outputs)))


if __name__ == "__main__":
    common.run_main(main)
