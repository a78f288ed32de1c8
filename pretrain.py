"""Train the original model on the training split, or with --retrain the Retrain reference on Dr only.

Retrain (same recipe, same seed, forget set removed) is exact unlearning: every method is judged by how
close it gets to it. Recipes per architecture are the papers' (cited at RECIPES); any flag overrides its recipe value.
Two differences from the Unlearn-Sparse code (OPTML-Group/Unlearn-Sparse, README and unlearn/retrain.py), declared
and not measured (each is a 160-182-epoch CIFAR-10 run, a GPU's work): its Retrain runs 160 epochs with the
original's milestones (91, 136), a last phase of 24 epochs where ours, the original's recipe again, has 46; and
its loaders keep each epoch's partial last batch where ours drop it (a different 200 of 45,000 images each epoch).

    python pretrain.py --dataset fashion-mnist --arch resnet_tiny --epochs 3
    python pretrain.py --dataset fashion-mnist --arch resnet_tiny --epochs 3 --retrain --forget-class 3
    torchrun --standalone --nproc-per-node 8 pretrain.py --dataset cifar10 --arch resnet50   # data-parallel

prints the resolved config, one JSON line per epoch (loss, validation accuracy), then a summary line
with validation and test accuracy and the checkpoint path. Nothing is selected on the test set: the
final epoch's weights are saved, and the test accuracy is printed for the report only. Under torchrun the
processes split every batch (same global batch and schedule; per-process BatchNorm statistics, as in
torchvision's and timm's DDP recipes) and process 0 writes the usual checkpoint.
"""
import argparse

import torch

import common

FORGET_CLASS = 3  # --retrain: the PruneLoRA paper's class (cat in CIFAR-10); --forget-random N forgets N random images
# Training recipes of the papers. The CPU-sized ones are ours, for the Fashion-MNIST demo and profiles.
RECIPES = {
    # PruneLoRA paper, ResNet-50: SGD 0.1, momentum 0.9, wd 5e-4, cosine, 200 epochs, batch 128, crop+flip
    "resnet50": dict(optimizer="sgd", lr=0.1, weight_decay=5e-4, schedule="cosine", epochs=200, batch_size=128),
    # Unlearn-Sparse ResNet-18: SGD 0.1, wd 5e-4, 182 epochs, x0.1 at 91 and 136 (50%/75%), batch 256
    "resnet18": dict(optimizer="sgd", lr=0.1, weight_decay=5e-4, schedule="step", epochs=182, batch_size=256),
    # PruneLoRA paper, ViT-S/4: AdamW 1e-3, wd 0.1 on matrices, 10k warm-up + cosine, 90 epochs, clip 1, MixUp 0.2
    # (no label smoothing is stated, so none: timm's Mixup would otherwise add 0.1 silently)
    "vit_small": dict(optimizer="adamw", lr=1e-3, weight_decay=0.1, schedule="cosine", warmup_steps=10_000,
                      epochs=90, batch_size=128, grad_clip=1.0, mixup=0.2, label_smoothing=0.0),
    # ImageNet ViT-B/16 fine-tuned at 224 px for a few epochs (the pre-trained route)
    "vit_base": dict(optimizer="sgd", lr=0.01, weight_decay=0.0, schedule="cosine", epochs=3, batch_size=64,
                     grad_clip=1.0),
    # CPU-sized models for demos and tests
    "resnet_tiny": dict(optimizer="sgd", lr=0.05, weight_decay=5e-4, schedule="cosine", epochs=3, batch_size=128),
    "vit_tiny": dict(optimizer="adamw", lr=2e-3, weight_decay=0.05, schedule="cosine", warmup_steps=200,
                     epochs=5, batch_size=128, grad_clip=1.0),
}


def parse_args():
    recipes = "\n".join(f"  {arch}: " + ", ".join(f"{k}={v}" for k, v in dict(common.RECIPE_DEFAULTS, **r).items())
                         for arch, r in RECIPES.items())
    parser = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="recipe defaults per architecture:\n" + recipes)
    parser.add_argument("--arch", default="resnet50", help=f"one of {', '.join(common.ARCHS)} (default: %(default)s)")
    parser.add_argument("--retrain", action="store_true", help="train the Retrain reference on Dr only")
    parser.add_argument("--mask-from", default=None, metavar="SPARSE_CKPT",
                        help="with --retrain: hold this sparse (prune.py) model's mask fixed from the random "
                             "initialisation on, the exact reference for unlearning that sparse model")
    parser.add_argument("--pretrained-weights", default=None, help="local ImageNet weights file for vit_base")
    common.add_data_args(parser)
    common.add_forget_args(parser, forget_class=FORGET_CLASS)
    g = parser.add_argument_group("recipe (default: the architecture's recipe, printed at start)")
    g.add_argument("--epochs", type=common.positive_int)
    g.add_argument("--batch-size", type=common.positive_int)
    g.add_argument("--optimizer", choices=["sgd", "adam", "adamw"])
    g.add_argument("--lr", type=common.positive_float)
    g.add_argument("--weight-decay", type=common.non_negative_float, help="on weight matrices only for adamw")
    g.add_argument("--schedule", choices=["none", "cosine", "step"])
    g.add_argument("--warmup-steps", type=common.non_negative_int)
    g.add_argument("--grad-clip", type=common.non_negative_float, help="max gradient norm; 0 = off")
    g.add_argument("--mixup", type=common.non_negative_float, help="MixUp alpha; 0 = off")
    g.add_argument("--label-smoothing", type=common.unit_fraction,
                   help="label smoothing of the targets (with or without MixUp)")
    g.add_argument("--augment", type=lambda s: s.lower() in ("1", "true", "yes"), help="random crop + flip (true/false)")
    common.add_run_args(parser)
    args = parser.parse_args()
    if args.arch not in common.ARCHS:
        raise common.UserError(f"unknown architecture {args.arch!r}; choose one of {', '.join(common.ARCHS)}")
    recipe = dict(common.RECIPE_DEFAULTS, **RECIPES[args.arch])
    for key, value in recipe.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.mask_from and not args.retrain:
        raise common.UserError("--mask-from trains a sparse Retrain: give --retrain too")
    return args


def mask_of(path: str, arch: str, data: common.Data) -> dict:
    """The pruning masks of a sparse checkpoint of the same architecture and train/val split."""
    source, meta = common.load_checkpoint(path, "cpu", expect_arch=arch)
    if not meta.get("pruned_modules"):
        raise common.UserError(f"--mask-from {path} is not a sparse model (it has no pruned layers)")
    key = common.split_mismatch(meta["data"], data.spec)
    if key:
        raise common.UserError(f"--mask-from {path} was trained on another split ({key} {meta['data'].get(key)} "
                               f"vs {data.spec[key]})")
    return {name: m.weight_mask for name, m in source.named_modules() if hasattr(m, "weight_mask")}


def fit_accuracy(model, data: common.Data, *, arch: str, retrain: bool) -> float:
    """Accuracy on the images the model was trained on (eval mode, no augmentation): has it converged?"""
    x_fit, y_fit = data.subset("retain" if retrain else "train")
    return common.accuracy(common.predict(model, x_fit, data.info, common.ARCHS[arch].input_size), y_fit)


def main():
    args = parse_args()
    # Under torchrun --nproc-per-node N: N data-parallel processes; process 0 reports and writes the checkpoint.
    device, rank, world = common.init_distributed(args.device)
    common.print_config("pretrain", vars(args))
    common.seed_everything(args.seed)
    # Retrain: the training split without this run's forget set; the original: the whole training split.
    forget = dict(forget_class=args.forget_class, forget_random=args.forget_random,
                  forget_seed=args.forget_seed) if args.retrain else {}
    data = common.make_data(args.dataset, args.data_dir, device, val_fraction=args.val_fraction,
                            split_seed=args.split_seed, train_subset=args.train_subset, shadow=args.shadow,
                            download=args.download, **forget)
    method = "retrain" if args.retrain else "original"
    name = "retrain-sparse" if args.mask_from else method
    out = common.claim_output(args.out, out_dir=args.out_dir, data=data, arch=args.arch, method=name, seed=args.seed,
                              overwrite=args.overwrite) if rank == 0 else None

    model = common.build_model(args.arch, data.info, args.pretrained_weights)
    if args.mask_from:
        common.apply_masks(model, mask_of(args.mask_from, args.arch, data))
    model = common.prepare_model(model, device)
    result = common.train_recipe(model, data, device, arch=args.arch, retrain=args.retrain, seed=args.seed,
                          compile_mode=args.compile, desc=method, shard=(rank, world), **common.recipe_of(vars(args)))
    if world > 1:
        torch.distributed.destroy_process_group()
    if rank:
        return  # process 0 reports and saves

    test_acc = common.test_accuracy(model, data, arch=args.arch)
    val_acc = result.history[-1].get("val_acc", float("nan"))
    train_acc = fit_accuracy(model, data, arch=args.arch, retrain=args.retrain)
    common.save_checkpoint(model, out, arch=args.arch, method=method, data=data, config=vars(args), result=result,
                           trainable_params=common.count_params(model)[0], overwrite=args.overwrite,
                           extra=dict(train_acc=round(train_acc, 3), val_acc=val_acc, test_acc=round(test_acc, 3),
                                      world_size=world))
    scope = "retained-class " if args.retrain and data.forget_class is not None else ""
    n_fit = len(data.retain if args.retrain else data.train)
    mask = f", sparsity {common.sparsity(model, common.ARCHS[args.arch].family):.4f} (mask of {args.mask_from})" \
        if args.mask_from else ""
    processes = f" on {world} processes" if world > 1 else ""
    print(f"{name}: {args.arch} on {n_fit} {data.name} images, {args.epochs} epochs in "
          f"{result.wall_time_s:.1f}s{processes}; train acc {train_acc:.2f}%, {scope}val acc {val_acc:.2f}%, "
          f"{scope}test acc {test_acc:.2f}%{mask} -> {out}")


if __name__ == "__main__":
    common.run_main(main)
