"""FT: fine-tune all weights on the retain set Dr with plain cross-entropy; Df is never touched.

The PruneLoRA paper's baseline, and the shared recipe of its other three methods (pruneft.py, lora.py,
loraprune.py), which only change what is pruned and what is trained.

    python finetune.py --model model_weights/fashion-mnist_resnet_tiny_full_original_s0.safetensors --forget-class 3

prints the resolved config, one JSON line per epoch, then Acc(Df), Acc(Dr), test accuracy, cost and the
output path. The Unlearn-Sparse FT baseline is the same script with its settings:

    python finetune.py --model ... --optimizer sgd --lr 0.01 --epochs 10 --batch-size 256 --weight-decay 5e-4 --augment
"""
import common

# The PruneLoRA paper's fine-tuning settings (arXiv 2411.11907, Sec. 3).
EPOCHS = 5  # 10 for some reported checkpoints
LR = 1e-3
BATCH_SIZE = 128
OPTIMIZER = "adam"
WEIGHT_DECAY = 0.0
AUGMENT = False  # the paper trains on Dr without augmentation


def run(method: str, doc: str, *, prune_method: str = "none", sparsity: float = 0.5, lora: bool = False) -> None:
    """Cross-entropy on Dr, after optional pruning and through optional LoRA: the four PruneLoRA methods."""
    parser = common.unlearn_parser(doc)
    common.add_optim_args(parser, epochs=EPOCHS, lr=LR, batch_size=BATCH_SIZE, optimizer=OPTIMIZER,
                          weight_decay=WEIGHT_DECAY, augment=AUGMENT)
    common.add_adapt_args(parser, prune_method=prune_method, sparsity=sparsity, lora=lora)
    args = parser.parse_args()
    common.check_sparsity(args.sparsity)

    unlearning = common.start_unlearning(args, method)
    result = common.train_unlearning(unlearning, unlearning.batches("retain"), unlearning.ce_loss(args.augment))
    common.finish_run(unlearning, result)


if __name__ == "__main__":
    common.run_main(lambda: run("finetune", __doc__))
