"""RL (random labels): each epoch, Df relabelled at random is mixed into Dr and the model makes one shuffled
pass over the union with cross-entropy (Unlearn-Sparse / SalUn baseline; Jia et al. 2023, Sec. 5; the
authors' unlearn/RL.py). Fresh labels are drawn every epoch, uniformly over all classes as upstream does
(so about 1/C of Df keeps its true label); --wrong-labels-only excludes the true label.

    python rl.py --model model_weights/fashion-mnist_resnet_tiny_full_original_s0.safetensors --forget-class 3

prints the resolved config, one JSON line per epoch, then Acc(Df), Acc(Dr), test accuracy, cost and the path.
Works on dense or pruned (prune.py) models, masks kept; --lora adapts through LoRA instead of all weights.
"""
import argparse

import torch

import common

# Unlearn-Sparse settings (Jia et al. 2023, App. C): SGD momentum 0.9, wd 5e-4, batch 256, augmentation.
EPOCHS = 10  # passes over Dr with the relabelled Df mixed in
LR = 0.01
BATCH_SIZE = 256
OPTIMIZER = "sgd"
WEIGHT_DECAY = 5e-4
AUGMENT = True
WRONG_LABELS_ONLY = False  # upstream draws randint(0, C): a random label may equal the true one


def random_labels(labels: torch.Tensor, num_classes: int, gen: torch.Generator, wrong_only: bool) -> torch.Tensor:
    """Uniform random labels over all classes, or (wrong_only) over the classes other than the true one."""
    if wrong_only:
        shift = torch.randint(1, num_classes, labels.shape, device=labels.device, generator=gen)
        return (labels + shift) % num_classes
    return torch.randint(0, num_classes, labels.shape, device=labels.device, generator=gen)


def relabelled_union_batches(forget: tuple, retain: tuple, *, num_classes: int, batch_size: int,
                             gen: torch.Generator, wrong_only: bool):
    """One RL epoch: Df with fresh random labels and Dr with its own, concatenated and shuffled into batches."""
    (x_forget, y_forget), (x_retain, y_retain) = forget, retain
    labels = torch.cat([random_labels(y_forget, num_classes, gen, wrong_only), y_retain])
    return common.batches(torch.cat([x_forget, x_retain]), labels, batch_size, shuffle=True, gen=gen)


def main():
    parser = common.unlearn_parser(__doc__)
    common.add_optim_args(parser, epochs=EPOCHS, lr=LR, batch_size=BATCH_SIZE, optimizer=OPTIMIZER,
                          weight_decay=WEIGHT_DECAY, augment=AUGMENT)
    common.add_adapt_args(parser)
    parser.add_argument("--wrong-labels-only", action=argparse.BooleanOptionalAction, default=WRONG_LABELS_ONLY,
                        help="never relabel a Df image with its true class (default: %(default)s)")
    args = parser.parse_args()
    common.check_sparsity(args.sparsity)

    unlearning = common.start_unlearning(args, "rl")
    data = unlearning.data

    def epoch_batches(epoch):
        return relabelled_union_batches(data.subset("forget"), data.subset("retain"),
                                        num_classes=data.info.num_classes, batch_size=args.batch_size,
                                        gen=unlearning.gen, wrong_only=args.wrong_labels_only)

    result = common.train_unlearning(unlearning, epoch_batches, unlearning.ce_loss(args.augment))
    common.finish_run(unlearning, result)


if __name__ == "__main__":
    common.run_main(main)
