"""LoRA: freeze the model, add LoRA adapters through peft and train them plus the classifier head on Dr with
cross-entropy (finetune.py's update). ResNets: r=8, alpha=16, dropout 0.1 on the residual blocks' convs;
ViTs: r=16, alpha=32 on qkv, proj, fc1, fc2. BatchNorm statistics stay frozen (--update-bn to let them
move). The adapters are merged, so the checkpoint loads into the plain architecture.

    python lora.py --model model_weights/fashion-mnist_resnet_tiny_full_original_s0.safetensors --forget-class 3
"""
import time

import common

METHOD = "lora"
FORGET_CLASS = 3  # the PruneLoRA paper's class (cat in CIFAR-10); --forget-random N forgets N random images
# The PruneLoRA paper's settings (arXiv 2411.11907, Sec. 3); rank, alpha, dropout and target layers per
# architecture family are common.LORA_DEFAULTS.
LORA_HEAD = True  # the classifier head trains beside the adapters
EPOCHS = 5
LR = 1e-3
BATCH_SIZE = 128
OPTIMIZER = "adam"
WEIGHT_DECAY = 0.0
AUGMENT = False


def main():
    parser = common.unlearn_parser(__doc__, forget_class=FORGET_CLASS)
    common.add_lora_args(parser, train_head=LORA_HEAD)
    common.add_optim_args(parser, epochs=EPOCHS, lr=LR, batch_size=BATCH_SIZE, optimizer=OPTIMIZER,
                          weight_decay=WEIGHT_DECAY, augment=AUGMENT)
    args = parser.parse_args()

    # The original model, and its training split cut into this run's forget set Df and retain set Dr.
    device, gen = common.device_and_generator(args.device, seed=args.seed)
    model, meta, data = common.load_original(args.model, device, data_dir=args.data_dir, forget_class=args.forget_class,
                                             forget_random=args.forget_random, forget_seed=args.forget_seed)
    out = common.claim_output(args.out, out_dir=args.out_dir, data=data, arch=meta["arch"], method=METHOD,
                              seed=args.seed, overwrite=args.overwrite)
    arch = common.ARCHS[meta["arch"]]
    lora = common.lora_settings(arch.family, rank=args.lora_rank, alpha=args.lora_alpha,
                                dropout=args.lora_dropout, targets=args.lora_targets)
    config = dict(vars(args), lora_settings=lora)
    common.print_config(METHOD, config)

    # Freeze the model; add adapters (B = 0: the model's function is unchanged) and unfreeze the head.
    start = time.perf_counter()
    model = common.add_lora(model, **lora, train_head=args.lora_head)
    prep_time_s = time.perf_counter() - start

    # Cross-entropy on Dr through the adapters; BatchNorm keeps the original's statistics unless --update-bn.
    x_retain, y_retain = data.subset("retain")
    retain_batches = common.shuffled_batches(x_retain, y_retain, args.batch_size, gen)
    loss_fn = common.ce_loss(data.info, arch.input_size, args.augment, gen)
    optimizer = common.make_optimizer(args.optimizer, model.parameters(), args.lr, args.weight_decay)
    result = common.train_loop(model, optimizer, args.epochs, retain_batches, loss_fn, device=device, desc=METHOD,
                               freeze_bn=not args.update_bn, compile_mode=args.compile)

    # Merge the adapters into the weights: the checkpoint is a plain model of the original architecture.
    model = common.merge_lora(model)
    saved = common.save_unlearned(model, out, method=METHOD, original=args.model, original_meta=meta, data=data,
                                  config=config, result=result, overwrite=args.overwrite, prep_time_s=prep_time_s)
    common.print_summary(saved, out)


if __name__ == "__main__":
    common.run_main(main)
