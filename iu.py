"""IU (influence unlearning): one Newton step from the trained weights towards the retain-only optimum,
theta += alpha * H^-1 v, with H the damped empirical Fisher of the retain loss (Unlearn-Sparse's baseline,
Jia et al. 2023, App. C; Koh & Liang's influence functions).

    v = (n_f / n) * (mean_grad(Df) - mean_grad(Dr)),    n = n_f + n_r

the scaling of the Unlearn-Sparse code. Where the full-data gradient is zero, mean_grad(Dr) =
-(n_f / n_r) mean_grad(Df) and v = -mean_grad(Dr): theta + H^-1 v is then the Newton step to the retain-only
optimum. H = damping * I + (1/m) G^T G over m per-sample retain gradients G (m x d), and H^-1 v is computed
exactly with the Woodbury identity (the batch form of the Sherman-Morrison recursion):

    H^-1 v = (v - G^T (m * damping * I + G G^T)^-1 G v) / damping

(The public code's recursion is a two-vector heuristic, not this.) Memory: G holds m x d floats.

    python iu.py --model model_weights/fashion-mnist_resnet_tiny_full_original_s0.safetensors --forget-class 3

prints the resolved config, then Acc(Df), Acc(Dr), test accuracy, cost and the output path.
"""

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

import common

METHOD = "iu"
FORGET_CLASS = 3  # the PruneLoRA paper's class (cat in CIFAR-10); --forget-random N forgets N random images
ALPHA = 1.0  # step size along H^-1 v (1 = the Newton step)
DAMPING = 0.3  # lambda in H = lambda I + G^T G / m; smaller = bigger steps (0.1 already wrecks resnet_tiny)
FISHER_SAMPLES = 1000  # per-sample retain gradients in G (Jia et al. 2023: ~1,000)
BATCH_SIZE = 256  # for the mean gradients
CHUNK = 64  # samples per vectorised per-sample-gradient call


def inverse_fisher_product(grads: torch.Tensor, v: torch.Tensor, damping: float) -> torch.Tensor:
    """(damping * I + grads^T grads / m)^-1 v, exactly, by the Woodbury identity; grads is m x d."""
    m = grads.shape[0]
    small = m * damping * torch.eye(m, dtype=grads.dtype, device=grads.device) + grads @ grads.T
    return (v - grads.T @ torch.linalg.solve(small, grads @ v)) / damping


def flat(grads: dict[str, torch.Tensor], names: list[str], per_sample: bool) -> torch.Tensor:
    parts = [grads[n].flatten(1) if per_sample else grads[n].flatten() for n in names]
    return torch.cat(parts, dim=-1)


def mean_gradient(model, x, y, info, input_size, batch_size, names):
    """Mean cross-entropy gradient over a set, accumulated batch by batch (eval mode)."""
    total = None
    for xb, yb in common.batches(x, y, batch_size):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(common.normalize(xb, info, input_size)), yb, reduction="sum").backward()
        g = flat({n: p.grad for n, p in model.named_parameters() if n in names}, names, per_sample=False)
        total = g if total is None else total + g
    return total / len(x)


def per_sample_gradients(model, x: torch.Tensor, y: torch.Tensor, loss_of_logits) -> dict[str, torch.Tensor]:
    """Gradient of loss_of_logits(logits_i, y_i) w.r.t. each trainable parameter, one per sample (torch.func).

    x is a normalised batch; the model should be in eval mode so BatchNorm uses its running statistics."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def sample_loss(params, xi, yi):
        return loss_of_logits(functional_call(model, (params, buffers), (xi.unsqueeze(0),)).squeeze(0), yi)

    return vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)


def main():
    parser = common.unlearn_parser(__doc__, forget_class=FORGET_CLASS)
    g = parser.add_argument_group("influence unlearning")
    g.add_argument("--alpha", type=common.positive_float, default=ALPHA, help="step size (default: %(default)s)")
    g.add_argument("--damping", type=common.positive_float, default=DAMPING, help="Fisher damping (default: %(default)s)")
    g.add_argument("--fisher-samples", type=common.positive_int, default=FISHER_SAMPLES, help="(default: %(default)s)")
    g.add_argument("--batch-size", type=common.positive_int, default=BATCH_SIZE, help="(default: %(default)s)")
    g.add_argument("--chunk", type=common.positive_int, default=CHUNK, help="(default: %(default)s)")
    args = parser.parse_args()

    # The original model, and its training split cut into this run's forget set Df and retain set Dr. IU moves
    # every weight in place, without training: a sparse (prune.py) model keeps its mask.
    device, gen = common.device_and_generator(args.device, seed=args.seed)
    model, meta, data = common.load_original(args.model, device, data_dir=args.data_dir, forget_class=args.forget_class,
                                             forget_random=args.forget_random, forget_seed=args.forget_seed)
    out = common.claim_output(args.out, out_dir=args.out_dir, data=data, arch=meta["arch"], method=METHOD,
                              seed=args.seed, overwrite=args.overwrite)
    info, input_size = data.info, common.ARCHS[meta["arch"]].input_size
    common.print_config(METHOD, vars(args))

    model.eval()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    x_forget, y_forget = data.subset("forget")
    x_retain, y_retain = data.subset("retain")
    clock = common.Stopwatch(device)

    # G: per-sample retain gradients, the empirical Fisher's factor.
    pick = torch.randperm(len(x_retain), device=x_retain.device, generator=gen)[:args.fisher_samples]
    per_sample = []
    for xb, yb in common.batches(x_retain[pick], y_retain[pick], args.chunk):
        grads = per_sample_gradients(model, common.normalize(xb, info, input_size), yb,
                                            lambda logits, label: F.cross_entropy(logits[None], label[None]))
        per_sample.append(flat(grads, names, per_sample=True))
    fisher_grads = torch.cat(per_sample)

    # The Newton step theta += alpha H^-1 v.
    g_forget = mean_gradient(model, x_forget, y_forget, info, input_size, args.batch_size, names)
    g_retain = mean_gradient(model, x_retain, y_retain, info, input_size, args.batch_size, names)
    v = len(x_forget) / (len(x_forget) + len(x_retain)) * (g_forget - g_retain)
    step = args.alpha * inverse_fisher_product(fisher_grads, v, args.damping)
    if not torch.isfinite(step).all():
        raise common.UserError("the influence step is not finite; raise --damping")
    with torch.no_grad():
        offset = 0
        for name, p in model.named_parameters():
            if name in names:
                p.add_(step[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
    result = clock.result(trainable_params=common.count_params(model)[0])

    saved = common.save_unlearned(model, out, method=METHOD, original=args.model, original_meta=meta, data=data,
                                  config=vars(args), result=result, overwrite=args.overwrite,
                                  extra=dict(step_norm=float(step.norm())))
    common.print_summary(saved, out)


if __name__ == "__main__":
    common.run_main(main)
