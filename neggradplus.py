"""NegGrad+ (Kurmanji et al. 2023, Sec. 5): each step descends beta * CE on a Dr batch minus (1 - beta) * CE on a
Df batch, Df cycled so that an epoch is one pass over Dr, as the authors' helper/loops.py (train_negrad) runs it.
Unlike GA, the retain term holds the retained classes in place.

    python neggradplus.py --model model_weights/fashion-mnist_resnet_tiny_full_original_s0.safetensors --forget-class 3

prints the resolved config, one JSON line per epoch, then Acc(Df), Acc(Dr), test accuracy, cost and the path.
Works on dense or sparse (prune.py) models, masks kept; --lora adapts through LoRA instead of all weights.
Df is reshuffled on every pass (upstream's itertools.cycle replays its first pass's batches).
"""
import itertools
import time

import torch

import common

METHOD = "neggradplus"
FORGET_CLASS = 3  # the PruneLoRA paper's class (cat in CIFAR-10); --forget-random N forgets N random images
# The authors' code (meghdadk/SCRUB, small-scale): plain SGD (no momentum, no decay), lr 0.01, 5 epochs, Dr batch
# 32, Df batch 16, beta 0.9999. The paper's values differ; reproduce.py tunes beta on the validation split.
EPOCHS = 5
LR = 0.01
BATCH_SIZE = 32  # Dr
FORGET_BATCH_SIZE = 16  # Df
OPTIMIZER = "sgd"
MOMENTUM = 0.0
WEIGHT_DECAY = 0.0
AUGMENT = False  # the paper does not state it; off, as the PruneLoRA recipes
BETA = 0.9999  # weight of the retain term; 1 - BETA weighs the forget term
LORA = False  # True: train LoRA adapters + head instead of every weight


def retain_forget_pairs(retain: tuple, forget: tuple, *, batch_size: int, forget_batch_size: int,
                        gen: torch.Generator):
    """One epoch: each shuffled Dr batch with the next Df batch, Df reshuffled whenever it runs out."""
    forget_stream = (batch for _ in itertools.count()
                     for batch in common.batches(*forget, forget_batch_size, shuffle=True, gen=gen))
    for retain_batch in common.batches(*retain, batch_size, shuffle=True, gen=gen):
        yield retain_batch, next(forget_stream)


def neggradplus_loss(ce, beta: float):
    """The loss of one step's (Dr batch, Df batch) pair: beta * CE(Dr batch) - (1 - beta) * CE(Df batch)."""
    return lambda model, batch: beta * ce(model, batch[0]) - (1 - beta) * ce(model, batch[1])


def main():
    parser = common.unlearn_parser(__doc__, forget_class=FORGET_CLASS)
    common.add_optim_args(parser, epochs=EPOCHS, lr=LR, batch_size=BATCH_SIZE, optimizer=OPTIMIZER,
                          weight_decay=WEIGHT_DECAY, augment=AUGMENT)
    g = parser.add_argument_group("NegGrad+")
    g.add_argument("--momentum", type=common.unit_fraction, default=MOMENTUM,
                   help="SGD momentum (default: %(default)s)")
    g.add_argument("--forget-batch-size", type=common.positive_int, default=FORGET_BATCH_SIZE,
                   help="(default: %(default)s)")
    g.add_argument("--beta", type=common.unit_fraction, default=BETA,
                   help="weight of the retain loss; 1 - beta weighs the negated forget loss (default: %(default)s)")
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

    # One Dr batch and one Df batch per step.
    forget, retain = data.subset("forget"), data.subset("retain")
    ce = common.ce_loss(data.info, arch.input_size, args.augment, gen)
    optimizer = common.make_optimizer(args.optimizer, model.parameters(), args.lr, args.weight_decay,
                                      momentum=args.momentum)
    result = common.train_loop(
        model, optimizer, args.epochs,
        lambda epoch: retain_forget_pairs(retain, forget, batch_size=args.batch_size,
                                          forget_batch_size=args.forget_batch_size, gen=gen),
        neggradplus_loss(ce, args.beta),
        device=device, desc=METHOD, freeze_bn=args.lora and not args.update_bn, compile_mode=args.compile)

    model = common.merge_lora(model) if args.lora else model
    saved = common.save_unlearned(model, out, method=METHOD, original=args.model, original_meta=meta, data=data,
                                  config=config, result=result, overwrite=args.overwrite, prep_time_s=prep_time_s)
    common.print_summary(saved, out)


if __name__ == "__main__":
    common.run_main(main)
