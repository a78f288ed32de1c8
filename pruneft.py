"""Prune+FT: prune 50% of each conv (ResNet) or block linear layer (ViT) by L2-norm structured pruning of
whole output filters/rows, re-estimate BatchNorm statistics on Dr, then fine-tune all remaining weights on Dr
with cross-entropy (finetune.py's update). The mask is kept: the saved model is exactly as sparse as right
after pruning, and the head is never pruned. --allow-regrowth drops the mask first, as the seed code did.
--shrink trains a physically smaller network with the same outputs (common.shrink_pruned) and writes it back.

    python pruneft.py --model model_weights/fashion-mnist_resnet_tiny_full_original_s0.safetensors --forget-class 3
"""
import time

import common

METHOD = "pruneft"
FORGET_CLASS = 3  # the PruneLoRA paper's class (cat in CIFAR-10); --forget-random N forgets N random images
# The PruneLoRA paper's settings (arXiv 2411.11907, Sec. 3): pruning, then finetune.py's update.
PRUNE = "l2-structured"  # L2-norm structured pruning, per layer
SPARSITY = 0.5  # half of the output filters/rows of every pruned layer
EPOCHS = 5
LR = 1e-3
BATCH_SIZE = 128
OPTIMIZER = "adam"
WEIGHT_DECAY = 0.0
AUGMENT = False
SHRINK = False  # train without the pruned filters: the same update to rounding, 0.5-0.75x the step time


def main():
    parser = common.unlearn_parser(__doc__, forget_class=FORGET_CLASS)
    common.add_prune_args(parser, method=PRUNE, sparsity=SPARSITY, shrink=SHRINK)
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
    common.print_config(METHOD, vars(args))
    x_retain, y_retain = data.subset("retain")

    # Prune; the dense model's BatchNorm statistics no longer describe the pruned layers, so re-estimate them
    # (with --shrink on the copy that trains: the same statistics, from a cheaper forward).
    start = time.perf_counter()
    common.prune_model(model, arch.family, args.prune, args.sparsity)
    if args.allow_regrowth:
        common.allow_regrowth(model)
    sparsity_after_pruning = common.sparsity(model, arch.family)
    # Optionally train a copy without the pruned filters and the inputs they feed (their constant outputs kept).
    train_model = common.shrink_pruned(model, arch.family) if args.shrink else model
    if args.recalibrate_bn and not args.allow_regrowth:
        calibration_images = common.random_subset(x_retain, args.calibration_images, gen)
        common.recalibrate_batchnorm(train_model, calibration_images, data.info, arch.input_size)
    prep_time_s = time.perf_counter() - start

    # Cross-entropy on Dr, every surviving weight trained (the mask holds the pruned ones at zero).
    retain_batches = common.shuffled_batches(x_retain, y_retain, args.batch_size, gen)
    loss_fn = common.ce_loss(data.info, arch.input_size, args.augment, gen)
    optimizer = common.make_optimizer(args.optimizer, train_model.parameters(), args.lr, args.weight_decay)
    result = common.train_loop(train_model, optimizer, args.epochs, retain_batches, loss_fn, device=device,
                               desc=METHOD, compile_mode=args.compile)
    if args.shrink:
        common.expand_pruned(model, train_model, arch.family)

    saved = common.save_unlearned(model, out, method=METHOD, original=args.model, original_meta=meta, data=data,
                                  config=vars(args), result=result, overwrite=args.overwrite,
                                  prep_time_s=prep_time_s, sparsity_after_pruning=sparsity_after_pruning)
    common.print_summary(saved, out)


if __name__ == "__main__":
    common.run_main(main)
