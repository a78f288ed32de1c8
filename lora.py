"""LoRA: freeze the model, add LoRA adapters through peft and train them plus the classifier head on Dr with
cross-entropy (finetune.py's recipe). ResNets: r=8, alpha=16, dropout 0.1 on the residual blocks' convs;
ViTs: r=16, alpha=32 on qkv, proj, fc1, fc2. BatchNorm statistics stay frozen (--update-bn to let them
move). The adapters are merged, so the checkpoint loads into the plain architecture.

    python lora.py --model model_weights/fashion-mnist_resnet_tiny_full_original_s0.safetensors --forget-class 3
"""
import common
import finetune

LORA = True  # rank, alpha, dropout and targets: common.LORA_DEFAULTS (the PruneLoRA paper's)

if __name__ == "__main__":
    common.run_main(lambda: finetune.run("lora", __doc__, lora=LORA))
