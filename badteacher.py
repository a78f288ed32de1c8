"""Bad Teacher (Chundawat et al. 2023, Sec. 3): the student, a copy of the original, is distilled on all of Df
from an incompetent teacher (a randomly initialised network of the same architecture) and on a random share of
Dr from the competent one (the original), both mixed in one shuffled set, with KL(teacher || student) at
temperature 1, as the authors' bad-teaching unlearn.py runs it.

    python badteacher.py --model model_weights/fashion-mnist_resnet_tiny_full_original_s0.safetensors --forget-class 3

prints the resolved config, one JSON line per epoch, then Acc(Df), Acc(Dr), test accuracy, cost and the path.
Works on dense or sparse (prune.py) models, masks kept; --lora trains LoRA adapters (+ head) as the student.
The KL is averaged over the batch (upstream's F.kl_div default also divides by the class count: a constant
factor that Adam's update does not see).
"""
import time

import torch

import common

METHOD = "badteacher"
FORGET_CLASS = 3  # the PruneLoRA paper's class (cat in CIFAR-10); --forget-random N forgets N random images
# The authors' settings (Chundawat et al. 2023, Sec. 4; unlearn.py): Adam lr 1e-4, 1 epoch, batch 256, T 1,
# 30% of Dr.
EPOCHS = 1
LR = 1e-4
BATCH_SIZE = 256
OPTIMIZER = "adam"
WEIGHT_DECAY = 0.0
AUGMENT = False  # the paper does not state it; off, as the PruneLoRA recipes
TEMPERATURE = 1.0
RETAIN_SHARE = 0.3  # the share of Dr distilled from the competent teacher
LORA = False  # True: train LoRA adapters + head instead of every weight


def teacher_targets_loss(competent, incompetent, info, input_size, *, temperature: float, augment: bool,
                         gen: torch.Generator):
    """train_loop's loss on (images, is_forget) batches: KL to the incompetent teacher on Df images, to the
    competent one on Dr images."""
    def loss_fn(student, batch):
        x, is_forget = batch
        if augment:
            x = common.augment(x, info, gen)
        x = common.normalize(x, info, input_size)
        with torch.no_grad():
            target = torch.where(is_forget[:, None], incompetent(x), competent(x))
        return common.distill_kl(student(x), target, temperature)
    return loss_fn


def main():
    parser = common.unlearn_parser(__doc__, forget_class=FORGET_CLASS)
    common.add_optim_args(parser, epochs=EPOCHS, lr=LR, batch_size=BATCH_SIZE, optimizer=OPTIMIZER,
                          weight_decay=WEIGHT_DECAY, augment=AUGMENT)
    g = parser.add_argument_group("Bad Teacher")
    g.add_argument("--temperature", type=common.positive_float, default=TEMPERATURE, help="(default: %(default)s)")
    g.add_argument("--retain-share", type=common.unit_fraction, default=RETAIN_SHARE,
                   help="share of Dr distilled from the original (default: %(default)s)")
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

    # 1. The teachers: the original, frozen (competent), and a random network of its architecture (incompetent).
    #    The student: the original itself, or LoRA adapters on it.
    start = time.perf_counter()
    competent = common.frozen_copy(model)
    incompetent = common.frozen_copy(common.prepare_model(common.random_model(meta["arch"], data.info), device))
    if args.lora:
        model = common.add_lora(model, **lora, train_head=args.lora_head)
    prep_time_s = time.perf_counter() - start

    # 2. All of Df and a random share of Dr, shuffled together; each image distilled from its teacher.
    x_forget, _ = data.subset("forget")
    x_retain, _ = data.subset("retain")
    x_retain = common.random_subset(x_retain, int(args.retain_share * len(x_retain)), gen)
    images = torch.cat([x_forget, x_retain])
    is_forget = torch.arange(len(images), device=images.device) < len(x_forget)
    optimizer = common.make_optimizer(args.optimizer, model.parameters(), args.lr, args.weight_decay)
    result = common.train_loop(
        model, optimizer, args.epochs, common.shuffled_batches(images, is_forget, args.batch_size, gen),
        teacher_targets_loss(competent, incompetent, data.info, arch.input_size, temperature=args.temperature,
                             augment=args.augment, gen=gen),
        device=device, desc=METHOD, freeze_bn=args.lora and not args.update_bn, compile_mode=args.compile)

    model = common.merge_lora(model) if args.lora else model
    saved = common.save_unlearned(model, out, method=METHOD, original=args.model, original_meta=meta, data=data,
                                  config=config, result=result, overwrite=args.overwrite, prep_time_s=prep_time_s)
    common.print_summary(saved, out)


if __name__ == "__main__":
    common.run_main(main)
