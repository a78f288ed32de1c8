"""FT: fine-tune all weights on the retain set Dr with plain cross-entropy; Df is never touched.

The PruneLoRA paper's baseline; pruneft.py, lora.py and loraprune.py change what is pruned and what is trained.

    python finetune.py --model model_weights/fashion-mnist_resnet_tiny_full_original_s0.safetensors --forget-class 3

prints the resolved config, one JSON line per epoch, then Acc(Df), Acc(Dr), test accuracy, cost and the
output path. The Unlearn-Sparse FT baseline is the same script with its settings:

    python finetune.py --model ... --optimizer sgd --lr 0.01 --epochs 10 --batch-size 256 --weight-decay 5e-4 --augment
"""
import common

METHOD = "finetune"
FORGET_CLASS = 3  # the PruneLoRA paper's class (cat in CIFAR-10); --forget-random N forgets N random images
# The PruneLoRA paper's fine-tuning settings (arXiv 2411.11907, Sec. 3).
EPOCHS = 5  # 10 for some reported checkpoints
LR = 1e-3
BATCH_SIZE = 128
OPTIMIZER = "adam"
WEIGHT_DECAY = 0.0
AUGMENT = False  # the paper trains on Dr without augmentation


def main():
    parser = common.unlearn_parser(__doc__, forget_class=FORGET_CLASS)
    common.add_optim_args(parser, epochs=EPOCHS, lr=LR, batch_size=BATCH_SIZE, optimizer=OPTIMIZER,
                          weight_decay=WEIGHT_DECAY, augment=AUGMENT)
    args = parser.parse_args()

    # The original model, and its training split cut into this run's forget set Df and retain set Dr.
    device, gen = common.device_and_generator(args.device, seed=args.seed)
    model, meta, data = common.load_original(args.model, device, data_dir=args.data_dir, forget_class=args.forget_class,
                                             forget_random=args.forget_random, forget_seed=args.forget_seed)
    out = common.claim_output(args.out, out_dir=args.out_dir, data=data, arch=meta["arch"], method=METHOD,
                              seed=args.seed, overwrite=args.overwrite)
    input_size = common.ARCHS[meta["arch"]].input_size
    common.print_config(METHOD, vars(args))

    # Cross-entropy on Dr, every weight trained.
    x_retain, y_retain = data.subset("retain")
    retain_batches = common.shuffled_batches(x_retain, y_retain, args.batch_size, gen)
    loss_fn = common.ce_loss(data.info, input_size, args.augment, gen)
    optimizer = common.make_optimizer(args.optimizer, model.parameters(), args.lr, args.weight_decay)
    result = common.train_loop(model, optimizer, args.epochs, retain_batches, loss_fn, device=device, desc=METHOD,
                               compile_mode=args.compile)

    saved = common.save_unlearned(model, out, method=METHOD, original=args.model, original_meta=meta, data=data,
                                  config=vars(args), result=result, overwrite=args.overwrite)
    common.print_summary(saved, out)


if __name__ == "__main__":
    common.run_main(main)
