"""l1-sparse: fine-tune on Dr with cross-entropy plus a_t * sum|theta|, a_t decaying linearly from --alpha to 0
over the run (Unlearn-Sparse's sparsity-aware unlearning, Jia et al. 2023, Sec. 4).

    python l1sparse.py --model model_weights/fashion-mnist_resnet_tiny_full_original_s0.safetensors --forget-class 3

prints the resolved config, one JSON line per epoch, then Acc(Df), Acc(Dr), test accuracy, cost and the path.
The penalty covers the trained parameters (all of them, or the adapters + head with --lora).

The decay is per step, a deliberate deviation: Unlearn-Sparse's code (unlearn/FT.py, FT_iter, --no-l1-epochs 0)
holds a_e = alpha * (1 - e / E) through epoch e = 0..E-1, a staircase whose last epoch still carries alpha / E;
here a_t falls smoothly to 0, so over a run the mean weight is alpha / 2 against their alpha (E + 1) / (2E)
(0.55 alpha at E = 10). The validation choice of --alpha absorbs the difference.
"""
import common

# Unlearn-Sparse settings (Jia et al. 2023, App. C): SGD momentum 0.9, wd 5e-4, batch 256, augmentation, lr 0.01,
# 10 epochs.
EPOCHS = 10
LR = 0.01
BATCH_SIZE = 256
OPTIMIZER = "sgd"
WEIGHT_DECAY = 5e-4
AUGMENT = True
ALPHA = 5e-5  # the public default 0.2 swamps the loss of an 11M-parameter net; 1e-5..1e-4 is the useful range


def main():
    parser = common.unlearn_parser(__doc__)
    common.add_optim_args(parser, epochs=EPOCHS, lr=LR, batch_size=BATCH_SIZE, optimizer=OPTIMIZER,
                          weight_decay=WEIGHT_DECAY, augment=AUGMENT)
    parser.add_argument("--alpha", type=common.non_negative_float, default=ALPHA, help="initial L1 weight a_0 (default: %(default)s)")
    common.add_adapt_args(parser)
    args = parser.parse_args()
    common.check_sparsity(args.sparsity)

    unlearning = common.start_unlearning(args, "l1sparse")
    ce = unlearning.ce_loss(args.augment)
    penalised = [p for p in unlearning.model.parameters() if p.requires_grad]
    retain_pass = unlearning.batches("retain")
    total_steps = args.epochs * -(-len(unlearning.data.retain) // args.batch_size)
    step = 0

    def loss_fn(model, batch):
        nonlocal step
        alpha_t = args.alpha * (1 - step / total_steps)  # linear decay to 0 over the run
        step += 1
        return ce(model, batch) + alpha_t * sum(p.abs().sum() for p in penalised)

    result = common.train_unlearning(unlearning, retain_pass, loss_fn)
    common.finish_run(unlearning, result)


if __name__ == "__main__":
    common.run_main(main)
