"""The sweeps' data: the method registry (name -> script and flags), the tuning candidates, the profiles that
reproduce.py runs and the audit profiles. Edit here to add a method to the sweeps or a profile; no mechanics."""
from __future__ import annotations

from .errors import UserError


# name -> (script, extra flags): methods join a profile's grid by name.
METHODS = {
    "finetune": ("finetune.py", []),
    "pruneft": ("pruneft.py", []),
    "lora": ("lora.py", []),
    "loraprune": ("loraprune.py", []),
    "ft-sparse": ("finetune.py", ["--optimizer", "sgd", "--lr", "0.01", "--epochs", "10", "--batch-size", "256",
                                  "--weight-decay", "5e-4", "--augment"]),  # Unlearn-Sparse FT
    "ga": ("ga.py", []),
    "rl": ("rl.py", []),
    "rl-mixed": ("rl.py", ["--mixed-pass"]),  # one pass over Df and Dr mixed (the SalUn authors' CIFAR-100 order)
    "l1sparse": ("l1sparse.py", []),
    "ff": ("ff.py", []),
    "iu": ("iu.py", []),
    "ff-noise-only": ("ff.py", ["--no-zero-forget-head"]),  # FF's noise without Golatkar's head-row reset
    "rfa": ("rfa.py", []),
    "salun": ("salun.py", []),
    "scrub": ("scrub.py", []),
    "ssd": ("ssd.py", []),
    "ssd-mixed": ("ssd.py", ["--mixed-batches"]),  # SSD's importances over mixed batches (our earlier default)
    "lf-ssd": ("ssd.py", ["--loss-free"]),  # loss-free SSD (Foster et al. 2024, ICLR Tiny Papers)
    "neggradplus": ("neggradplus.py", []),
    "badteacher": ("badteacher.py", []),
    "delete": ("delete.py", []),  # class-wise only (CLASS_WISE_ONLY)
    "amun": ("amun.py", []),
    "sfron": ("sfron.py", []),
    "salun-lora": ("salun.py", ["--lora"]),  # the leading methods through LoRA adapters (+ head); on an OMP
    "scrub-lora": ("scrub.py", ["--lora"]),  # model, "prune, then adapt, then unlearn"
    "neggradplus-lora": ("neggradplus.py", ["--lora"]),
    "badteacher-lora": ("badteacher.py", ["--lora"]),
}


# Methods defined for class-wise forgetting only: a sweep runs them on its class-wise forget sets and skips them on
# random-sample ones (their scripts refuse --forget-random).
CLASS_WISE_ONLY = ("delete",)


# Candidate settings of the methods whose published default is not settled, the authors' default first. A
# profile that tunes a method runs every candidate on its first seed and first forget setting of each kind
# (class-wise, random-sample), scores them with evaluate.py --split val, and uses the one with the smallest
# validation Avg Gap to Retrain in the whole grid of that kind (ties: the earlier candidate).
TUNING = {
    # GA: the Unlearn-Sparse README's lr and the maintainers' later advice, each also without augmentation ("rl")
    "ga": [["--lr", "1e-4"], ["--lr", "5e-4"], ["--lr", "1e-4", "--no-augment"], ["--lr", "5e-4", "--no-augment"]],
    "ft-sparse": [[], ["--no-augment"]],
    "ff": [["--alpha", "1e-6"], ["--alpha", "1e-7"], ["--alpha", "1e-8"]],  # Golatkar et al.'s range
    "iu": [["--alpha", "1"], ["--alpha", "2"], ["--damping", "1"], ["--damping", "0.1"]],  # Newton step, twice it;
    # the Fisher damping 3x either side of iu.py's 0.3
    "l1sparse": [["--alpha", "5e-5"], ["--alpha", "1e-4"], ["--alpha", "5e-5", "--no-augment"],
                 ["--alpha", "1e-4", "--no-augment"]],  # the useful range for small nets (l1sparse.py)
    "rfa": [["--target", "nearest-class-mean"], ["--target", "teacher-ce"]],
    # The leading methods: no upstream recipe for these small settings (SCRUB, NegGrad+, SSD) or an lr tuned for
    # CIFAR-10 ResNet-18 (SalUn); adapters usually want a larger step than full weights.
    "salun": [[], ["--lr", "0.005"], ["--no-augment"], ["--lr", "0.005", "--no-augment"]],
    "salun-lora": [[], ["--lr", "0.05"]],
    "scrub": [[], ["--lr", "0.005"], ["--max-steps", "3", "--epochs", "5", "--gamma", "1", "--alpha", "0.5",
                                      "--temperature", "2"]],  # the large-scale setting, 10x its lr, small-scale
    "scrub-lora": [[], ["--lr", "0.005"], ["--lr", "0.05"]],
    # SSD's alpha: larger dampens fewer weights. With upstream's importance batches a resnet_tiny forgets class 3
    # at 7 and loses Dr below 5 (ssd.py's docstring); LF-SSD's range lies lower (3 forgets, 1 costs Dr).
    "ssd": [["--selection", "10"], ["--selection", "7"], ["--selection", "5"], ["--selection", "3"]],
    "lf-ssd": [["--selection", "10"], ["--selection", "5"], ["--selection", "3"], ["--selection", "2"]],
    "ssd-mixed": [["--selection", "10"], ["--selection", "3"], ["--selection", "30"], ["--selection", "100"]],  # the
    # candidates of the cpu-fashion-leading rows (mixed batches then): 30 chosen class-wise, 3 random-sample
    "neggradplus": [["--beta", "0.9999"], ["--beta", "0.999"], ["--beta", "0.99"], ["--beta", "0.95"]],
    "neggradplus-lora": [["--beta", "0.9999"], ["--beta", "0.999"], ["--beta", "0.99"], ["--beta", "0.95"]],
    # DELETE: the authors' lr is for CIFAR-10 ResNet-18 (SGD, 20 epochs); at 1e-4 a resnet_tiny keeps 22% of Df.
    "delete": [[], ["--lr", "5e-4"], ["--lr", "1e-3"], ["--lr", "1e-3", "--no-augment"]],
    # SFR-on: the authors' alpha is for CIFAR-10 ResNet-18; half and twice it. Their 1,500 iterations of 128 Dr
    # images are 4.3 passes over CIFAR-10's Dr but 16 over the CPU grid's 12,000 images: 400 keeps their passes.
    # Their lr and augmentation too (the CPU originals train without augmentation), each alone and with alpha 12.5.
    "sfron": [[], ["--forget-alpha", "12.5"], ["--forget-alpha", "50"], ["--iterations", "400"], ["--lr", "0.001"],
              ["--no-augment"], ["--forget-alpha", "12.5", "--iterations", "400"],
              ["--forget-alpha", "12.5", "--lr", "0.001"], ["--forget-alpha", "12.5", "--no-augment"]],
    # Methods whose authors' loaders augment (DELETE, FT, GA, l1-sparse, SalUn above too), on originals that trained
    # without augmentation: as the authors run them, and without it, which moved SFR-on most (RESULTS.md). On a
    # grid whose originals augment (the CIFAR-10 profiles) the second candidate costs a run and is not expected to
    # win.
    "rl": [[], ["--no-augment"]],
    "rl-mixed": [[], ["--no-augment"]],
    "amun": [[], ["--no-augment"]],
}


# The CPU profiles' pretraining recipe: a 12,000-image subset, 15 epochs, no augmentation. It converges (about
# 99% training accuracy; validation accuracy flat over the last 4 epochs) and memorises its training images, so
# random-sample forgetting is measurable (the original's MIA-efficacy is well below Retrain's). Chosen on the
# validation split and the training accuracy only (RESULTS.md).
CPU_CONVERGED = ["--train-subset", "12000", "--epochs", "15", "--augment", "false"]


MIN_RETRAIN_SEEDS = 3  # Retrains per forget set, at least: the seed-noise floor needs pairs


# The grid the CPU profiles of the Unlearn-Sparse, RFA and leading methods share (their rows compare directly):
# converged originals, class 3 and 1,200 random images, seeds 0-2.
CPU_GRID = dict(dataset="fashion-mnist", archs=["resnet_tiny"], pretrain=CPU_CONVERGED,
                forgets=[["--forget-class", "3"], ["--forget-random", "1200"]], seeds=[0, 1, 2])


# A profile: dataset and architectures, pretraining flags, forget settings, seeds, methods (with per-profile
# extra flags), OMP sparsities whose pruned originals every method also runs on, and the method whose pruning
# mask gives the sparse Retrain that rows pruning during unlearning are also compared with (sparse_reference_of).
PROFILES = {
    "cpu-fashion": dict(  # the PruneLoRA methods at the paper's defaults, on CPU, converged originals
        dataset="fashion-mnist", archs=["resnet_tiny"], pretrain=CPU_CONVERGED,
        forgets=[["--forget-class", "3"], ["--forget-class", "0"], ["--forget-class", "8"],
                 ["--forget-random", "1200"]], seeds=[0, 1, 2],
        methods=["finetune", "pruneft", "lora", "loraprune"], sparse_reference_of="pruneft"),
    "cpu-fashion-sparse": dict(  # the Unlearn-Sparse methods, dense and at 50% OMP sparsity
        CPU_GRID, methods=["ft-sparse", "ga", "rl", "ff", "iu", "l1sparse"], omp=[0.5],
        tune=["ga", "ff", "iu", "l1sparse"]),
    "cpu-fashion-rfa": dict(  # RFA-style, its shift target chosen on the validation split
        CPU_GRID, methods=["rfa"], tune=["rfa"]),  # compare with the cpu-fashion rows of the same forget sets
    # The leading methods: dense, OMP 50%, LoRA, both. AMUN runs at its authors' settings (not tuned): its
    # adversarial search takes about 2 minutes per 1,200 images on 2 cores, a few Retrains' worth per run.
    "cpu-fashion-leading": dict(
        CPU_GRID, methods=["salun", "scrub", "ssd", "lf-ssd", "neggradplus", "badteacher", "sfron", "amun", "delete",
                           "salun-lora", "scrub-lora", "neggradplus-lora", "badteacher-lora"], omp=[0.5],
        tune=["salun", "salun-lora", "scrub", "scrub-lora", "ssd", "lf-ssd", "neggradplus", "neggradplus-lora",
              "sfron", "delete"]),
    # Today's code on the leading profile's grid: the newest methods, and each fidelity fix beside the behaviour
    # it replaced on the same models (SSD's importance batches; RL's pass order, the cpu-fashion-sparse method),
    # Bad Teacher again as the bridge; and the other methods whose authors augment (FT, GA, l1-sparse, SalUn), each
    # also tried without augmentation, as the originals trained. The earlier profiles' rows predate CPU training in
    # channels_last, so their originals (same recipe and seeds) differ from these in the last digits of every weight.
    "cpu-fashion-newest": dict(
        CPU_GRID, methods=["ssd", "ssd-mixed", "lf-ssd", "delete", "badteacher", "rl", "rl-mixed", "amun", "sfron",
                           "ft-sparse", "ga", "l1sparse", "salun"],
        omp=[0.5], tune=["ssd", "ssd-mixed", "lf-ssd", "delete", "sfron", "rl", "rl-mixed", "amun", "ft-sparse", "ga",
                         "l1sparse", "salun"]),
    "paper-cifar10": dict(  # PruneLoRA paper: CIFAR-10, all 50,000 training images, class 3 (cat); GPU
        dataset="cifar10", archs=["resnet50", "vit_small"], pretrain=["--val-fraction", "0"],
        forgets=[["--forget-class", "3"]], seeds=[0], methods=["finetune", "pruneft", "lora", "loraprune"],
        sparse_reference_of="pruneft"),
    "unlearn-sparse-cifar10": dict(  # Unlearn-Sparse: ResNet-18, class 0 and random 10%, OMP 50%/95%; GPU
        dataset="cifar10", archs=["resnet18"], pretrain=[],
        forgets=[["--forget-class", "0"], ["--forget-random", "4500"]], seeds=[0],
        methods=["ft-sparse", "ga", "rl", "ff", "iu", "l1sparse"], omp=[0.5, 0.95],
        tune=["ga", "ff", "iu", "l1sparse"]),
    "smoke": dict(  # seconds-sized, for the tests
        dataset="fashion-mnist", archs=["resnet_tiny"],
        pretrain=["--epochs", "1", "--train-subset", "2000", "--val-fraction", "0.02"],  # 1,200 validation images
        forgets=[["--forget-class", "3"]], seeds=[0], methods=["finetune", "loraprune"], omp=[0.5],
        omp_flags=["--rewind-epoch", "0"],
        method_flags={"finetune": ["--epochs", "1"], "loraprune": ["--epochs", "1"]}),
}


# The methods the population audits unlearn with (the PruneLoRA four, the Unlearn-Sparse methods, the leading ones),
# at the settings the random1200 tuning chose on validation (LF-SSD's alpha, SFR-on and AMUN: their defaults; the
# cpu-fashion-newest tuning since chose LF-SSD 10, which leaves the model as 3 does, and SFR-on forget-alpha 12.5
# with --no-augment).
# DELETE is class-wise only; the populations forget random images.
AUDITED_METHODS = ["finetune", "pruneft", "lora", "loraprune", "ft-sparse", "ga", "rl", "ff", "iu", "l1sparse",
                   "salun", "scrub", "ssd", "lf-ssd", "neggradplus", "badteacher", "sfron", "amun"]
AUDITED_METHOD_FLAGS = {"ga": ["--lr", "5e-4"], "salun": ["--lr", "0.005"], "scrub": ["--lr", "0.005"],
                        "ssd": ["--selection", "3"], "lf-ssd": ["--selection", "3"], "neggradplus": ["--beta", "0.95"],
                        "ff": ["--alpha", "1e-6"], "iu": ["--damping", "0.1"], "l1sparse": ["--alpha", "5e-5"]}


# Audit profiles: audit.py's probe and relearn on every model of finished profiles (their results.csv; seed and
# forget settings as listed), U-LiRA and RMIA on a shadow population of its own (audit.py lira, rmia; None: left
# out), and KLOM on populations of its own (audit.py klom; absent: left out).
AUDIT_PROFILES = {
    "cpu-fashion-audit": dict(
        of=["cpu-fashion", "cpu-fashion-sparse", "cpu-fashion-rfa", "cpu-fashion-leading"], seeds=[0],
        probe=["class3", "random1200"],
        relearn=["class3"],  # a Retrain already classifies held-out random Df images near the original's level
        lira=dict(  # random-sample forgetting on 2,000-image halves; settings the random1200 tuning chose
            pretrain=["--dataset", "fashion-mnist", "--arch", "resnet_tiny", "--train-subset", "4000", "--epochs",
                      "30", "--augment", "false"],  # converged: 100% train accuracy, validation flat
            methods=AUDITED_METHODS, method_flags=AUDITED_METHOD_FLAGS,
            shadows=16, pool=500),
        klom=dict(  # 16 models per population (the authors use 100; see common.klom.KLOM_MODELS for the floor);
            # 304 models with the first 16 methods: about 3 h of training on 2 cores, 8 min of scoring (RESULTS.md);
            # SFR-on and AMUN add 32 runs, 31 min
            # U-LiRA's memorising recipe with 1,200 held-out images: at 8 epochs the original fit Df no better than
            # held-out data and was already within KLOM's floor (RESULTS.md)
            pretrain=["--dataset", "fashion-mnist", "--arch", "resnet_tiny", "--train-subset", "4000", "--epochs",
                      "30", "--augment", "false", "--val-fraction", "0.02"],
            forget=["--forget-random", "300", "--forget-seed", "0"],
            methods=AUDITED_METHODS, method_flags=AUDITED_METHOD_FLAGS,
            models=16)),
    "smoke-audit": dict(of=["smoke"], seeds=[0], probe=["class3"], relearn=["class3"], lira=None,
                        relearn_settings=dict(relearn_steps=20, relearn_forget=100, relearn_retain=300,
                                              relearn_held_out=250)),
}


def method_commands(names: list[str], extra: dict[str, list[str]]) -> dict[str, list[str]]:
    """Method name -> [script, *its flags in METHODS, *extra flags for it]."""
    unknown = [m for m in [*names, *extra] if m not in METHODS]
    if unknown:
        raise UserError(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    return {m: [METHODS[m][0], *METHODS[m][1], *extra.get(m, [])] for m in names}
