"""FF (Fisher forgetting): add Gaussian noise scaled by the inverse diagonal Fisher information of the retain
loss, so weights that matter little for Dr (and so mostly encode Df) are scrambled (Golatkar et al. 2020; the
Unlearn-Sparse baseline, Jia et al. 2023, as its unlearn/fisher.py `fisher_new` runs it). No training loop:
one Fisher estimate, one noise draw, for any dataset and class count (upstream hard-codes CIFAR-10 cases).

    F_j   = mean over batches of Dr (eval mode) of  sum_y mean_batch(p_y) * (d CE_batch(y) / d theta_j)^2
            (each batch augmented as the original was trained: upstream's retain loader carries the training
            transform, main_forget.py and dataset.py)
    var_j = alpha * min(1 / (F_j + eps), 1e3)       (1e2 for the classifier head)
            averaged over each output row's inputs for matrices and kernels, x10 for the head and 1-D params
    theta_j += sqrt(var_j) * N(0, 1)

Class-wise, the forgotten class's head row is reset to 0 with variance 1e-3 (upstream: 1e-4, then x10).
The Fisher's batches are augmented when the original's recipe augmented (--no-fisher-augment: never). Measured on
a 4,000-image Fashion-MNIST resnet_tiny trained with augmentation (alpha 1e-6, seeds 0-2, mean ± sd): the Fisher
barely moves (sum 0.94x, median 1.00x), and so neither do the rows: class 3 Avg Gap 0.22 ± 0.06 augmented, 0.14 ±
0.10 plain; random 300 0.89 ± 0.70 and 0.38 ± 0.11 (one noise draw of three cost 3 points of RA). The CPU
profiles' originals train without augmentation: their FF rows are unchanged.
On a pruned model only the surviving weights move (the mask multiplies the noisy weight).

    python ff.py --model model_weights/fashion-mnist_resnet_tiny_full_original_s0.safetensors --forget-class 3

prints the resolved config, the Fisher estimate's time, then Acc(Df), Acc(Dr), test accuracy, cost and the path.
"""
import argparse

import torch
import torch.nn.functional as F

import common

METHOD = "ff"
FORGET_CLASS = 3  # the PruneLoRA paper's class (cat in CIFAR-10); --forget-random N forgets N random images
ALPHA = 1e-6  # noise scale; Golatkar et al. use 1e-6..1e-8
EPS = 1e-8
MAX_VAR = 1e3  # clamp on 1 / (F + eps) before alpha: weights with ~zero Fisher would get unbounded noise
MAX_VAR_HEAD = 1e2  # the classifier head's tighter clamp (upstream)
SCALE_HEAD_AND_1D = 10.0  # upstream multiplies the variance of the head and of every 1-D parameter (BN) by 10
FORGET_ROW_VAR = 1e-4  # class-wise: the forgotten class's head row becomes N(0, 1e-4 x 10)
FISHER_BATCH = 32  # upstream estimates the Fisher from batch-mean gradients of batches of 32
FISHER_SAMPLES = 0  # retain images the Fisher is estimated on; 0 = all of Dr (upstream)
FISHER_AUGMENT = None  # augment the Fisher's batches; None = as the original's recipe did (upstream)
ZERO_FORGET_HEAD = True  # Golatkar et al.'s class-wise reset of the forgotten class's output row


def retain_fisher(model, x, info, input_size, batch_size, augment_gen: torch.Generator | None = None):
    """Upstream's diagonal Fisher: per batch and class y, mean_batch(p_y) * (grad of the batch-mean CE to y)^2.
    augment_gen: augment each batch as in training, drawing from that generator."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    n_batches = 0
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size]
        if augment_gen is not None:
            xb = common.augment(xb, info, augment_gen)
        logits = model(common.normalize(xb, info, input_size)).float()
        probs = F.softmax(logits.detach(), 1)
        for c in range(info.num_classes):
            target = torch.full((len(logits),), c, device=logits.device)
            grads = torch.autograd.grad(F.cross_entropy(logits, target), list(params.values()), retain_graph=True)
            for f, g in zip(fisher.values(), grads):
                f += probs[:, c].mean() * g.pow(2)
        n_batches += 1
    return {n: f / n_batches for n, f in fisher.items()}


def noise_variance(fisher: torch.Tensor, alpha: float, eps: float, is_head: bool) -> torch.Tensor:
    """Upstream's get_mean_var variance for one parameter tensor."""
    var = alpha * (1 / (fisher + eps)).clamp(max=MAX_VAR_HEAD if is_head else MAX_VAR)
    if var.ndim > 1:
        var = var.mean(dim=1, keepdim=True).expand_as(var).clone()
    if is_head or var.ndim == 1:
        var = var * SCALE_HEAD_AND_1D
    return var


def main():
    parser = common.unlearn_parser(__doc__, forget_class=FORGET_CLASS)
    g = parser.add_argument_group("Fisher forgetting")
    g.add_argument("--alpha", type=common.positive_float, default=ALPHA, help="noise scale (default: %(default)s)")
    g.add_argument("--eps", type=common.positive_float, default=EPS, help="added to the Fisher (default: %(default)s)")
    g.add_argument("--fisher-batch", type=common.positive_int, default=FISHER_BATCH, help="(default: %(default)s)")
    g.add_argument("--fisher-samples", type=common.non_negative_int, default=FISHER_SAMPLES,
                   help="Dr images for the Fisher; 0 = all (default: %(default)s)")
    g.add_argument("--fisher-augment", action=argparse.BooleanOptionalAction, default=FISHER_AUGMENT,
                   help="augment the Fisher's batches (default: as the original was trained)")
    g.add_argument("--zero-forget-head", action=argparse.BooleanOptionalAction, default=ZERO_FORGET_HEAD,
                   help="class-wise: reset the forgotten class's head row (default: %(default)s)")
    args = parser.parse_args()

    # The original model, and its training split cut into this run's forget set Df and retain set Dr. FF moves
    # every weight in place, without training: a sparse (prune.py) model keeps its mask.
    device, gen = common.device_and_generator(args.device, seed=args.seed)
    model, meta, data = common.load_original(args.model, device, data_dir=args.data_dir, forget_class=args.forget_class,
                                             forget_random=args.forget_random, forget_seed=args.forget_seed)
    out = common.claim_output(args.out, out_dir=args.out_dir, data=data, arch=meta["arch"], method=METHOD,
                              seed=args.seed, overwrite=args.overwrite)
    if args.fisher_augment is None:
        args.fisher_augment = meta["config"].get("augment", True)
    common.print_config(METHOD, vars(args))

    # The retain loss's diagonal Fisher, then one draw of noise scaled by its inverse.
    model.eval()
    x_retain, _ = data.subset("retain")
    if args.fisher_samples:
        x_retain = common.random_subset(x_retain, args.fisher_samples, gen)
    clock = common.Stopwatch(device)
    fisher = retain_fisher(model, x_retain, data.info, common.ARCHS[meta["arch"]].input_size, args.fisher_batch,
                           augment_gen=gen if args.fisher_augment else None)
    head = common.classifier_name(model) + "."
    forget_row = data.forget_class if args.zero_forget_head else None
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in fisher:
                continue
            var = noise_variance(fisher[name], args.alpha, args.eps, name.startswith(head))
            if name.startswith(head) and forget_row is not None:
                p[forget_row] = 0.0
                var[forget_row] = FORGET_ROW_VAR * SCALE_HEAD_AND_1D
            p.add_(var.sqrt() * torch.randn(p.shape, device=p.device, generator=gen))
    result = clock.result(trainable_params=common.count_params(model)[0])

    saved = common.save_unlearned(model, out, method=METHOD, original=args.model, original_meta=meta, data=data,
                                  config=vars(args), result=result, overwrite=args.overwrite)
    common.print_summary(saved, out)


if __name__ == "__main__":
    common.run_main(main)
