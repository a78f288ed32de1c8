"""The command line: the project's argparse with one-line errors, typed numbers, the flag groups every stage
shares (grouped as timm's), and run_main, the entry point every script ends with."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Callable


from .errors import UserError
from .system import keep_freed_memory, torchrun_world_size
from .data import DATASETS
from .training import COMPILE_MODES
from .pruning import PRUNE_METHODS
from .batchnorm import BN_CALIBRATION_IMAGES
from .outputs import release_claims


def run_main(main: Callable[[], None]) -> None:
    """Every script's entry point, and the one place that changes process-wide state:
    - glibc's malloc keeps freed memory for reuse (system.keep_freed_memory; CPU training steps);
    - under torchrun (WORLD_SIZE > 1), every process but rank 0 prints nothing (one report);
    - a UserError becomes a one-line `error: ...` and exit status 2;
    - the output locks the run still holds are removed on every exit path (outputs.release_claims);
    - a torchrun process leaves with os._exit, skipping the interpreter's and C++'s teardown:
      DistributedDataParallel keeps its gloo process group, and that group's threads, alive past
      destroy_process_group (torch 2.14), and destroying them during teardown now and then aborts the process
      (SIGABRT) after its work is done and saved, which fails the whole torchrun job."""
    keep_freed_memory()
    if torchrun_world_size() > 1 and int(os.environ.get("RANK", "0")):
        sys.stdout = open(os.devnull, "w")
    try:
        main()
        status = 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        status = 2
    finally:
        release_claims()
    if torchrun_world_size() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    if status:
        sys.exit(status)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's one-line errors: `prog: error: ...` on stderr, exit status 2, no usage dump."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _number(kind, name: str, ok: Callable[[float], bool]):
    """An argparse type: a finite number of `kind` for which ok(value) holds; argparse reports anything else."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {name}") from None
        if not math.isfinite(value) or not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {name}")
        return value
    parse.__name__ = name
    return parse


positive_int = _number(int, "a positive integer", lambda v: v > 0)


non_negative_int = _number(int, "a non-negative integer", lambda v: v >= 0)


positive_float = _number(float, "a finite positive number", lambda v: v > 0)


non_negative_float = _number(float, "a finite non-negative number", lambda v: v >= 0)


unit_fraction = _number(float, "a fraction in [0, 1)", lambda v: 0 <= v < 1)


def device_name(text: str) -> str:
    """auto, cpu, cuda or cuda:N (an argparse type)."""
    if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a device: use auto, cpu, cuda or cuda:N")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10", help=f"one of {', '.join(DATASETS)} (default: %(default)s)")
    g.add_argument("--data-dir", default="./data", help="torchvision dataset root (default: %(default)s)")
    g.add_argument("--download", action="store_true", help="let torchvision download missing data")
    g.add_argument("--val-fraction", type=unit_fraction, default=0.1,
                   help="per-class validation hold-out; 0 keeps every training image (default: %(default)s)")
    g.add_argument("--split-seed", type=non_negative_int, default=0,
                   help="seed of the train/val split (default: %(default)s)")
    g.add_argument("--train-subset", type=non_negative_int, default=0,
                   help="keep only N random training images, for quick runs; 0 = all (default: %(default)s)")
    g.add_argument("--shadow", default=None, metavar="k/N",
                   help="train on shadow k of N's half of the training split (audit.py lira's shadow models); "
                        "--forget-random then forgets those of its images the half holds")


class _RandomForget(argparse.Action):
    """--forget-random N: random-sample forgetting, which replaces the default forget class."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.forget_random, namespace.forget_class = values, None


def add_forget_args(parser: argparse.ArgumentParser, *, forget_class: int) -> None:
    """--forget-class K (default forget_class) or --forget-random N, never both; --forget-seed."""
    g = parser.add_argument_group("forget set")
    kind = g.add_mutually_exclusive_group()
    # The default as a string, which argparse converts when the flag is absent: an explicit --forget-class K
    # then never is the default object, so argparse refuses it beside --forget-random even when K is the default.
    kind.add_argument("--forget-class", type=non_negative_int, default=str(forget_class), metavar="K",
                      help="class-wise forgetting of class K (default: %(default)s)")
    kind.add_argument("--forget-random", type=positive_int, default=0, action=_RandomForget, metavar="N",
                      help="random-sample forgetting of N training images instead")
    g.add_argument("--forget-seed", type=non_negative_int, default=0,
                   help="seed that draws the random forget set (default: %(default)s)")


def add_run_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("run")
    g.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of initialisation and batch order (default: %(default)s)")
    g.add_argument("--device", type=device_name, default="auto",
                   help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    g.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES, metavar="MODE",
                   help="torch.compile the training step in this mode (default: default; reduce-overhead: CUDA "
                        "graphs; for CUDA, compiling takes a minute or more; results match eager to bf16 tolerance)")
    g.add_argument("--out-dir", default="model_weights", help="where checkpoints go (default: %(default)s)")
    g.add_argument("--out", default=None, help="output .safetensors path (default: a descriptive name in --out-dir)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output")


def unlearn_parser(doc: str, *, forget_class: int) -> argparse.ArgumentParser:
    """Parser with the flags every unlearning script shares: the model to unlearn, the forget set, the run."""
    parser = ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint of the original model (pretrain.py's output)")
    parser.add_argument("--data-dir", default="./data", help="torchvision dataset root (default: %(default)s)")
    add_forget_args(parser, forget_class=forget_class)
    add_run_args(parser)
    return parser


def add_optim_args(parser: argparse.ArgumentParser, *, epochs: int, lr: float, batch_size: int, optimizer: str,
                   weight_decay: float, augment: bool) -> None:
    """The update's optimisation flags, with a method's own defaults."""
    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=epochs, help="(default: %(default)s)")
    g.add_argument("--lr", type=positive_float, default=lr, help="(default: %(default)s)")
    g.add_argument("--batch-size", type=positive_int, default=batch_size, help="(default: %(default)s)")
    g.add_argument("--optimizer", default=optimizer, choices=["adam", "adamw", "sgd"],
                   help="sgd uses momentum 0.9 (default: %(default)s)")
    g.add_argument("--weight-decay", type=non_negative_float, default=weight_decay, help="(default: %(default)s)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=augment,
                   help="random crop + flip on the batches (default: %(default)s)")


def add_prune_args(parser: argparse.ArgumentParser, *, method: str, sparsity: float,
                   shrink: bool | None = None) -> None:
    """Flags of the pruning step; method "none" (scripts where pruning is an option) skips it by default.
    shrink=True/False also adds --shrink/--no-shrink with that default (scripts that can train shrunk)."""
    g = parser.add_argument_group("pruning")
    g.add_argument("--prune", default=method, choices=(["none"] if method == "none" else []) + PRUNE_METHODS,
                   help="l2-structured: whole filters/rows by L2 norm, per layer; l1-global: single weights by "
                        "|w| over all layers (default: %(default)s)")
    g.add_argument("--sparsity", type=unit_fraction, default=sparsity, help="fraction pruned (default: %(default)s)")
    g.add_argument("--allow-regrowth", action="store_true",
                   help="drop the pruning masks before the update, as the seed code did (pruned weights regrow)")
    g.add_argument("--recalibrate-bn", action=argparse.BooleanOptionalAction, default=True,
                   help="after pruning, re-estimate BatchNorm statistics on Dr; not with --allow-regrowth, whose "
                        "pruned channels would then be scaled by 1/sqrt(eps) as they regrow (default: %(default)s)")
    g.add_argument("--calibration-images", type=positive_int, default=BN_CALIBRATION_IMAGES,
                   help="Dr images (at most) for that re-estimation, a forward over them (default: %(default)s)")
    if shrink is not None:
        g.add_argument("--shrink", action=argparse.BooleanOptionalAction, default=shrink,
                       help="train a physically smaller network: the pruned filters and the inputs they feed "
                            "removed, their constant outputs kept; the saved model is the usual masked one; "
                            "l2-structured only (default: %(default)s)")


def add_lora_args(parser: argparse.ArgumentParser, *, lora: bool | None = None, train_head: bool = True) -> None:
    """Flags of the LoRA step; lora=True/False also adds the --lora/--no-lora switch with that default (scripts
    where LoRA is an option), None leaves it out (scripts that always adapt through LoRA)."""
    g = parser.add_argument_group("LoRA")
    if lora is not None:
        g.add_argument("--lora", action=argparse.BooleanOptionalAction, default=lora,
                       help="train LoRA adapters (+ head) instead of all weights (default: %(default)s)")
    g.add_argument("--lora-rank", type=positive_int, default=None, help="default: 8 for ResNets, 16 for ViTs")
    g.add_argument("--lora-alpha", type=positive_float, default=None, help="default: 16 for ResNets, 32 for ViTs")
    g.add_argument("--lora-dropout", type=unit_fraction, default=None, help="default: 0.1 for ResNets, 0 for ViTs")
    g.add_argument("--lora-targets", default=None,
                   help="regex or comma-separated module-name suffixes (default: the residual blocks' convs; "
                        "the ViT blocks' qkv, proj, fc1, fc2)")
    g.add_argument("--lora-head", action=argparse.BooleanOptionalAction, default=train_head,
                   help="train the classifier head beside the adapters (default: %(default)s)")
    g.add_argument("--update-bn", action="store_true", help="let BatchNorm running statistics update in LoRA mode")


def print_config(title: str, config: dict) -> None:
    print(f"{title}: " + json.dumps(config, default=str))
