"""DELETE (Zhou et al., "Decoupled Distillation to Erase", CVPR 2025, Sec. 3.3): the student, a copy of the original,
is distilled on Df alone from the frozen original whose logit of each image's own class is masked out: the target
is the original's softmax over the other classes ("dark knowledge", renormalised), so the forgotten class's
probability goes to zero while the ranking among the remaining classes is kept. As the authors' method/delete.py
runs it: KL(target || student) averaged over the batch at temperature 1, the mask a logit of -1e10, the teacher in
eval mode and the student in train mode (BatchNorm statistics updated on Df batches), SGD momentum 0.9 without
weight decay, Df shuffled and augmented as in training (their config/cifar10_resnet18.yaml: 20 epochs, lr 1e-4,
batch 128; 5e-5 for their other datasets and architectures).

    python delete.py --model model_weights/fashion-mnist_resnet_tiny_full_original_s0.safetensors --forget-class 3

prints the resolved config, one JSON line per epoch, then Acc(Df), Acc(Dr), test accuracy, cost and the path.
Works on dense or sparse (prune.py) models, masks kept; --lora trains LoRA adapters (+ head) as the student.
Class-wise only: the paper defines and evaluates DELETE for forgetting classes and the authors' code builds only
class forget sets, so --forget-random is refused (masking each image's own label would be a method of our own).
"""
import time

import torch

import common

METHOD = "delete"
FORGET_CLASS = 3  # the PruneLoRA paper's class (cat in CIFAR-10)
# The authors' CIFAR-10 ResNet-18 settings (config/cifar10_resnet18.yaml; main.py's unlearning loop).
EPOCHS = 20
LR = 1e-4
BATCH_SIZE = 128
OPTIMIZER = "sgd"
WEIGHT_DECAY = 0.0
AUGMENT = True  # their forget loader reads the training set with its training transforms (crop + flip)
MASK_LOGIT = -1e10  # the forgotten class's teacher logit: its softmax probability becomes exactly 0
LORA = False  # True: train LoRA adapters + head instead of every weight


def masked_distillation_loss(teacher, info, input_size, *, augment: bool, gen: torch.Generator):
    """train_loop's loss on (images, labels) batches of Df: KL divergence from the teacher's softmax with each
    image's own class masked out (MASK_LOGIT) to the student's, averaged over the batch (temperature 1)."""
    def loss_fn(student, batch):
        x, y = batch
        if augment:
            x = common.augment(x, info, gen)
        x = common.normalize(x, info, input_size)
        with torch.no_grad():
            logits = teacher(x).float()
            own_class = y[:, None] == torch.arange(logits.shape[1], device=y.device)
            target = logits.masked_fill(own_class, MASK_LOGIT)
        return common.distill_kl(student(x), target, 1.0)
    return loss_fn


def main():
    parser = common.unlearn_parser(__doc__, forget_class=FORGET_CLASS)
    common.add_optim_args(parser, epochs=EPOCHS, lr=LR, batch_size=BATCH_SIZE, optimizer=OPTIMIZER,
                          weight_decay=WEIGHT_DECAY, augment=AUGMENT)
    common.add_lora_args(parser, lora=LORA)
    args = parser.parse_args()
    if args.forget_random:
        raise common.UserError("delete.py forgets classes (--forget-class K): DELETE is defined for class-wise "
                               "forgetting and its authors give no random-sample version")

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

    # 1. The teacher: the original, frozen. The student: the original itself, or LoRA adapters on it.
    start = time.perf_counter()
    teacher = common.frozen_copy(model)
    if args.lora:
        model = common.add_lora(model, **lora, train_head=args.lora_head)
    prep_time_s = time.perf_counter() - start

    # 2. Df only, shuffled each epoch: each image distilled towards the teacher's other classes.
    x_forget, y_forget = data.subset("forget")
    optimizer = common.make_optimizer(args.optimizer, model.parameters(), args.lr, args.weight_decay)
    result = common.train_loop(
        model, optimizer, args.epochs, common.shuffled_batches(x_forget, y_forget, args.batch_size, gen),
        masked_distillation_loss(teacher, data.info, arch.input_size, augment=args.augment, gen=gen),
        device=device, desc=METHOD, freeze_bn=args.lora and not args.update_bn, compile_mode=args.compile)

    model = common.merge_lora(model) if args.lora else model
    saved = common.save_unlearned(model, out, method=METHOD, original=args.model, original_meta=meta, data=data,
                                  config=config, result=result, overwrite=args.overwrite, prep_time_s=prep_time_s)
    common.print_summary(saved, out)


if __name__ == "__main__":
    common.run_main(main)
