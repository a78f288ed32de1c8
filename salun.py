"""SalUn (saliency unlearning; Fan et al. 2024, Sec. 4): rank every weight by the magnitude of the forget loss's
gradient, keep the top --mask-fraction as the saliency mask, then unlearn with random labels on the masked
weights only. Each epoch is a full pass over Df with fresh random labels (uniform over all classes), then a full
pass over Dr with its true labels, as the authors' Classification/unlearn/RL.py runs it for CIFAR-10.

    python salun.py --model model_weights/fashion-mnist_resnet_tiny_full_original_s0.safetensors --forget-class 3

prints the resolved config, one JSON line per epoch, then Acc(Df), Acc(Dr), test accuracy, cost and the path.
Works on dense or sparse (prune.py) models, masks kept. The mask ranks all trained parameters together (convs,
BatchNorm affines, head); with --lora those are the adapters and the head (an adapter's A factor has a zero
gradient while B = 0, so the mask leaves every A at its initial value and trains B and the head).
Weights outside the mask never move: upstream masked only the gradients, so weight decay and momentum still
moved them until its 2026 fix; --no-freeze-unmasked runs that older behaviour.
"""
import argparse
import time

import torch

import common
METHOD = "salun"
FORGET_CLASS = 3  # the PruneLoRA paper's class (cat in CIFAR-10); --forget-random N forgets N random images
# The authors' CIFAR-10 settings (Fan et al. 2024, App. C; Unlearn-Saliency README): SGD momentum 0.9, wd 5e-4,
# batch 256, augmentation, lr 0.013, 10 epochs, mask of the top 50% of weights.
EPOCHS = 10
LR = 0.013
BATCH_SIZE = 256
OPTIMIZER = "sgd"
WEIGHT_DECAY = 5e-4
AUGMENT = True
MASK_FRACTION = 0.5  # the share of weights the update may change
FREEZE_UNMASKED = True  # False: mask only the gradients, as upstream before its fix
LORA = False  # True: train LoRA adapters + head instead of every weight


def saliency_mask(model, x_forget, y_forget, info, input_size, *, fraction: float, batch_size: int,
                  gen: torch.Generator) -> dict[str, torch.Tensor]:
    """{name: bool tensor}: the int(fraction * N) of all N trainable weights with the largest |sum over Df batches
    of the forget loss's gradient| (batches augmented as in training; ties broken by sort order, as upstream)."""
    saliency = None
    for grads in common.batch_gradients(model, x_forget, y_forget, info, input_size, batch_size=batch_size,
                                        augment_gen=gen):
        saliency = grads if saliency is None else {n: s + grads[n] for n, s in saliency.items()}
    flat = torch.cat([s.abs().flatten() for s in saliency.values()])
    chosen = torch.zeros(len(flat), dtype=torch.bool, device=flat.device)
    chosen[flat.argsort(descending=True)[:int(len(flat) * fraction)]] = True
    pieces = chosen.split([s.numel() for s in saliency.values()])
    return {name: piece.view_as(s) for (name, s), piece in zip(saliency.items(), pieces)}


def restrict_to_mask(model, optimizer, mask: dict[str, torch.Tensor], *, freeze_unmasked: bool) -> None:
    """Zero the gradients outside the mask; with freeze_unmasked also put the weights outside the mask back after
    every optimizer step, so weight decay and momentum cannot move them."""
    params = dict(model.named_parameters())
    for name, keep in mask.items():
        params[name].register_hook(lambda grad, keep=keep: grad * keep)
    if freeze_unmasked:
        frozen = {name: params[name].detach().clone() for name in mask}

        @torch.no_grad()
        def put_back(optimizer, args, kwargs):
            for name, keep in mask.items():
                params[name].copy_(torch.where(keep, params[name], frozen[name]))
        optimizer.register_step_post_hook(put_back)


def main():
    parser = common.unlearn_parser(__doc__, forget_class=FORGET_CLASS)
    common.add_optim_args(parser, epochs=EPOCHS, lr=LR, batch_size=BATCH_SIZE, optimizer=OPTIMIZER,
                          weight_decay=WEIGHT_DECAY, augment=AUGMENT)
    g = parser.add_argument_group("SalUn")
    g.add_argument("--mask-fraction", type=common.unit_fraction, default=MASK_FRACTION,
                   help="share of weights in the saliency mask (default: %(default)s)")
    g.add_argument("--freeze-unmasked", action=argparse.BooleanOptionalAction, default=FREEZE_UNMASKED,
                   help="keep weights outside the mask exactly fixed (default: %(default)s)")
    common.add_lora_args(parser, lora=LORA)
    args = parser.parse_args()

    # The original model, and its training split cut into this run's forget set Df and retain set Dr.
    device, gen = common.device_and_generator(args.device, seed=args.seed)
    model, meta, data = common.load_original(args.model, device, data_dir=args.data_dir, forget_class=args.forget_class,
                                             forget_random=args.forget_random, forget_seed=args.forget_seed)
    out = common.claim_output(args.out, out_dir=args.out_dir, data=data, arch=meta["arch"], method=METHOD,
                              seed=args.seed, overwrite=args.overwrite)
    arch = common.ARCHS[meta["arch"]]
    lora = common.lora_settings(arch.family, rank=args.lora_rank, alpha=args.lora_alpha,
                                dropout=args.lora_dropout, targets=args.lora_targets) if args.lora else None
    config = dict(vars(args), lora_settings=lora)
    common.print_config(METHOD, config)
    forget, retain = data.subset("forget"), data.subset("retain")

    # 1. Optionally, adapt through LoRA instead of updating every weight.
    start = time.perf_counter()
    if args.lora:
        model = common.add_lora(model, **lora, train_head=args.lora_head)
    # 2. The saliency mask: the weights the forget loss's gradient is largest on.
    mask = saliency_mask(model, *forget, data.info, arch.input_size, fraction=args.mask_fraction,
                         batch_size=args.batch_size, gen=gen)
    masked = sum(int(m.sum()) for m in mask.values())
    prep_time_s = time.perf_counter() - start

    # 3. Random-label unlearning (a Df pass with random labels, then a Dr pass) on the masked weights only.
    optimizer = common.make_optimizer(args.optimizer, model.parameters(), args.lr, args.weight_decay)
    restrict_to_mask(model, optimizer, mask, freeze_unmasked=args.freeze_unmasked)
    result = common.train_loop(
        model, optimizer, args.epochs,
        lambda epoch: common.random_label_epoch(forget, retain, num_classes=data.info.num_classes,
                                                batch_size=args.batch_size, gen=gen),
        common.ce_loss(data.info, arch.input_size, args.augment, gen), device=device, desc=METHOD,
        freeze_bn=args.lora and not args.update_bn, compile_mode=args.compile)
    if args.freeze_unmasked:
        result.trainable_params = masked  # the weights the update could change

    model = common.merge_lora(model) if args.lora else model
    saved = common.save_unlearned(model, out, method=METHOD, original=args.model, original_meta=meta, data=data,
                                  config=config, result=result, overwrite=args.overwrite, prep_time_s=prep_time_s,
                                  extra=dict(masked_weights=masked))
    common.print_summary(saved, out)


if __name__ == "__main__":
    common.run_main(main)
