"""PruneLoRA, "prune first, then adapt, then unlearn": prune 50% by L2 structured pruning (as pruneft.py),
re-estimate BatchNorm statistics on Dr, add LoRA adapters to the frozen pruned model, then train the adapters
plus the head with cross-entropy on Dr (as lora.py). On pruned layers the update is M * (W0 + BA), so the merged
checkpoint is exactly as sparse as the pruned model; --allow-regrowth lets the dense low-rank update fill the
pruned filters, as the seed code did. --shrink trains the same adapters on a physically smaller network
(common.shrink_pruned) and writes it back.

    python loraprune.py --model model_weights/fashion-mnist_resnet_tiny_full_original_s0.safetensors --forget-class 3
"""
import time

import common

METHOD = "loraprune"
FORGET_CLASS = 3  # the PruneLoRA paper's class (cat in CIFAR-10); --forget-random N forgets N random images
# The PruneLoRA paper's settings (arXiv 2411.11907, Sec. 3); rank, alpha, dropout and target layers per
# architecture family are common.LORA_DEFAULTS.
PRUNE = "l2-structured"  # L2-norm structured pruning, per layer
SPARSITY = 0.5
LORA_HEAD = True  # the classifier head trains beside the adapters
EPOCHS = 5
LR = 1e-3
BATCH_SIZE = 128
OPTIMIZER = "adam"
WEIGHT_DECAY = 0.0
AUGMENT = False
SHRINK = False  # train without the pruned filters: the same adapters, 0.6-0.75x the step time


def main():
    parser = common.unlearn_parser(__doc__, forget_class=FORGET_CLASS)
    common.add_prune_args(parser, method=PRUNE, sparsity=SPARSITY, shrink=SHRINK)
    common.add_lora_args(parser, train_head=LORA_HEAD)
    common.add_optim_args(parser, epochs=EPOCHS, lr=LR, batch_size=BATCH_SIZE, optimizer=OPTIMIZER,
                          weight_decay=WEIGHT_DECAY, augment=AUGMENT)
    args = parser.parse_args()

    # The original model, and its training split cut into this run's forget set Df and retain set Dr.
    device, gen = common.device_and_generator(args.device, seed=args.seed)
    model, meta, data = common.load_original(args.model, device, data_dir=args.data_dir, forget_class=args.forget_class,
                                             forget_random=args.forget_random, forget_seed=args.forget_seed)
    out = common.claim_output(args.out, out_dir=args.out_dir, data=data, arch=meta["arch"], method=METHOD,
                              seed=args.seed, overwrite=args.overwrite)
    arch = common.ARCHS[meta["arch"]]
    lora = common.lora_settings(arch.family, rank=args.lora_rank, alpha=args.lora_alpha,
                                dropout=args.lora_dropout, targets=args.lora_targets)
    config = dict(vars(args), lora_settings=lora)
    common.print_config(METHOD, config)
    x_retain, y_retain = data.subset("retain")

    # 1. Prune.
    start = time.perf_counter()
    common.prune_model(model, arch.family, args.prune, args.sparsity)
    if args.allow_regrowth:
        common.allow_regrowth(model)
    sparsity_after_pruning = common.sparsity(model, arch.family)
    # 2. Optionally, a copy without the pruned filters and the inputs they feed (their constant outputs kept).
    train_model = common.shrink_pruned(model, arch.family) if args.shrink else model
    # 3. The dense model's BatchNorm statistics no longer describe the pruned layers, and frozen BatchNorm would
    #    never correct them: re-estimate them on Dr (on the shrunk copy: the same statistics, a cheaper forward).
    if args.recalibrate_bn and not args.allow_regrowth:
        calibration_images = common.random_subset(x_retain, args.calibration_images, gen)
        common.recalibrate_batchnorm(train_model, calibration_images, data.info, arch.input_size)
    # 4. Freeze the pruned model; add adapters (B = 0: its function is unchanged) and unfreeze the head.
    train_model = common.add_lora(train_model, **lora, train_head=args.lora_head)
    prep_time_s = time.perf_counter() - start

    # 5. Cross-entropy on Dr through the adapters; BatchNorm statistics stay frozen unless --update-bn.
    retain_batches = common.shuffled_batches(x_retain, y_retain, args.batch_size, gen)
    loss_fn = common.ce_loss(data.info, arch.input_size, args.augment, gen)
    optimizer = common.make_optimizer(args.optimizer, train_model.parameters(), args.lr, args.weight_decay)
    result = common.train_loop(train_model, optimizer, args.epochs, retain_batches, loss_fn, device=device,
                               desc=METHOD, freeze_bn=not args.update_bn, compile_mode=args.compile)

    # 6. Merge the adapters into the weights, masks kept: a plain model exactly as sparse as after pruning
    #    (with --shrink, written back into the pruned model).
    merged = common.merge_lora(train_model)
    model = common.expand_pruned(model, merged, arch.family) if args.shrink else merged
    saved = common.save_unlearned(model, out, method=METHOD, original=args.model, original_meta=meta, data=data,
                                  config=config, result=result, overwrite=args.overwrite,
                                  prep_time_s=prep_time_s, sparsity_after_pruning=sparsity_after_pruning)
    common.print_summary(saved, out)


if __name__ == "__main__":
    common.run_main(main)
