"""l1-sparse: fine-tune on Dr with cross-entropy plus a_t * sum|theta|, a_t decaying linearly from --alpha to 0
over the run (Unlearn-Sparse's sparsity-aware unlearning, Jia et al. 2023, Sec. 4).

    python l1sparse.py --model model_weights/fashion-mnist_resnet_tiny_full_original_s0.safetensors --forget-class 3

prints the resolved config, one JSON line per epoch, then Acc(Df), Acc(Dr), test accuracy, cost and the path.
The penalty covers the trained parameters (all of them, or the adapters + head with --lora).

The decay is per step, a deliberate deviation: Unlearn-Sparse's code (unlearn/FT.py, FT_iter, --no-l1-epochs 0)
holds a_e = alpha * (1 - e / E) through epoch e = 0..E-1, a staircase whose last epoch still carries alpha / E;
here a_t falls smoothly to 0, so over a run the mean weight is alpha / 2 against their alpha (E + 1) / (2E)
(0.55 alpha at E = 10). The validation choice of --alpha absorbs the difference.
"""
import time

import common

METHOD = "l1sparse"
FORGET_CLASS = 3  # the PruneLoRA paper's class (cat in CIFAR-10); --forget-random N forgets N random images
# Unlearn-Sparse settings (Jia et al. 2023, App. C): SGD momentum 0.9, wd 5e-4, batch 256, augmentation, lr 0.01,
# 10 epochs.
EPOCHS = 10
LR = 0.01
BATCH_SIZE = 256
OPTIMIZER = "sgd"
WEIGHT_DECAY = 5e-4
AUGMENT = True
ALPHA = 5e-5  # the public default 0.2 swamps the loss of an 11M-parameter net; 1e-5..1e-4 is the useful range
LORA = False  # True: train LoRA adapters + head instead of every weight


def main():
    parser = common.unlearn_parser(__doc__, forget_class=FORGET_CLASS)
    common.add_optim_args(parser, epochs=EPOCHS, lr=LR, batch_size=BATCH_SIZE, optimizer=OPTIMIZER,
                          weight_decay=WEIGHT_DECAY, augment=AUGMENT)
    parser.add_argument("--alpha", type=common.non_negative_float, default=ALPHA,
                        help="initial L1 weight a_0 (default: %(default)s)")
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

    # Cross-entropy on Dr plus a_t * sum |theta| over the trained parameters, a_t falling linearly to 0.
    x_retain, y_retain = data.subset("retain")
    ce = common.ce_loss(data.info, arch.input_size, args.augment, gen)
    penalised = [p for p in model.parameters() if p.requires_grad]
    total_steps = args.epochs * -(-len(x_retain) // args.batch_size)
    step = 0

    def loss_fn(model, batch):
        nonlocal step
        alpha_t = args.alpha * (1 - step / total_steps)
        step += 1
        return ce(model, batch) + alpha_t * sum(p.abs().sum() for p in penalised)

    optimizer = common.make_optimizer(args.optimizer, model.parameters(), args.lr, args.weight_decay)
    result = common.train_loop(model, optimizer, args.epochs,
                               common.shuffled_batches(x_retain, y_retain, args.batch_size, gen), loss_fn,
                               device=device, desc=METHOD, freeze_bn=args.lora and not args.update_bn,
                               compile_mode=args.compile)

    model = common.merge_lora(model) if args.lora else model
    saved = common.save_unlearned(model, out, method=METHOD, original=args.model, original_meta=meta, data=data,
                                  config=config, result=result, overwrite=args.overwrite, prep_time_s=prep_time_s)
    common.print_summary(saved, out)


if __name__ == "__main__":
    common.run_main(main)
