"""SSD (selective synaptic dampening; Foster et al. 2024, Sec. 3): no training. Each weight's importance is the
mean over batches of its squared batch-mean cross-entropy gradient, once on Df (I_f) and once on the whole
training split (I_D). Weights much more important to Df than to the data as a whole, I_f > alpha * I_D, are
dampened: theta <- theta * min(lambda * I_D / I_f, 1). As the authors' src/ssd.py: eval mode, batch 128,
every parameter (convs, BatchNorm affines, head).

    python ssd.py --model model_weights/fashion-mnist_resnet_tiny_full_original_s0.safetensors --forget-class 3

prints the resolved config, then Acc(Df), Acc(Dr), test accuracy, cost and the path.
Works on dense or sparse (prune.py) models: dampening multiplies, so a pruned weight stays zero. There is no
--lora: SSD changes no weight through training, and fresh adapters (B = 0) have nothing to dampen; it dampens
the weights of whatever model it is given, a merged LoRA checkpoint included.
The importances depend on the batch size (squares of batch means, not a per-sample Fisher), as upstream.
"""

import torch

import common

METHOD = "ssd"
FORGET_CLASS = 3  # the PruneLoRA paper's class (cat in CIFAR-10); --forget-random N forgets N random images
# The authors' defaults (Foster et al. 2024, Sec. 4): lambda 1, alpha 10 (5 for their ViT class-wise runs),
# batch 128.
DAMPENING = 1.0  # lambda
SELECTION = 10.0  # alpha
BATCH_SIZE = 128


def importance(model, x, y, info, input_size, batch_size: int) -> dict[str, torch.Tensor]:
    """{name: mean over batches of the squared gradient of the batch-mean cross-entropy}."""
    total, n_batches = None, 0
    for grads in common.batch_gradients(model, x, y, info, input_size, batch_size=batch_size):
        squares = {n: g.float().pow(2) for n, g in grads.items()}
        total = squares if total is None else {n: t + squares[n] for n, t in total.items()}
        n_batches += 1
    return {n: t / n_batches for n, t in total.items()}


@torch.no_grad()
def dampen(model, forget_importance: dict, data_importance: dict, *, dampening: float, selection: float) -> int:
    """Scale every weight with I_f > selection * I_D by min(dampening * I_D / I_f, 1); return how many were."""
    changed = 0
    for name, p in model.named_parameters():
        if name not in forget_importance:
            continue
        i_f, i_d = forget_importance[name], data_importance[name]
        selected = i_f > selection * i_d
        factor = (dampening * i_d / i_f).clamp(max=1.0)
        p.copy_(torch.where(selected, p * factor.to(p.dtype), p))
        changed += int(selected.sum())
    return changed


def main():
    parser = common.unlearn_parser(__doc__, forget_class=FORGET_CLASS)
    g = parser.add_argument_group("SSD")
    g.add_argument("--dampening", type=common.positive_float, default=DAMPENING,
                   help="lambda: strength of the dampening (default: %(default)s)")
    g.add_argument("--selection", type=common.positive_float, default=SELECTION,
                   help="alpha: how much more a weight must matter to Df than to all data (default: %(default)s)")
    g.add_argument("--batch-size", type=common.positive_int, default=BATCH_SIZE,
                   help="batch of the importance estimates (default: %(default)s)")
    args = parser.parse_args()

    # The original model, and its training split cut into this run's forget set Df and retain set Dr.
    device, gen = common.device_and_generator(args.device, seed=args.seed)
    model, meta, data = common.load_original(args.model, device, data_dir=args.data_dir, forget_class=args.forget_class,
                                             forget_random=args.forget_random, forget_seed=args.forget_seed)
    out = common.claim_output(args.out, out_dir=args.out_dir, data=data, arch=meta["arch"], method=METHOD,
                              seed=args.seed, overwrite=args.overwrite)
    input_size = common.ARCHS[meta["arch"]].input_size
    common.print_config(METHOD, vars(args))

    # The two importances, then one dampening step.
    clock = common.Stopwatch(device)
    forget_importance = importance(model, *data.subset("forget"), data.info, input_size, args.batch_size)
    data_importance = importance(model, *data.subset("train"), data.info, input_size, args.batch_size)
    dampened = dampen(model, forget_importance, data_importance, dampening=args.dampening, selection=args.selection)
    result = clock.result(trainable_params=dampened)

    saved = common.save_unlearned(model, out, method=METHOD, original=args.model, original_meta=meta, data=data,
                                  config=vars(args), result=result, overwrite=args.overwrite)
    common.print_summary(saved, out)


if __name__ == "__main__":
    common.run_main(main)
