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

rmia: the same question on the same shadow population (same flags, so lira's checkpoints are reused), asked by
offline RMIA (Zarifzadeh et al. 2024): a likelihood ratio of each target image against population images (the
test split), calibrated with the other shadows' models; printed beside U-LiRA's AUC and TPR for the same models.

klom: per example, is a method's output distributed as exact unlearning's (KLOM, Georgiev et al. 2025, App. E.1)?
It trains --models originals (seed k) and unlearns each with every method (seed k), and 2 x --models Retrains on
one forget set; per image of Df, Dr and the validation split, the KL divergence between the histograms of the
margin over the reference Retrains (seeds --models and up) and over each population, as percentiles. The other
half of the Retrains is the floor ("retrain-floor"), the originals the ceiling.

    python audit.py klom --pretrain "--dataset fashion-mnist --arch resnet_tiny --train-subset 4000 --epochs 30
        --augment false" --forget "--forget-random 300" --methods finetune,scrub --models 32 --ckpt-dir ckpt/klom

The originals must have learned Df better than held-out data (a memorising recipe, as here): an 8-epoch recipe
left the original within the Retrain floor, so KLOM had nothing to measure (RESULTS.md).

Every model of probe and relearn must share dataset, split, architecture and forget set (evaluate.py's checks);
the references must be Retrains of the originals' recipe. Rows: the references first, then the models in the
order given.
"""
import argparse
import json
import shlex
from pathlib import Path

import common


def main():
    parser = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="audit", required=True, parser_class=common.ArgumentParser)
    subcommands = (("probe", "linear-probe leakage"), ("relearn", "relearning speed"),
                   ("lira", "per-example membership against shadow models (U-LiRA, challenge score)"),
                   ("rmia", "per-example membership against shadow models (offline RMIA, beside U-LiRA)"),
                   ("klom", "per-example distance of a method's output distribution from Retrain's (KLOM)"))
    populations = ("lira", "rmia", "klom")
    for name, what in subcommands:
        p = sub.add_parser(name, help=what, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        if name not in populations:
            p.add_argument("checkpoints", nargs="+", help="checkpoints to audit (.safetensors with sidecars)")
            p.add_argument("--retrain", required=True, help="the Retrain of the same forget set and recipe")
            p.add_argument("--floor", nargs="+", default=[], metavar="RETRAIN", help="Retrains of other seeds")
        p.add_argument("--seed", type=common.non_negative_int, default=0, help="(default: %(default)s)")
        p.add_argument("--json", default=None, help="write the rows as JSON here")
        p.add_argument("--md", default=None, help="write the audit_markdown table here")
        p.add_argument("--overwrite", action="store_true", help="replace existing output files")
        p.add_argument("--data-dir", default="./data", help="torchvision dataset root (default: %(default)s)")
        p.add_argument("--device", type=common.device_name, default="auto", help="(default: %(default)s)")
        if name == "relearn":
            p.add_argument("--relearn-forget", type=common.positive_int, default=common.RELEARN_FORGET,
                           help="Df images in the relearn set (default: %(default)s)")
            p.add_argument("--relearn-retain", type=common.non_negative_int, default=common.RELEARN_RETAIN,
                           help="Dr images in the relearn set (default: %(default)s)")
            p.add_argument("--relearn-steps", type=common.positive_int, default=common.RELEARN_STEPS,
                           help="(default: %(default)s)")
            p.add_argument("--relearn-held-out", type=common.non_negative_int, default=common.RELEARN_HELD_OUT,
                           help="read the curve on a seeded N of the held-out forgotten images, 0 = all "
                                "(default: %(default)s)")
            p.add_argument("--lr", type=common.positive_float, default=common.RELEARN_LR, help="(default: %(default)s)")
            p.add_argument("--batch-size", type=common.positive_int, default=common.RELEARN_BATCH_SIZE,
                           help="(default: %(default)s)")
            p.add_argument("--threshold", type=common.unit_fraction, default=common.THRESHOLD,
                           help="share of the original's held-out forgotten accuracy (default: %(default)s)")
        if name in populations:
            p.add_argument("--pretrain", required=True, type=shlex.split,
                           help="pretrain.py's flags for every model (dataset, arch, recipe), one quoted string")
            p.add_argument("--methods", required=True, help="comma-separated reproduce.py method names")
            p.add_argument("--method-flags", action="append", default=[], metavar="NAME=FLAGS",
                           help="extra flags of one method, e.g. \"scrub=--lr 0.005\" (repeatable)")
            p.add_argument("--ckpt-dir", required=True, help="where the population's checkpoints go (resumable)")
            p.add_argument("--plot", default=None, help="write the plot (PNG) here")
            common.add_executor_args(p)
        if name == "klom":
            p.add_argument("--forget", required=True, type=shlex.split,
                           help="the forget set's flags, one quoted string: \"--forget-class 3\" or "
                                "\"--forget-random 300 --forget-seed 0\"")
            p.add_argument("--models", type=common.positive_int, default=common.KLOM_MODELS,
                           help="models per population; the Retrains are twice as many (default: %(default)s)")
        if name in ("lira", "rmia"):
            p.add_argument("--shadows", type=common.positive_int, default=common.SHADOWS,
                           help="N, even (default: %(default)s)")
            p.add_argument("--pool", type=common.positive_int, default=common.POOL,
                           help="target images (default: %(default)s)")
            p.add_argument("--pool-seed", type=common.non_negative_int, default=0,
                           help="--forget-seed that draws the pool (default: %(default)s)")
            p.add_argument("--bootstrap", type=common.positive_int, default=common.BOOTSTRAP,
                           help="resamples of the target images (default: %(default)s)")
    args = parser.parse_args()
    if args.audit in populations:
        return main_population(args)
    outputs = common.check_output_files((args.json, args.md), args.overwrite)
    extra = dict(relearn_forget=args.relearn_forget, relearn_retain=args.relearn_retain,
                 relearn_steps=args.relearn_steps, relearn_held_out=args.relearn_held_out, lr=args.lr,
                 batch_size=args.batch_size, threshold=args.threshold) if args.audit == "relearn" else {}
    rows = common.audit(args.audit, args.checkpoints, args.retrain, floor=tuple(args.floor), data_dir=args.data_dir,
                 device=args.device, seed=args.seed, **extra)
    spec = common.read_sidecar(args.retrain)["data"]
    report = (f"{args.audit}: {common.describe_forget(spec)}\n\n"
              f"{common.audit_markdown(args.audit, rows, extra.get('relearn_steps', 0))}\n")
    print(report)
    if args.json:
        common.write_text(Path(args.json), json.dumps(dict(audit=args.audit, forget=spec, settings=extra,
                                                             rows=rows), indent=1))
    if args.md:
        common.write_text(Path(args.md), report)
    if outputs:
        print("wrote " + ", ".join(map(str, outputs)))


def main_population(args) -> None:
    """lira, rmia and klom: train (or resume) a population of models through the scripts, then score it."""
    names, extra = args.methods.split(","), {}
    for item in args.method_flags:
        name, sep, value = item.partition("=")
        if not sep or name not in names:
            raise common.UserError(f"--method-flags {item!r}: expected NAME=FLAGS for one of --methods")
        extra[name] = shlex.split(value)
    methods = common.method_commands(names, extra)
    outputs = common.check_output_files((args.json, args.md, args.plot), args.overwrite)
    common.print_config(f"audit {args.audit}", vars(args))
    executor = common.executor_from_args(args)
    if args.audit == "klom":
        result = common.klom_audit(args.pretrain, methods, forget=args.forget, models=args.models,
                                   ckpt_dir=args.ckpt_dir, data_dir=args.data_dir, device=args.device,
                                   executor=executor)
        print(common.write_klom(result, pretrain=args.pretrain, forget=args.forget, methods=methods, md=args.md,
                                json_path=args.json, plot=args.plot))
    else:
        result = common.lira(args.pretrain, methods, shadows=args.shadows, pool=args.pool, pool_seed=args.pool_seed,
                             ckpt_dir=args.ckpt_dir, data_dir=args.data_dir, device=args.device,
                             bootstrap=args.bootstrap, seed=args.seed, executor=executor)
        print(common.write_lira(result, pretrain=args.pretrain, methods=methods, md=args.md, json_path=args.json,
                                plot=args.plot, audit=args.audit))
    if outputs:
        print("wrote " + ", ".join(map(str, outputs)))


if __name__ == "__main__":
    common.run_main(main)
