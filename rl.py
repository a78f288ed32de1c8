"""RL (random labels): cross-entropy on Df relabelled at random (never with the true label), plus CE on Dr.

Each step takes one Df batch with fresh random wrong labels and one Dr batch of the same size, and minimises
the sum of the two losses; an epoch is one pass over Df (Unlearn-Sparse/SalUn baseline, REFERENCE §4).

    python rl.py --model model_weights/fashion-mnist_resnet_tiny_full_original_s0.safetensors --forget-class 3

prints the resolved config, one JSON line per epoch, then Acc(Df), Acc(Dr), test accuracy, cost and the path.
Works on dense or pruned (prune.py) models, masks kept; --lora adapts through LoRA instead of all weights.
"""
import torch

import common

# Unlearn-Sparse settings (REFERENCE §4): SGD momentum 0.9, wd 5e-4, batch 256, augmentation.
EPOCHS = 10  # passes over Df
LR = 0.01
BATCH_SIZE = 256  # per set: each step sees this many Df and this many Dr images
OPTIMIZER = "sgd"
WEIGHT_DECAY = 5e-4
AUGMENT = True


def random_wrong_labels(labels: torch.Tensor, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    """A uniformly random label different from the true one, for each sample."""
    shift = torch.randint(1, num_classes, labels.shape, device=labels.device, generator=gen)
    return (labels + shift) % num_classes


def main():
    parser = common.unlearn_parser(__doc__)
    common.add_optim_args(parser, epochs=EPOCHS, lr=LR, batch_size=BATCH_SIZE, optimizer=OPTIMIZER,
                          weight_decay=WEIGHT_DECAY, augment=AUGMENT)
    common.add_adapt_args(parser)
    args = parser.parse_args()
    common.check_sparsity(args.sparsity)

    unlearning = common.start_unlearning(args, "rl")
    ce, gen, num_classes = unlearning.ce_loss(args.augment), unlearning.gen, unlearning.data.info.num_classes
    forget_pass, retain_pass = unlearning.batches("forget"), unlearning.batches("retain")

    def epoch_batches(epoch):
        return zip(forget_pass(epoch), retain_pass(epoch))  # as many steps as Df has batches

    def loss_fn(model, batch):
        (x_forget, y_forget), retain_batch = batch
        relabelled = (x_forget, random_wrong_labels(y_forget, num_classes, gen))
        return ce(model, relabelled) + ce(model, retain_batch)

    result = common.train_unlearning(unlearning, epoch_batches, loss_fn)
    common.finish_run(unlearning, result)


if __name__ == "__main__":
    common.run_main(main)
