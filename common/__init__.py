"""The helpers every script imports (`import common`), one concern per module, lower layers first:

    errors.py       UserError: the one-line `error:` that scripts exit with (status 2)
    locks.py        kernel-held file locks (flock): an output's owner, a data folder's unpacking
    system.py       seeds, devices, torchrun, bf16 autocast and channels_last
    data.py         datasets as tensors on the device; splits as index tensors; batches, augmentation
    models.py       architectures by name (ARCHS): timm ResNets and ViTs with small-image stems; copies
    pruning.py      structured and global magnitude pruning, masks, sparsity, the plain (mask-folded) state dict
    shrink.py       --shrink: a physically smaller copy of a structurally pruned model, and back
    adapters.py     LoRA through peft, with a lean forward that keeps masks exact; merging
    batchnorm.py    frozen, folded and re-estimated BatchNorm
    training.py     train_loop, shared losses, predict, optimizers and schedules
    outputs.py      claiming an output (lock files), atomic writes, report-file checks
    checkpoints.py  safetensors weights + JSON sidecar: save, read, verify, load
    cli.py          argparse with one-line errors, shared flag groups, run_main (every script's entry point)
    runs.py         the unlearning scripts' shared opening and closing steps (load, claim, save, summary)
    recipe.py       the from-scratch training recipe (pretrain.py, prune.py's rewinding and retraining)
    metrics.py      evaluate.py's metrics: accuracies' membership attacks, distances, Avg Gap; the table's columns
    references.py   what models may be compared: one split, architecture and forget set; Retrains of the recipe
    profiles.py     the sweeps' data: method registry, tuning candidates, profiles and audit profiles
    executors.py    where a sweep's runs execute: serial, local workers, SLURM through submitit, torchrun
    rungraph.py     a sweep's runs in dependency order, resumable (a finished run of the same flags is kept)
    results.py      a sweep's results.csv, its summary table and plots
    audits.py       linear-probe and relearning audits (audit.py probe, relearn)
    shadows.py      U-LiRA, the challenge's forget quality and RMIA on a shadow population (audit.py lira, rmia)
    klom.py         KLOM on populations of Retrains and of each method's runs (audit.py klom)

A module imports only the modules above it. Scripts call the names re-exported here (common.train_loop);
a name not re-exported is that module's own. Imports stand at the top of each module, except four libraries
that cost seconds to import and serve only some scripts, imported where used: peft (LoRA), scikit-learn (the
attacks and probes), matplotlib (plots) and submitit (SLURM)."""

from .errors import (  # noqa: F401
    UserError,
)
from .locks import (  # noqa: F401
    lock_file, owner_of, unlock_file, exclusive,
)
from .system import (  # noqa: F401
    seed_everything, device_and_generator, torchrun_world_size, init_distributed, pick_device,
    keep_freed_memory, autocast, prepare_model, peak_memory_mb, peak_memory_kind,
)
from .data import (  # noqa: F401
    DEBIAN_FASHION_MNIST, DatasetInfo, DATASETS, RANDOM_DATASETS, load_dataset, Data, SPLIT_KEYS, split_mismatch,
    shadow_members, index_hash, make_data, data_from_spec, augment, normalize, batches, random_subset,
    shuffled_batches,
)
from .models import (  # noqa: F401
    ArchSpec, ARCHS, VIT_BASE_HUB, build_model, classifier_name, count_params, copy_model, frozen_copy,
    random_model,
)
from .pruning import (  # noqa: F401
    prunable_modules, check_sparsity, structured_prune, global_magnitude_prune, PRUNE_METHODS, prune_model,
    pruned_modules, apply_masks, restore_masks, allow_regrowth, sparsity, plain_state_dict, output_row_mask,
    per_row, fold_frozen_masks, frozen_mask,
)
from .shrink import (  # noqa: F401
    ShrunkConv2d, ShrunkLinear, shrink_pruned, expand_pruned, is_shrunk,
)
from .adapters import (  # noqa: F401
    lora_drop_mask, LeanLoraLayer, LORA_DEFAULTS, lora_settings, add_lora, merge_lora,
)
from .batchnorm import (  # noqa: F401
    BN_CALIBRATION_IMAGES, set_train_mode, frozen_batchnorm, recalibrate_batchnorm,
)
from .training import (  # noqa: F401
    saved_activation_bytes, TrainResult, Stopwatch, train_loop, ce_loss, random_labels, random_label_epoch,
    distill_kl, batch_gradients, predict, accuracy, make_optimizer, COMPILE_MODES, compiled,
)
from .outputs import (  # noqa: F401
    sidecar_path, lock_path, claim_file, release_claim, release_claims, finished, check_output_files,
    check_writable, atomic_write, save_png, file_sha256, write_text,
)
from .checkpoints import (  # noqa: F401
    FORMAT, default_output, library_versions, WEIGHT_LIMIT, check_weights, save_checkpoint, SIDECAR_KEYS,
    DATA_KEYS, read_sidecar, load_checkpoint,
)
from .cli import (  # noqa: F401
    run_main, ArgumentParser, positive_int, non_negative_int, positive_float, non_negative_float,
    unit_fraction, device_name, add_data_args, add_forget_args, add_run_args, unlearn_parser, add_optim_args,
    add_prune_args, add_lora_args, print_config,
)
from .runs import (  # noqa: F401
    load_original, claim_output, quick_report, save_unlearned, print_summary,
)
from .recipe import (  # noqa: F401
    RECIPE_DEFAULTS, RECIPE_KEYS, recipe_of, param_groups, make_mixup, train_recipe, test_accuracy,
    make_scheduler,
)
from .metrics import (  # noqa: F401
    SVC_C, MIA_DRAWS, LEGEND, true_class_confidence, per_sample_loss, prediction_entropy, mia_members,
    mia_efficacy, loss_mia, entropy_mia, ATTACKS, membership_attacks, activation_distance, js_divergence,
    avg_gap, COLUMNS, HEADER_DIRECTIONS, markdown_table,
)
from .references import (  # noqa: F401
    check_compatible, REFERENCE_RECIPE_KEYS, MISSING_RECIPE_VALUES, pretrained_ancestor, starts_sparse,
    check_references, reference_name, checked_models, held_out, describe_forget,
)
from .profiles import (  # noqa: F401
    METHODS, CLASS_WISE_ONLY, TUNING, CPU_CONVERGED, MIN_RETRAIN_SEEDS, PROFILES, AUDIT_PROFILES, method_commands,
)
from .executors import (  # noqa: F401
    Executor, EXECUTORS, make_executor, add_executor_args, executor_from_args, DATA_PARALLEL_SCRIPTS,
    job_gpus, script_argv, command_line, WARM_IMPORTS, forks_warm, compile_cache_env,
)
from .rungraph import (  # noqa: F401
    stale_reason, PLUMBING_OPTIONS, PLUMBING_FLAGS, inputs_of, redo_reason, run_graph,
)
from .results import (  # noqa: F401
    KIND_NAMES, METRICS, CSV_FIELDS, write_rows, read_rows, merge_rows, compare_rows, audit_groups,
    relearn_plot, mean_std, SUMMARY_COLUMNS, SUMMARY_HEADERS, summary_table, plots,
)
from .audits import (  # noqa: F401
    PROBE_C, PROBE_MAX_ITER, RELEARN_FORGET, RELEARN_RETAIN, RELEARN_LR, RELEARN_BATCH_SIZE, RELEARN_STEPS,
    RELEARN_HELD_OUT, THRESHOLD, CURVE_STEPS, probe_row, relearn_data, relearn_curve, steps_to, audit, audit_markdown,
)
from .shadows import (  # noqa: F401
    SHADOWS, POOL, BOOTSTRAP, DELTA, EPSILON_CAP, THRESHOLDS_PER_UNIT, logit_confidence, shadow_runs,
    lira_scores, RMIA_GAMMA, RMIA_A_GRID, rmia_scores, roc_summary, lira_attack, example_epsilon,
    challenge_points, model_outputs, score_populations, shadow_outputs, probability_of_label, lira, lira_markdown,
    rmia_markdown, write_lira, roc_plot,
)
from .klom import (  # noqa: F401
    KLOM_BINS, KLOM_EPS, KLOM_CLIP, PERCENTILES, KLOM_MODELS, KLOM_SETS, binned_kl, klom, klom_percentiles,
    klom_runs, population_margins, klom_audit, klom_markdown, write_klom, klom_plot,
)
