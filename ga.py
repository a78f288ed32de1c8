"""GA: gradient ascent on the forget set, i.e. minimise -CE on Df (Unlearn-Sparse baseline).

Dr is never used, so nothing holds the retained classes in place: GA forgets fast and cheaply but easily
wrecks the model, and it diverges at large learning rates (the run then stops with an error, nothing written).

    python ga.py --model model_weights/fashion-mnist_resnet_tiny_full_original_s0.safetensors --forget-class 3

prints the resolved config, one JSON line per epoch, then Acc(Df), Acc(Dr), test accuracy, cost and the path.
Works on dense or sparse (prune.py) models, masks kept; --lora adapts through LoRA instead of all weights.
"""
import time

import common

METHOD = "ga"
FORGET_CLASS = 3  # the PruneLoRA paper's class (cat in CIFAR-10); --forget-random N forgets N random images
# Unlearn-Sparse settings (Jia et al. 2023, App. C): SGD momentum 0.9, wd 5e-4, batch 256, augmentation, 5 epochs.
EPOCHS = 5
LR = 1e-4  # the Unlearn-Sparse README's value; its maintainers later advised 5e-4..1e-3 (README: what works here)
BATCH_SIZE = 256
OPTIMIZER = "sgd"
WEIGHT_DECAY = 5e-4
AUGMENT = True
LORA = False  # True: train LoRA adapters + head instead of every weight


def main():
    parser = common.unlearn_parser(__doc__, forget_class=FORGET_CLASS)
    common.add_optim_args(parser, epochs=EPOCHS, lr=LR, batch_size=BATCH_SIZE, optimizer=OPTIMIZER,
                          weight_decay=WEIGHT_DECAY, augment=AUGMENT)
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

    # Gradient ascent: minimise the negated cross-entropy on Df.
    x_forget, y_forget = data.subset("forget")
    ce = common.ce_loss(data.info, arch.input_size, args.augment, gen)
    optimizer = common.make_optimizer(args.optimizer, model.parameters(), args.lr, args.weight_decay)
    result = common.train_loop(model, optimizer, args.epochs,
                               common.shuffled_batches(x_forget, y_forget, args.batch_size, gen),
                               lambda model, batch: -ce(model, batch), device=device, desc=METHOD,
                               freeze_bn=args.lora and not args.update_bn, compile_mode=args.compile)

    model = common.merge_lora(model) if args.lora else model
    saved = common.save_unlearned(model, out, method=METHOD, original=args.model, original_meta=meta, data=data,
                                  config=config, result=result, overwrite=args.overwrite, prep_time_s=prep_time_s)
    common.print_summary(saved, out)


if __name__ == "__main__":
    common.run_main(main)
