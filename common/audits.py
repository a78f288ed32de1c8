"""Audits of whether forgotten information is still in the weights (audit.py probe, relearn): a linear probe on
frozen penultimate features, and the speed of relearning (AIN, Chundawat et al. 2023, Sec. 5)."""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import UserError
from .system import pick_device, seed_everything
from .data import Data, batches
from .models import ARCHS
from .training import accuracy, ce_loss, predict, train_loop
from .checkpoints import load_checkpoint
from .references import checked_models, pretrained_ancestor, reference_name


# Linear probe: scikit-learn's L2 logistic regression on standardised features.
PROBE_C = 1.0


PROBE_MAX_ITER = 2000


# Relearning: AIN's optimiser (Adam, lr 1e-3) on a small relearn set, a quarter of it from Df.
RELEARN_FORGET = 250  # Df images in the relearn set


RELEARN_RETAIN = 750  # Dr images mixed in, so that relearning is a fine-tune, not a collapse onto Df


RELEARN_LR = 1e-3


RELEARN_BATCH_SIZE = 64


RELEARN_STEPS = 300  # the most steps counted; a model still below the target reads "> RELEARN_STEPS"


# The curve is read after every step on the held-out forgotten images, which costs most of the audit on a CPU
# (1,000 test images of a Fashion-MNIST class: three quarters of its time); N > 0 reads it on a seeded N of them.
RELEARN_HELD_OUT = 0  # 0 = all of them


# The target: this share of the original's accuracy on the held-out forgotten data. AIN uses 0.95; relearning
# from 250 images a resnet_tiny Retrain plateaus near 0.95 of the original's on Fashion-MNIST, so 0.95 is often
# never reached, and the step count would measure the plateau, not the speed.
THRESHOLD = 0.9


CURVE_STEPS = (0, 10, 25, 50, 100, 200)  # the relearning curve's points shown in the table


def probe_row(model, data: Data, input_size, seed: int) -> dict:
    """Accuracy of a linear probe (fit on the validation split's features) on the forgotten data and the rest."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def features(x):
        return predict(model, x, data.info, input_size, fp32=True, features=True).numpy()
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


def relearn_data(data: Data, *, n_forget: int, n_retain: int, gen: torch.Generator, n_held_out: int = 0):
    """(relearn images, labels) and (held-out forgotten images, labels): one draw, the same for every model.
    n_held_out > 0 keeps that many of the held-out images (a draw from gen), 0 all of them."""
    x_forget, y_forget = data.subset("forget")
    x_retain, y_retain = data.subset("retain")
    if n_retain > len(x_retain):
        raise UserError(f"--relearn-retain {n_retain}: Dr has only {len(x_retain)} images")
    if n_forget > len(x_forget) - (0 if data.forget_class is not None else 1):
        raise UserError(f"--relearn-forget {n_forget}: Df has only {len(x_forget)} images"
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
    if n_held_out and n_held_out < len(held_out[1]):
        kept = torch.randperm(len(held_out[1]), device=held_out[1].device, generator=gen)[:n_held_out]
        held_out = held_out[0][kept], held_out[1][kept]
    return relearn, held_out


def relearn_curve(model, relearn: tuple, held_out: tuple, info, input_size, *, steps: int, lr: float,
                  batch_size: int, seed: int, device) -> list[float]:
    """Accuracy (%) on the held-out forgotten data before relearning and after each of `steps` Adam steps of
    cross-entropy on the relearn set (one seeded batch order, the same for every model)."""
    gen = torch.Generator(device=relearn[0].device).manual_seed(seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    curve = []

    def record_accuracy(step: int | None = None) -> dict:
        curve.append(accuracy(predict(model, held_out[0], info, input_size), held_out[1]))
        return {}  # nothing for train_loop to log
    record_accuracy()  # before relearning
    batch_stream = (batch for _ in range(steps) for batch in
                    batches(*relearn, batch_size, shuffle=True, gen=gen, drop_last=True))
    # One step per train_loop "epoch", so that the curve is read after every step.
    train_loop(model, optimizer, steps, lambda step: [next(batch_stream)],
                      ce_loss(info, input_size, augment_batches=False), device=device, desc="relearn",
                      after_epoch=record_accuracy, log=False)
    return curve


def steps_to(curve: list[float], target: float) -> int | None:
    """The first step at which the curve reaches target, or None if it never does."""
    return next((step for step, acc in enumerate(curve) if acc >= target), None)


def audit(kind: str, paths: list[str], retrain: str, *, floor: tuple[str, ...] = (), data_dir: str = "./data",
          device: str = "auto", seed: int = 0, relearn_forget: int = RELEARN_FORGET,
          relearn_retain: int = RELEARN_RETAIN, relearn_steps: int = RELEARN_STEPS, lr: float = RELEARN_LR,
          batch_size: int = RELEARN_BATCH_SIZE, threshold: float = THRESHOLD,
          relearn_held_out: int = RELEARN_HELD_OUT) -> list[dict]:
    """Rows of one audit ("probe" or "relearn") for Retrain, the floor Retrains and each checkpoint."""
    device = pick_device(device)
    references = {str(retrain): "--retrain", **{str(p): "--floor" for p in floor}}
    metas, data = checked_models(paths, references, data_dir=data_dir, device=device)
    input_size = ARCHS[next(iter(metas.values()))["arch"]].input_size
    if kind == "probe" and not len(data.val):
        raise UserError("probe fits on the validation split; these models were trained with --val-fraction 0")
    if kind == "relearn":
        if relearn_forget + relearn_retain < batch_size:
            raise UserError(f"the relearn set ({relearn_forget} + {relearn_retain} images) is smaller than "
                                   f"one batch ({batch_size})")
        original = next(filter(None, (pretrained_ancestor(p, m) for p, m in metas.items())), None)
        if original is None:
            raise UserError("relearn's threshold is a share of the original's accuracy: pass a checkpoint "
                                   "that is, or descends from, a pretrain.py original on disk")
        gen = torch.Generator(device=device).manual_seed(seed)
        relearn, held_out = relearn_data(data, n_forget=relearn_forget, n_retain=relearn_retain, gen=gen,
                                         n_held_out=relearn_held_out)
        original_model, _ = load_checkpoint(original[0], device)
        target = threshold * accuracy(predict(original_model, held_out[0], data.info, input_size),
                                             held_out[1])
    methods = [m["method"] for m in metas.values()]
    rows = []
    for path, meta in metas.items():
        seed_everything(seed)
        model, _ = load_checkpoint(path, device)
        label = reference_name(references.get(path), meta) or (
            meta["method"] if methods.count(meta["method"]) == 1 else Path(path).stem)
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


def audit_markdown(kind: str, rows: list[dict], relearn_steps: int) -> str:
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
