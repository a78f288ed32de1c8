#!/usr/bin/env bash
# The PruneLoRA pipeline at CPU scale: Fashion-MNIST, the CPU-sized ResNet, forget class 3 (dress).
# Trains the original and the Retrain reference, runs the four methods at the paper's defaults
# (Adam 1e-3, 5 epochs, batch 128, Dr only), then compares them all with Retrain.
# About 11 minutes on 2 CPU cores. Outputs: model_weights/fashion-mnist_resnet_tiny_*, results/demo.md.
set -euo pipefail
cd "$(dirname "$0")"
COMMON=(--dataset fashion-mnist --arch resnet_tiny --epochs 3)
W=model_weights
ORIG=$W/fashion-mnist_resnet_tiny_full_original_s0.safetensors
RETRAIN=$W/fashion-mnist_resnet_tiny_class3_retrain_s0.safetensors

python pretrain.py "${COMMON[@]}" --overwrite                                    # original, all training images
python pretrain.py "${COMMON[@]}" --retrain --forget-class 3 --overwrite         # Retrain on Dr: the reference
for method in finetune pruneft lora loraprune; do
  python $method.py --model $ORIG --forget-class 3 --overwrite
done
python evaluate.py $ORIG $W/fashion-mnist_resnet_tiny_class3_{finetune,pruneft,lora,loraprune}_s0.safetensors \
  --retrain $RETRAIN --md results/demo.md --overwrite
