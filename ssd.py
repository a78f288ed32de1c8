"""SSD (selective synaptic dampening; Foster et al. 2024, Sec. 3): no training. Each weight's importance is the
mean over batches of its squared batch-mean cross-entropy gradient, once on Df (I_f) and once on the whole
training split (I_D). Weights much more important to Df than to the data as a whole, I_f > alpha * I_D, are
dampened: theta <- theta * min(lambda * I_D / I_f, 1). As the authors' src/ssd.py: eval mode, every parameter
(convs, BatchNorm affines, head), and their loaders (forget_full_class_main.py, forget_random_main.py):
class-wise, batches of 64 over Df and over a full-data set built class by class (Dr's classes in order, then Df),
not shuffled, so nearly every batch holds one class and I_D carries each class's mean gradient; random-sample,
batches of 128 over Df and over Dr then Df.

    python ssd.py --model model_weights/fashion-mnist_resnet_tiny_full_original_s0.safetensors --forget-class 3

--mixed-batches computes I_D on the training split in its own order (classes mixed in every batch), batches of
128 for both kinds: this script's behaviour before it followed upstream's class-wise loader. With one class per
batch a class's gradients no longer average out against the others', so I_D is larger and fewer weights pass
alpha. Measured on a resnet_tiny original (4,000 Fashion-MNIST images, 6 epochs; class 3): at alpha 10 upstream's
order dampens 858 weights (Acc(Df) 88%, Acc(Dr) 82%), the mixed one 111,540 (Acc(Dr) 11%: the model is gone);
upstream's order forgets the class at alpha 7 (Acc(Df) 0%, Acc(Dr) 82.5%), the mixed one keeps Acc(Dr) 53% at
best (alpha 100, of 10, 30 and 100). So alpha values do not carry over between the two.
--loss-free is LF-SSD (Foster et al. 2024, "Loss-Free Machine Unlearning", ICLR Tiny Papers): no labels; the
importance of a weight is the mean over batches of the absolute gradient of the batch mean of ||f(x)||^2 (the
squared l2 norm of the logits), as the authors' label-free importance (if-loops/towards_poison_unlearning,
src/utils.py, ParameterPerturber.calc_importance, its "original" branch); alpha and lambda as SSD's.

prints the resolved config, then Acc(Df), Acc(Dr), test accuracy, cost and the path.
Works on dense or sparse (prune.py) models: dampening multiplies, so a pruned weight stays zero. There is no
--lora: SSD changes no weight through training, and fresh adapters (B = 0) have nothing to dampen; it dampens
the weights of whatever model it is given, a merged LoRA checkpoint included.
The importances depend on the batch size and on which images share a batch (squares of batch means, not a
per-sample Fisher), as upstream.
"""

import torch
import torch.nn.functional as F

import common

METHOD = "ssd"
LOSS_FREE_METHOD = "lf-ssd"  # --loss-free
FORGET_CLASS = 3  # the PruneLoRA paper's class (cat in CIFAR-10); --forget-random N forgets N random images
# The authors' defaults (Foster et al. 2024, Sec. 4): lambda 1, alpha 10 (5 for their ViT class-wise runs);
# their loaders' batch sizes: 64 class-wise (forget_full_class_main.py -b), 128 random-sample (forget_random_main.py).
DAMPENING = 1.0  # lambda
SELECTION = 10.0  # alpha
BATCH_SIZE = {"class": 64, "random": 128, "mixed": 128}  # mixed: --mixed-batches, this script's earlier default


def output_norm(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """LF-SSD's label-free objective: the batch mean of the squared l2 norm of the logits (labels unused)."""
    return logits.norm(dim=1).pow(2).mean()


def importance(model, x, y, info, input_size, batch_size: int, *, loss_free: bool = False) -> dict[str, torch.Tensor]:
    """{name: mean over batches of the squared gradient of the batch-mean cross-entropy}; loss_free: of the
    absolute gradient of output_norm (LF-SSD)."""
    total, n_batches = None, 0
    objective = output_norm if loss_free else F.cross_entropy
    for grads in common.batch_gradients(model, x, y, info, input_size, batch_size=batch_size, objective=objective):
        terms = {n: g.float().abs() if loss_free else g.float().pow(2) for n, g in grads.items()}
        total = terms if total is None else {n: t + terms[n] for n, t in total.items()}
        n_batches += 1
    return {n: t / n_batches for n, t in total.items()}


def full_data(data: common.Data, *, mixed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The images of I_D in upstream's loader order: Dr (class by class for class-wise forgetting, each class in
    split order), then Df; mixed: the training split in its own order."""
    if mixed:
        return data.subset("train")
    retain = data.retain
    if data.forget_class is not None:
        retain = retain[torch.sort(data.y_train[retain], stable=True).indices]
    order = torch.cat([retain, data.forget])
    return data.x_train[order], data.y_train[order]


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
    g.add_argument("--batch-size", type=common.positive_int, default=None,
                   help=f"batch of the importance estimates (default: {BATCH_SIZE['class']} class-wise, "
                        f"{BATCH_SIZE['random']} random-sample; {BATCH_SIZE['mixed']} with --mixed-batches)")
    g.add_argument("--mixed-batches", action="store_true",
                   help="I_D over the training split in its own order, classes mixed in every batch")
    g.add_argument("--loss-free", action="store_true",
                   help="LF-SSD: importances from the gradient of the squared l2 norm of the output, no labels")
    args = parser.parse_args()
    if args.batch_size is None:
        args.batch_size = BATCH_SIZE["mixed" if args.mixed_batches else "random" if args.forget_random else "class"]

    method = LOSS_FREE_METHOD if args.loss_free else METHOD

    # The original model, and its training split cut into this run's forget set Df and retain set Dr.
    device, gen = common.device_and_generator(args.device, seed=args.seed)
    model, meta, data = common.load_original(args.model, device, data_dir=args.data_dir, forget_class=args.forget_class,
                                             forget_random=args.forget_random, forget_seed=args.forget_seed)
    out = common.claim_output(args.out, out_dir=args.out_dir, data=data, arch=meta["arch"], method=method,
                              seed=args.seed, overwrite=args.overwrite)
    input_size = common.ARCHS[meta["arch"]].input_size
    common.print_config(method, vars(args))

    # The two importances, then one dampening step.
    clock = common.Stopwatch(device)
    forget_importance = importance(model, *data.subset("forget"), data.info, input_size, args.batch_size,
                                   loss_free=args.loss_free)
    data_importance = importance(model, *full_data(data, mixed=args.mixed_batches), data.info, input_size,
                                 args.batch_size, loss_free=args.loss_free)
    dampened = dampen(model, forget_importance, data_importance, dampening=args.dampening, selection=args.selection)
    result = clock.result(trainable_params=dampened)

    saved = common.save_unlearned(model, out, method=method, original=args.model, original_meta=meta, data=data,
                                  config=vars(args), result=result, overwrite=args.overwrite)
    common.print_summary(saved, out)


if __name__ == "__main__":
    common.run_main(main)
