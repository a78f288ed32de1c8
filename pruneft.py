"""Prune+FT: prune 50% of each conv (ResNet) or block linear layer (ViT) by L2-norm structured pruning of
whole output filters/rows, then fine-tune all remaining weights on Dr with cross-entropy (finetune.py's
recipe). The mask is kept: the saved model is exactly as sparse as right after pruning, and the head is
never pruned. --allow-regrowth drops the mask first, as the seed code did.

    python pruneft.py --model model_weights/fashion-mnist_resnet_tiny_full_original_s0.safetensors --forget-class 3
"""
import common
import finetune

PRUNE = "l2-structured"  # the PruneLoRA paper: L2-norm structured pruning, per layer
SPARSITY = 0.5  # half of the output filters/rows of every pruned layer

if __name__ == "__main__":
    common.run_main(lambda: finetune.run("pruneft", __doc__, prune_method=PRUNE, sparsity=SPARSITY))
