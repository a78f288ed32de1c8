"""AMUN (Ebrahimpour-Boroojeny et al., "Adversarial Mixup Unlearning", ICML 2025, Sec. 4): for each forget image, the
nearest adversarial example the original model misclassifies, labelled with the class the model gives it; then
fine-tune on the training data (Dr and Df with their true labels) together with these adversarial examples, so the
model's confidence on each forgotten image falls to the level of images it never saw while the rest is kept. As the
authors' code runs it (Ali-E/AMUN): pgdl2_modified.py's search (PGD-L2 on [0, 1] pixels, 50 steps of eps / 10 from
eps 0.04, each image frozen at the first step the model misclassifies it, eps doubled for the others after every 50
steps), adversarial_unlearn.py's update for `amun` with the remaining data (one shuffled set of the training
images, augmented, and the adversarial ones, not augmented; cross-entropy; SGD momentum 0.9, weight decay 5e-4,
batch 128) at hyperparam_tune.py's defaults (10 epochs, lr 0.01, StepLR x0.1 after every epoch).
--no-retain: their `--remain no_use` (Df and its adversarial examples only).

    python amun.py --model model_weights/fashion-mnist_resnet_tiny_full_original_s0.safetensors --forget-random 1200

prints the resolved config, one JSON line per epoch, then Acc(Df), Acc(Dr), test accuracy, cost and the path.
Works on dense or sparse (prune.py) models, masks kept; --lora trains LoRA adapters (+ head) instead. Designed for
random-sample forgetting; class-wise runs the same recipe. Differences from upstream: the adversarial examples are
searched at the start of each run (upstream precomputes them once per original for all training images: the same
images); a search round is capped at --max-doublings (upstream doubles until every image flips).
"""
import argparse
import math
import time

import torch
import torch.nn.functional as F

import common

METHOD = "amun"
FORGET_CLASS = 3  # the PruneLoRA paper's class (cat in CIFAR-10); --forget-random N forgets N random images
# The authors' CIFAR-10 settings (hyperparam_tune.py's defaults; adversarial_unlearn.py's optimizer).
EPOCHS = 10
LR = 0.01
LR_DECAY_PER_EPOCH = 0.1  # StepLR(step_size=1, gamma=0.1)
BATCH_SIZE = 128
OPTIMIZER = "sgd"
WEIGHT_DECAY = 5e-4
AUGMENT = True  # the training images only: the adversarial ones are used as found
RETAIN = True  # False: Df and its adversarial examples only (upstream's --remain no_use)
# The search (pgdl2_modified.py's defaults): L2 radius on [0, 1] pixels, step = radius / 10.
ATTACK_EPS = 0.04
ATTACK_STEPS = 50
MAX_DOUBLINGS = 12  # 0.04 x 2^12 = 164 exceeds any image's L2 diameter: every image flips well before
LORA = False  # True: train LoRA adapters + head instead of every weight


def nearest_adversarial(model, x, y, info, input_size, *, eps: float, steps: int, max_doublings: int,
                        batch_size: int = 128):
    """Per image of (x, y), the PGD-L2 example the model misclassifies at the smallest radius the search reaches
    (pgdl2_modified.py): images in [0, 255] (float) as x's scale, the model's labels for them, and each search's
    final radius on [0, 1] pixels. An image the model already misclassifies is its own example; as upstream, an
    image leaves the batch at the first step it is misclassified."""
    model.eval()
    found_images, found_labels, radii = [], [], []
    for xb, yb in common.batches(x, y, batch_size):
        clean = xb.float() / 255
        adv, label = clean.clone(), yb.clone()
        radius = torch.full((len(xb),), eps, device=xb.device)
        active = torch.arange(len(xb), device=xb.device)  # the images still classified correctly
        for _ in range(max_doublings + 1):
            for _ in range(steps):
                images = adv[active].requires_grad_(True)
                with torch.autocast(xb.device.type, enabled=False):
                    logits = model(common.normalize(images * 255, info, input_size)).float()
                    grad, = torch.autograd.grad(F.cross_entropy(logits, yb[active]), images)
                predicted = logits.argmax(1)
                flipped = predicted != yb[active]
                label[active[flipped]] = predicted[flipped]
                still, active = ~flipped, active[~flipped]
                if not len(active):
                    break
                grad = grad[still] / (grad[still].flatten(1).norm(dim=1) + 1e-10).view(-1, 1, 1, 1)
                step = (radius[active] / 10).view(-1, 1, 1, 1)
                delta = images.detach()[still] + step * grad - clean[active]
                shrink = (radius[active] / delta.flatten(1).norm(dim=1)).clamp(max=1)  # back onto the L2 ball
                adv[active] = (clean[active] + delta * shrink.view(-1, 1, 1, 1)).clamp(0, 1)
            if not len(active):
                break
            radius[active] *= 2
        found_images.append(adv * 255)
        found_labels.append(label)
        radii.append(radius)
    return torch.cat(found_images), torch.cat(found_labels), torch.cat(radii)


def mixed_set_loss(info, input_size, *, augment: bool, gen: torch.Generator):
    """train_loop's loss on (images, [label, is_adversarial]) batches: cross-entropy, the training images augmented
    and the adversarial ones as found."""
    def loss_fn(model, batch):
        x, targets = batch
        y, is_adversarial = targets[:, 0], targets[:, 1].bool()
        if augment:
            x = torch.where(is_adversarial.view(-1, 1, 1, 1), x, common.augment(x, info, gen))
        return F.cross_entropy(model(common.normalize(x, info, input_size)), y)
    return loss_fn


def main():
    parser = common.unlearn_parser(__doc__, forget_class=FORGET_CLASS)
    common.add_optim_args(parser, epochs=EPOCHS, lr=LR, batch_size=BATCH_SIZE, optimizer=OPTIMIZER,
                          weight_decay=WEIGHT_DECAY, augment=AUGMENT)
    g = parser.add_argument_group("AMUN")
    g.add_argument("--lr-decay", type=common.positive_float, default=LR_DECAY_PER_EPOCH,
                   help="learning rate factor after every epoch (default: %(default)s)")
    g.add_argument("--retain", action=argparse.BooleanOptionalAction, default=RETAIN,
                   help="train on Dr and Df with the adversarial examples; --no-retain: Df and them only "
                        "(default: %(default)s)")
    g.add_argument("--attack-eps", type=common.positive_float, default=ATTACK_EPS,
                   help="first L2 radius of the search, on [0, 1] pixels (default: %(default)s)")
    g.add_argument("--attack-steps", type=common.positive_int, default=ATTACK_STEPS,
                   help="PGD steps per radius (default: %(default)s)")
    g.add_argument("--max-doublings", type=common.non_negative_int, default=MAX_DOUBLINGS,
                   help="times the radius may double for an image not yet misclassified (default: %(default)s)")
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

    # 1. Each forget image's nearest adversarial example under the original, with the label the original gives it.
    start = time.perf_counter()
    x_forget, y_forget = data.subset("forget")
    x_adv, y_adv, radii = nearest_adversarial(model, x_forget, y_forget, data.info, arch.input_size,
                                              eps=args.attack_eps, steps=args.attack_steps,
                                              max_doublings=args.max_doublings)
    if args.lora:
        model = common.add_lora(model, **lora, train_head=args.lora_head)
    prep_time_s = time.perf_counter() - start

    # 2. One shuffled set: the training images with their labels (Dr too unless --no-retain) and the adversarial
    #    examples with theirs; the learning rate falls tenfold after every epoch.
    parts = [data.subset("retain")] if args.retain else []
    parts += [(x_forget, y_forget), (x_adv, y_adv)]
    images = torch.cat([x.float() for x, _ in parts])
    labels = torch.cat([y for _, y in parts])
    is_adversarial = torch.arange(len(images), device=images.device) >= len(images) - len(x_adv)
    targets = torch.stack([labels, is_adversarial.long()], 1)
    optimizer = common.make_optimizer(args.optimizer, model.parameters(), args.lr, args.weight_decay)
    steps_per_epoch = math.ceil(len(images) / args.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: args.lr_decay ** (step // steps_per_epoch))
    result = common.train_loop(
        model, optimizer, args.epochs, common.shuffled_batches(images, targets, args.batch_size, gen),
        mixed_set_loss(data.info, arch.input_size, augment=args.augment, gen=gen), device=device, desc=METHOD,
        scheduler=scheduler, freeze_bn=args.lora and not args.update_bn, compile_mode=args.compile)

    model = common.merge_lora(model) if args.lora else model
    adversarial = dict(median_radius=float(radii.median()), unflipped=int((y_adv == y_forget).sum()))
    saved = common.save_unlearned(model, out, method=METHOD, original=args.model, original_meta=meta, data=data,
                                  config=config, result=result, overwrite=args.overwrite, prep_time_s=prep_time_s,
                                  extra=dict(adversarial_examples=adversarial))
    common.print_summary(saved, out)


if __name__ == "__main__":
    common.run_main(main)
