"""PruneLoRA, "prune first, then adapt, then unlearn": prune 50% by L2 structured pruning (as pruneft.py),
then train LoRA adapters plus the head on the frozen pruned model with cross-entropy on Dr (as lora.py).
On pruned layers the update is M * (W0 + BA), so the merged checkpoint is exactly as sparse as the pruned
model; --allow-regrowth lets the dense low-rank update fill the pruned filters, as the seed code did.

    python loraprune.py --model model_weights/fashion-mnist_resnet_tiny_full_original_s0.safetensors --forget-class 3
"""
import common
import finetune

PRUNE = "l2-structured"  # the PruneLoRA paper: L2-norm structured pruning, per layer
SPARSITY = 0.5
LORA = True

if __name__ == "__main__":
    common.run_main(lambda: finetune.run("loraprune", __doc__, prune_method=PRUNE, sparsity=SPARSITY, lora=LORA))
