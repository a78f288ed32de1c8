"""The method scripts as recipes, in-process: each paper constant at the top is its flag's default, bad flags and
contradictory forget sets stop with argparse's one-line error, and a whole PruneLoRA run (prune, LoRA, BatchNorm
re-estimation, training, merge, save) works through main() on a small real model."""
import importlib
import os
import re
import stat
import sys

import pytest
import torch
from safetensors.torch import load_file

import common

SCRIPTS = ["finetune", "pruneft", "lora", "loraprune", "ga", "rl", "l1sparse", "ff", "iu", "rfa", "salun", "scrub",
           "ssd", "neggradplus", "badteacher"]
# Upstream constants that are deliberately not flags (Golatkar et al.'s clamps and scales in ff.py).
NOT_FLAGS = {"METHOD", "LOSS_FREE_METHOD", "MAX_VAR", "MAX_VAR_HEAD", "SCALE_HEAD_AND_1D", "FORGET_ROW_VAR"}


def _main(script: str, argv: list, monkeypatch):
    """Run script.main() with this command line, in this process."""
    module = importlib.import_module(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *map(str, argv)])
    return module.main()


def _exit_line(script, argv, monkeypatch, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        _main(script, argv, monkeypatch)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_constant_at_the_top_is_its_flags_default(script, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapped help texts
    with pytest.raises(SystemExit) as stop:
        _main(script, ["--help"], monkeypatch)
    assert stop.value.code == 0
    entries = re.split(r"\n  (?=-)", capsys.readouterr().out.split("options:", 1)[1])  # one per flag
    flags = {entry.split()[0].rstrip(","): re.search(r"\(default: (.*?)\)", entry)[1]
             for entry in entries if entry.startswith("--") and "(default: " in entry}
    module = importlib.import_module(script)
    constants = {name: value for name, value in vars(module).items()
                 if name.isupper() and isinstance(value, (bool, int, float, str)) and name not in NOT_FLAGS}
    assert "FORGET_CLASS" in constants
    for name, value in constants.items():
        flag = "--" + name.lower().replace("_", "-")
        assert flag in flags, f"{script}.{name} has no flag {flag}"
        assert flags[flag] == str(value), (script, flag, flags[flag], value)


@pytest.mark.parametrize("script, argv, flag", [
    ("finetune", ["--epochs", "0"], "--epochs"), ("lora", ["--lr", "nan"], "--lr"),
    ("pruneft", ["--sparsity", "1.0"], "--sparsity"), ("loraprune", ["--prune", "random"], "--prune"),
    ("loraprune", ["--lora-dropout", "1"], "--lora-dropout"), ("ga", ["--batch-size", "0"], "--batch-size"),
    ("rl", ["--forget-class", "-1"], "--forget-class"), ("ff", ["--alpha", "-1e-6"], "--alpha"),
    ("iu", ["--damping", "0"], "--damping"), ("rfa", ["--target", "elsewhere"], "--target"),
    ("l1sparse", ["--forget-random", "0"], "--forget-random"), ("finetune", ["--sparsity", "0.5"], "--sparsity"),
    ("finetune", ["--forget-class", "3", "--forget-random", "100"], "--forget"),
    ("loraprune", ["--forget-random", "100", "--forget-class", "3"], "--forget"),
    ("salun", ["--mask-fraction", "1.5"], "--mask-fraction"), ("scrub", ["--temperature", "0"], "--temperature"),
    ("ssd", ["--selection", "-1"], "--selection"), ("neggradplus", ["--beta", "2"], "--beta"),
    ("badteacher", ["--retain-share", "1"], "--retain-share"),
])
def test_bad_flags_stop_with_one_line_before_any_work(script, argv, flag, monkeypatch, capsys, tmp_path):
    line = _exit_line(script, ["--model", tmp_path / "absent.safetensors", "--out-dir", tmp_path, *argv],
                      monkeypatch, capsys)
    assert "error" in line and flag in line
    assert list(tmp_path.iterdir()) == []


def test_a_missing_model_stops_before_anything_is_written(monkeypatch, tmp_path):
    with pytest.raises(common.UserError, match="not found"):
        _main("finetune", ["--model", tmp_path / "absent.safetensors", "--out-dir", tmp_path], monkeypatch)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def small_original(data_dir, tmp_path_factory):
    """An untrained resnet_tiny saved as the original of a 600-image Fashion-MNIST subset (in-process, seconds)."""
    data = common.make_data("fashion-mnist", data_dir, train_subset=600)
    common.seed_everything(0)
    model = common.build_model("resnet_tiny", data.info)
    path = tmp_path_factory.mktemp("recipes") / "original.safetensors"
    common.save_checkpoint(model, path, arch="resnet_tiny", method="original", data=data, config={}, result=None,
                           trainable_params=common.count_params(model)[0])
    return path


def test_a_checkpoint_is_readable_by_whom_the_umask_allows(small_original, data_dir, tmp_path):
    # safetensors creates its file with mode 0600: teammates on a shared cluster could not read the weights.
    model, _ = common.load_checkpoint(small_original)
    data = common.make_data("fashion-mnist", data_dir, train_subset=600)
    umask = os.umask(0o022)
    try:
        common.save_checkpoint(model, tmp_path / "copy.safetensors", arch="resnet_tiny", method="original",
                               data=data, config={}, result=None, trainable_params=0)
    finally:
        os.umask(umask)
    assert {path.name: stat.S_IMODE(path.stat().st_mode) for path in tmp_path.iterdir()} == {
        "copy.safetensors": 0o644, "copy.json": 0o644}


def test_loraprune_main_runs_its_recipe_and_keeps_the_pruned_sparsity(small_original, data_dir, tmp_path,
                                                                       monkeypatch, capsys):
    out = tmp_path / "loraprune.safetensors"
    _main("loraprune", ["--model", small_original, "--data-dir", data_dir, "--epochs", "1", "--forget-random", "60",
                        "--out", out], monkeypatch)
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0].startswith("loraprune: {") and printed[-1].endswith(f"-> {out}")
    meta = common.read_sidecar(out)
    assert meta["method"] == "loraprune" and meta["data"]["forget_count"] == 60
    assert meta["config"]["lora_settings"] == dict(common.LORA_DEFAULTS["resnet"])  # the resolved settings are recorded
    assert meta["sparsity"] == meta["sparsity_after_pruning"] == pytest.approx(0.5, abs=0.01)
    assert meta["trainable_params"] < 0.2 * meta["total_params"] and len(meta["history"]) == 1
    weights = load_file(str(out))
    assert not any("lora_" in key or key.endswith(("_orig", "_mask")) for key in weights)  # merged, plain
    original = load_file(str(small_original))
    moved = [key for key in weights if "running_mean" in key and not torch.equal(weights[key], original[key])]
    assert moved  # BatchNorm statistics re-estimated after pruning (and frozen while training)


def test_lora_main_merges_its_adapters_and_leaves_batchnorm_statistics_as_they_were(small_original, data_dir,
                                                                                     tmp_path, monkeypatch):
    out = tmp_path / "lora.safetensors"
    _main("lora", ["--model", small_original, "--data-dir", data_dir, "--epochs", "1", "--forget-random", "60",
                   "--out", out], monkeypatch)
    weights, original = load_file(str(out)), load_file(str(small_original))
    statistics = [key for key in weights if key.endswith(("running_mean", "running_var"))]
    assert statistics and all(torch.equal(weights[key], original[key]) for key in statistics)
    assert not torch.equal(weights["fc.weight"], original["fc.weight"])  # it trained (the head beside the adapters)


def test_pretrain_main_trains_with_its_recipe_on_augmented_batches(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "original.safetensors"
    _main("pretrain", ["--dataset", "fashion-mnist", "--arch", "resnet_tiny", "--train-subset", "300", "--epochs", "1",
                       "--data-dir", data_dir, "--out", out], monkeypatch)
    meta = common.read_sidecar(out)
    assert meta["method"] == "original" and meta["config"]["augment"] is True and len(meta["history"]) == 1
