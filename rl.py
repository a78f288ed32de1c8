"""RL (random labels; Unlearn-Sparse / SalUn baseline, Jia et al. 2023, Sec. 5): each epoch, a shuffled pass
over Df with fresh random labels, then a shuffled pass over Dr with its own, cross-entropy throughout, as the SalUn
authors' Classification/unlearn/RL.py runs it for CIFAR-10 and SVHN (common.random_label_epoch). --mixed-pass
makes one shuffled pass over the union instead: their CIFAR-100 / TinyImageNet branch, and the RL.py of
Unlearn-Sparse. Labels are drawn uniformly over all classes as upstream does (so about 1/C of Df keeps its true
label; upstream draws them per batch, we per epoch: the same distribution); --wrong-labels-only excludes the true
label.

    python rl.py --model model_weights/fashion-mnist_resnet_tiny_full_original_s0.safetensors --forget-class 3

prints the resolved config, one JSON line per epoch, then Acc(Df), Acc(Dr), test accuracy, cost and the path.
Works on dense or sparse (prune.py) models, masks kept; --lora adapts through LoRA instead of all weights.
"""
import argparse
import time

import common

METHOD = "rl"
FORGET_CLASS = 3  # the PruneLoRA paper's class (cat in CIFAR-10); --forget-random N forgets N random images
# Unlearn-Sparse settings (Jia et al. 2023, App. C): SGD momentum 0.9, wd 5e-4, batch 256, augmentation.
EPOCHS = 10  # each: a Df pass with random labels, then a Dr pass (one mixed pass with --mixed-pass)
LR = 0.01
BATCH_SIZE = 256
OPTIMIZER = "sgd"
WEIGHT_DECAY = 5e-4
AUGMENT = True
WRONG_LABELS_ONLY = False  # upstream draws randint(0, C): a random label may equal the true one
MIXED_PASS = False  # False: a Df pass, then a Dr pass (upstream's CIFAR-10/SVHN order); True: one mixed pass
LORA = False  # True: train LoRA adapters + head instead of every weight


def main():
    parser = common.unlearn_parser(__doc__, forget_class=FORGET_CLASS)
    common.add_optim_args(parser, epochs=EPOCHS, lr=LR, batch_size=BATCH_SIZE, optimizer=OPTIMIZER,
                          weight_decay=WEIGHT_DECAY, augment=AUGMENT)
    parser.add_argument("--wrong-labels-only", action=argparse.BooleanOptionalAction, default=WRONG_LABELS_ONLY,
                        help="never relabel a Df image with its true class (default: %(default)s)")
    parser.add_argument("--mixed-pass", action=argparse.BooleanOptionalAction, default=MIXED_PASS,
                        help="one shuffled pass over Df and Dr together (upstream's CIFAR-100 order) instead of a "
                             "Df pass, then a Dr pass (default: %(default)s)")
    common.add_lora_args(parser, lora=LORA)
    args = parser.parse_args()

    # The original model, and its training split cut into this run's forget set Df and retain set Dr.
    device, gen = common.device_and_generator(args.device, seed=args.seed)
    model, meta, data = common.load_original(args.model, device, data_dir=args.data_dir, forget_class=args.forget_class,
                                             forget_random=args.forget_random, forget_seed=args.forget_seed)
    out = common.claim_output(args.out, out_dir=args.out_dir, data=data, arch=meta["arch"], method=METHOD,
                              seed=args.seed, overwrite=args.overwrite)
    arch = common.ARCHS[meta["arch"]]
    lora = common.lora_settings(arch.family, rank=args.lora_rank, alpha=args.lora_alpha,
                                dropout=args.lora_dropout, targets=args.lora_targets) if args.lora else None
    config = dict(vars(args), lora_settings=lora)
    common.print_config(METHOD, config)

    # Optionally, adapt through LoRA instead of updating every weight.
    start = time.perf_counter()
    if args.lora:
        model = common.add_lora(model, **lora, train_head=args.lora_head)
    prep_time_s = time.perf_counter() - start

    # Each epoch: Df with fresh random labels, then Dr (or the two mixed); cross-entropy throughout.
    forget, retain = data.subset("forget"), data.subset("retain")
    optimizer = common.make_optimizer(args.optimizer, model.parameters(), args.lr, args.weight_decay)
    result = common.train_loop(
        model, optimizer, args.epochs,
        lambda epoch: common.random_label_epoch(forget, retain, num_classes=data.info.num_classes,
                                                batch_size=args.batch_size, gen=gen,
                                                wrong_only=args.wrong_labels_only, mixed=args.mixed_pass),
        common.ce_loss(data.info, arch.input_size, args.augment, gen), device=device, desc=METHOD,
        freeze_bn=args.lora and not args.update_bn, compile_mode=args.compile)

    model = common.merge_lora(model) if args.lora else model
    saved = common.save_unlearned(model, out, method=METHOD, original=args.model, original_meta=meta, data=data,
                                  config=config, result=result, overwrite=args.overwrite, prep_time_s=prep_time_s)
    common.print_summary(saved, out)


if __name__ == "__main__":
    common.run_main(main)
