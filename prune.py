"""OMP / IMP: sparse original models by global magnitude pruning with weight rewinding (Unlearn-Sparse).

OMP (one-shot magnitude pruning): take the dense trained model, prune --sparsity of all prunable weights
(every conv of a ResNet, every block linear of a ViT; head and norms stay dense) by global |w|, rewind the
surviving weights to their values after --rewind-epoch epochs of the same training run, and retrain with
the mask held for the rest of that run's schedule (epochs rewind..end, learning rate resumed there). IMP
(--rounds k): k rounds of pruning 20% of the remaining weights + rewind + retrain, ending at sparsity
1 - 0.8^k. The recipe, seed and data split come from the dense model's sidecar (pretrain.py's config).
Upstream (Unlearn-Sparse main_imp.py) retrains the full --epochs (182) after rewinding to epoch 8, its MultiStepLR
advanced 8 steps, so its last 8 epochs run past the schedule's end at the final rate (0.001); ours ends with the
schedule (174 epochs). Declared, not measured: 8 epochs at lr 0.001 after 174 of a CIFAR-10 run, a GPU's work.

The rewind point is not stored by pretrain.py: this script replays the dense run (same seed, same
initialisation, same batch order and schedule) up to --rewind-epoch and prints the replayed epoch's
validation accuracy next to the one the dense run logged, so a mismatch (e.g. a non-deterministic GPU
kernel) is visible. On CPU the replay is exact. Under torchrun (data-parallel) the replay is exact only when the
dense run had as many processes.

    python prune.py --model model_weights/fashion-mnist_resnet_tiny_full_original_s0.safetensors --sparsity 0.5

prints the resolved config, the rewind check, one JSON line per retraining epoch, then sparsity, test
accuracy and the path (default name: ..._full_omp_s0.safetensors, or _imp_ with --rounds). The output's
sidecar says method "omp" or "imp"; every unlearning script takes it as --model and keeps its mask.
"""
import argparse

import torch

import common

SPARSITY = 0.5  # OMP target; Unlearn-Sparse reports 0.5 ... 0.95
ROUNDS = 0  # 0 = OMP (one shot); k > 0 = IMP, k rounds
IMP_RATE = 0.2  # IMP prunes 20% of the remaining weights per round (Unlearn-Sparse, lottery tickets)
REWIND_EPOCH = 8  # Unlearn-Sparse rewinds ResNet-18 (182 epochs) to epoch 8 ...
REWIND_MAX_FRACTION = 1 / 3  # ... capped at a third of the dense run, so a 3-epoch CPU run rewinds to epoch 1


def default_rewind_epoch(epochs: int) -> int:
    """Epoch 8, or a third of a short dense run (1 of 3 epochs for the CPU demo)."""
    return min(REWIND_EPOCH, int(epochs * REWIND_MAX_FRACTION))


def rewind(model, state: dict) -> None:
    """Load rewind-point weights into a pruned model, keeping its masks."""
    pruned = set(common.pruned_modules(model))
    renamed = {(k + "_orig" if k.endswith(".weight") and k.rsplit(".", 1)[0] in pruned else k): v
               for k, v in state.items()}
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    assert not unexpected and all(k.endswith("weight_mask") for k in missing), (missing, unexpected)


def main():
    parser = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="dense original checkpoint (pretrain.py output)")
    parser.add_argument("--data-dir", default="./data", help="torchvision dataset root (default: %(default)s)")
    g = parser.add_argument_group("pruning")
    g.add_argument("--sparsity", type=common.unit_fraction, default=SPARSITY, help="OMP sparsity (default: %(default)s)")
    g.add_argument("--rounds", type=common.non_negative_int, default=ROUNDS, help="IMP rounds; 0 = OMP (default: %(default)s)")
    g.add_argument("--imp-rate", type=common.unit_fraction, default=IMP_RATE, help="IMP per-round rate (default: %(default)s)")
    g.add_argument("--rewind-epoch", type=common.non_negative_int, default=None,
                   help=f"epoch of the dense run to rewind to; 0 = the initialisation (default: {REWIND_EPOCH}, "
                        "at most a third of the dense run's epochs)")
    common.add_run_args(parser)
    args = parser.parse_args()
    common.check_sparsity(args.sparsity)
    common.check_sparsity(args.imp_rate)
    if args.rounds < 0:
        raise common.UserError(f"--rounds must be >= 0, got {args.rounds}")

    device, rank, world = common.init_distributed(args.device)  # torchrun: data-parallel replay and retraining
    common.seed_everything(args.seed)
    dense, meta = common.load_checkpoint(args.model, device)
    if meta["method"] != "original" or meta.get("pruned_modules"):
        raise common.UserError(f"{args.model} is not a dense original model (method {meta['method']}); "
                               "prune pretrain.py's output")
    # Recipe keys added since the original was trained take their defaults (what that run used).
    # compile: how to run, not what to train: this run's flag.
    recipe = dict(common.RECIPE_DEFAULTS, **meta["config"]) | dict(compile=args.compile)
    if args.rewind_epoch is None:
        args.rewind_epoch = default_rewind_epoch(recipe["epochs"])
    if not 0 <= args.rewind_epoch < recipe["epochs"]:
        raise common.UserError(f"--rewind-epoch must be in 0..{recipe['epochs'] - 1} (the dense run had "
                               f"{recipe['epochs']} epochs)")
    data = common.data_from_spec(meta["data"], args.data_dir, device)
    method = "imp" if args.rounds else "omp"
    out = common.claim_output(args.out, out_dir=args.out_dir, data=data, arch=recipe["arch"], method=method,
                              seed=args.seed, overwrite=args.overwrite) if rank == 0 else None
    common.print_config(method, dict(vars(args), recipe=recipe))
    family = common.ARCHS[recipe["arch"]].family

    recipe_settings = dict(arch=recipe["arch"], retrain=recipe["retrain"], seed=recipe["seed"],
                           compile_mode=args.compile, **common.recipe_of(recipe))
    # The rewind point: the dense run replayed (same seed, init, batch order, schedule) up to --rewind-epoch.
    common.seed_everything(recipe["seed"])
    rewound = common.prepare_model(common.build_model(recipe["arch"], data.info), device)
    if args.rewind_epoch:
        replay = common.train_recipe(rewound, data, device, desc="rewind", stop_epoch=args.rewind_epoch,
                                       shard=(rank, world), **recipe_settings)
        logged = meta["history"][args.rewind_epoch - 1].get("val_acc", float("nan"))
        print(f"rewind point: epoch {args.rewind_epoch} replayed, val acc "
              f"{replay.history[-1].get('val_acc', float('nan')):.3f}% (the dense run logged {logged:.3f}%)")
    rewind_state = common.plain_state_dict(rewound)

    model, results = dense, []
    for round_index in range(max(args.rounds, 1)):
        common.global_magnitude_prune(model, family, args.imp_rate if args.rounds else args.sparsity)
        rewind(model, rewind_state)
        results.append(common.train_recipe(model, data, device, desc=f"{method} round {round_index + 1}",
                                             start_epoch=args.rewind_epoch, shard=(rank, world), **recipe_settings))
    if world > 1:
        torch.distributed.destroy_process_group()
    if rank:
        return  # process 0 reports and saves

    result = common.TrainResult(sum(r.wall_time_s for r in results), max(r.peak_mem_mb for r in results),
                                [h for r in results for h in r.history], results[0].trainable_params)
    test_acc = common.test_accuracy(model, data, arch=recipe["arch"])
    val_acc = result.history[-1].get("val_acc", float("nan"))
    saved = common.save_checkpoint(model, out, arch=recipe["arch"], method=method, data=data,
                                   config=dict(recipe, pruning=vars(args)), result=result,
                                   trainable_params=common.count_params(model)[0], overwrite=args.overwrite,
                                   extra=dict(parent=str(args.model), test_acc=round(test_acc, 3), val_acc=val_acc,
                                              world_size=world))
    print(f"{method}: sparsity {saved['sparsity']:.4f} after {max(args.rounds, 1)} round(s), rewound to epoch "
          f"{args.rewind_epoch} and retrained {recipe['epochs'] - args.rewind_epoch} epoch(s) per round, "
          f"{result.wall_time_s:.1f}s; val acc {val_acc:.2f}%, test acc {test_acc:.2f}% (report only) -> {out}")


if __name__ == "__main__":
    common.run_main(main)
