#!/usr/bin/env bash
# The PruneLoRA pipeline at CPU scale: Fashion-MNIST (a 12,000-image training subset), the CPU-sized ResNet,
# forget class 3 (dress). Trains the original and the Retrain reference to convergence (15 epochs, ~99% training
# accuracy), a second Retrain of another seed (the seed-noise floor), runs the four methods at the paper's
# defaults (Adam 1e-3, 5 epochs, batch 128, Dr only), trains the Retrain with Prune+FT's 50% structured mask (the
# sparse reference of the pruned rows), then compares them all with Retrain.
# About 8 minutes on 2 CPU cores. Outputs: model_weights/fashion-mnist_resnet_tiny_*, results/demo.md.
set -euo pipefail
cd "$(dirname "$0")"
COMMON=(--dataset fashion-mnist --arch resnet_tiny --train-subset 12000 --epochs 15 --augment false)
W=model_weights
ORIG=$W/fashion-mnist_resnet_tiny_full_original_s0.safetensors
RETRAIN=$W/fashion-mnist_resnet_tiny_class3_retrain_s0.safetensors

python pretrain.py "${COMMON[@]}" --overwrite                                    # original, all training images
python pretrain.py "${COMMON[@]}" --retrain --forget-class 3 --overwrite         # Retrain on Dr: the reference
python pretrain.py "${COMMON[@]}" --retrain --forget-class 3 --seed 1 --overwrite  # another seed: the floor
for method in finetune pruneft lora loraprune; do
  python $method.py --model $ORIG --forget-class 3 --overwrite
done
python pretrain.py "${COMMON[@]}" --retrain --forget-class 3 --overwrite \
  --mask-from $W/fashion-mnist_resnet_tiny_class3_pruneft_s0.safetensors         # Retrain with the pruned mask
python evaluate.py $ORIG $W/fashion-mnist_resnet_tiny_class3_{finetune,pruneft,lora,loraprune}_s0.safetensors \
  --retrain $RETRAIN --floor $W/fashion-mnist_resnet_tiny_class3_retrain_s1.safetensors \
  --sparse-retrain $W/fashion-mnist_resnet_tiny_class3_retrain-sparse_s0.safetensors \
  --md results/demo.md --overwrite
