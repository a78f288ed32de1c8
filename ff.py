"""FF (Fisher forgetting): add Gaussian noise scaled by the inverse diagonal Fisher information of the retain
loss, so weights that matter little for Dr (and so mostly encode Df) are scrambled (Golatkar et al.; the
Unlearn-Sparse baseline, REFERENCE §4). No training loop: one Fisher estimate, one noise draw.

    F_j = mean over retain samples x of  sum_y p(y|x) * (d log p(y|x) / d theta_j)^2
    theta_j += sqrt(min(alpha / (F_j + eps), max_var)) * N(0, 1)

computed the same way for any dataset and class count. On a pruned model only the surviving weights move.

    python ff.py --model model_weights/fashion-mnist_resnet_tiny_full_original_s0.safetensors --forget-class 3

prints the resolved config, the Fisher estimate's time, then Acc(Df), Acc(Dr), test accuracy, cost and the path.
"""
import argparse
import time

import torch
import torch.nn.functional as F

import common

ALPHA = 1e-6  # noise scale; Golatkar et al. use 1e-6..1e-8 (README: what this does on our models)
EPS = 1e-8
MAX_VAR = 1e-3  # clamp on the noise variance: weights with ~zero Fisher would otherwise get unbounded noise
FISHER_SAMPLES = 1000  # retain images the Fisher is estimated on
CHUNK = 64  # samples per vectorised per-sample-gradient call
ZERO_FORGET_HEAD = True  # Golatkar et al.'s public code zeroes the forgotten class's classifier row (class-wise)


def sample_cross_entropy(logits, label):
    return F.cross_entropy(logits.unsqueeze(0), label.unsqueeze(0))


def retain_fisher(model, x, info, input_size, chunk):
    """Diagonal Fisher of the retain loss: sum over classes of p_y * (grad log p_y)^2, averaged over samples."""
    fisher = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    for start in range(0, len(x), chunk):
        batch = common.normalize(x[start:start + chunk], info, input_size)
        with torch.no_grad():
            probs = F.softmax(model(batch).float(), 1)
        for c in range(info.num_classes):
            target = torch.full((len(batch),), c, device=batch.device)
            # (grad of -log p_c)^2 = (grad of log p_c)^2: per-sample cross-entropy to class c
            grads = common.per_sample_gradients(model, batch, target, sample_cross_entropy)
            for n, g in grads.items():
                weight = probs[:, c].view(-1, *[1] * (g.dim() - 1))
                fisher[n] += (weight * g.pow(2)).sum(0)
    return {n: f / len(x) for n, f in fisher.items()}


def main():
    parser = common.unlearn_parser(__doc__)
    g = parser.add_argument_group("Fisher forgetting")
    g.add_argument("--alpha", type=float, default=ALPHA, help="noise scale (default: %(default)s)")
    g.add_argument("--eps", type=float, default=EPS, help="added to the Fisher (default: %(default)s)")
    g.add_argument("--max-var", type=float, default=MAX_VAR, help="noise variance clamp (default: %(default)s)")
    g.add_argument("--fisher-samples", type=int, default=FISHER_SAMPLES, help="(default: %(default)s)")
    g.add_argument("--chunk", type=int, default=CHUNK, help="(default: %(default)s)")
    g.add_argument("--zero-forget-head", action=argparse.BooleanOptionalAction, default=ZERO_FORGET_HEAD,
                   help="class-wise: zero the forgotten class's head row (default: %(default)s)")
    args = parser.parse_args()
    # FF updates every weight in place: pruning and LoRA do not apply (a pruned input model keeps its mask).
    args.prune, args.allow_regrowth, args.lora, args.sparsity = "none", False, False, 0.0

    unlearning = common.start_unlearning(args, "ff")
    model, data = unlearning.model, unlearning.data
    model.eval()
    x_retain, _ = data.subset("retain")
    pick = torch.randperm(len(x_retain), device=x_retain.device, generator=unlearning.gen)[:args.fisher_samples]
    start = time.perf_counter()
    fisher = retain_fisher(model, x_retain[pick], data.info, unlearning.input_size, args.chunk)
    head = common.classifier_name(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in fisher:
                std = (args.alpha / (fisher[name] + args.eps)).clamp(max=args.max_var).sqrt()
                p.add_(std * torch.randn(p.shape, device=p.device, generator=unlearning.gen))
        if args.zero_forget_head and data.forget_class is not None:
            # Golatkar et al.'s class-wise step: the forgotten class's output row is reset to zero.
            for name, p in model.named_parameters():
                if name.startswith(head + "."):
                    p[data.forget_class] = 0.0
    result = common.TrainResult(time.perf_counter() - start, common.peak_memory_mb(unlearning.device), [])
    common.finish_run(unlearning, result)


if __name__ == "__main__":
    common.run_main(main)
