"""Nothing lost, nothing silently wrong: races, diverged runs, invalid flags, corrupted inputs and sweeps that keep
every row, each through the real command line, asserting the exit status, the message and the files."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import common
from conftest import ROOT, copy_sidecar, run_script


def _one_error_line(proc) -> str:
    """The error a user sees: exit status 2, no traceback, and the message on the last stderr line."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return proc.stderr.strip().splitlines()[-1]


def _popen(script, *args):
    env = dict(os.environ, TQDM_DISABLE="1")
    return subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ---------------------------------------------------------------------------------------------------------
# Races and overwrites.

@pytest.mark.slow
def test_two_concurrent_runs_with_one_output_exactly_one_succeeds(original, data_dir, tmp_path):
    out = tmp_path / "ft.safetensors"
    runs = [_popen("finetune.py", "--model", original, "--forget-class", "3", "--epochs", "1", "--data-dir",
                   data_dir, "--out", out) for _ in range(2)]
    results = [(run.wait(timeout=600), run.stderr.read()) for run in runs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert "being written by another run" in loser or "exists" in loser
    model, meta = common.load_checkpoint(out)  # the winner's result is complete and loads
    assert meta["method"] == "finetune" and not list(tmp_path.glob(".*"))  # no lock or temp file left


@pytest.mark.slow
def test_evaluate_refuses_one_file_for_json_and_md_and_bench_keeps_its_outputs(original, retrain, data_dir,
                                                                                tmp_path):
    same = tmp_path / "out.txt"
    proc = run_script("evaluate.py", original, "--retrain", retrain, "--data-dir", data_dir, "--json", same,
                      "--md", same, check=False)
    assert "same file" in _one_error_line(proc) and not same.exists()
    md = tmp_path / "bench.md"
    md.write_text("keep")
    proc = run_script("bench.py", "--quick", "--device", "cpu", "--archs", "resnet_tiny", "--md", md, check=False)
    assert "--overwrite" in _one_error_line(proc) and md.read_text() == "keep"


@pytest.mark.slow
def test_unwritable_output_folders_are_found_before_any_work(original, retrain, data_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    proc = run_script("finetune.py", "--model", original, "--data-dir", data_dir, "--out",
                      blocker / "ft.safetensors", check=False)
    assert "cannot create the output folder" in _one_error_line(proc) and "epoch" not in proc.stdout
    proc = run_script("evaluate.py", original, "--retrain", retrain, "--data-dir", data_dir, "--json",
                      blocker / "rows.json", check=False)
    assert "cannot create the output folder" in _one_error_line(proc) and "| retrain |" not in proc.stdout


# ---------------------------------------------------------------------------------------------------------
# Diverged models are not results.

@pytest.mark.slow
@pytest.mark.parametrize("script, flags", [
    ("ga.py", ["--lr", "1e3", "--epochs", "2"]),
    ("finetune.py", ["--lr", "1e6", "--epochs", "1"]),
])
def test_a_diverged_run_exits_non_zero_and_writes_nothing(script, flags, original, data_dir, tmp_path):
    out = tmp_path / "x.safetensors"
    proc = run_script(script, "--model", original, *flags, "--data-dir", data_dir, "--out", out, check=False)
    assert "diverged" in _one_error_line(proc)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_weights_are_checked_finite_on_load_too(original, tmp_path):
    from safetensors.torch import load_file, save_file
    state = load_file(str(original))
    state["fc.weight"][0, 0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(state, str(bad))
    copy_sidecar(original, bad)
    with pytest.raises(common.UserError, match="NaN or inf"):
        common.load_checkpoint(bad)
    with pytest.raises(common.UserError, match="beyond"):
        common.check_weights({"layer.weight": torch.full((2,), 1e5)}, "x")
    common.check_weights({"bn.running_var": torch.full((2,), 1e5)}, "x")  # statistics are not weights


# ---------------------------------------------------------------------------------------------------------
# Invalid flags: argparse's one-line error, before anything runs.

@pytest.mark.slow
@pytest.mark.parametrize("script, flag, value", [
    ("finetune.py", "--epochs", "0"), ("finetune.py", "--batch-size", "-1"), ("finetune.py", "--batch-size", "0"),
    ("finetune.py", "--lr", "-1"), ("finetune.py", "--lr", "nan"), ("finetune.py", "--seed", "-1"),
    ("finetune.py", "--device", "foo"), ("pruneft.py", "--sparsity", "1.0"), ("ff.py", "--alpha", "-1e-6"),
    ("pretrain.py", "--epochs", "0"), ("evaluate.py", "--mia-draws", "0"), ("reproduce.py", "--seeds", "0,x"),
])
def test_invalid_flags_give_one_line_errors(script, flag, value, original, tmp_path):
    context = {"finetune.py": ["--model", original, "--out", tmp_path / "x.safetensors"],
               "pruneft.py": ["--model", original, "--out", tmp_path / "x.safetensors"],
               "ff.py": ["--model", original, "--out", tmp_path / "x.safetensors"],
               "pretrain.py": ["--arch", "resnet_tiny", "--out-dir", tmp_path], "evaluate.py": [original],
               "reproduce.py": ["--profile", "smoke", "--out-root", tmp_path]}[script]
    proc = run_script(script, *context, flag, value, check=False)
    line = _one_error_line(proc)
    assert "error" in line and flag in line
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# Corrupted inputs: one line, at once, nothing written.

def _copy_checkpoint(original, tmp_path, name="copy"):
    weights = tmp_path / f"{name}.safetensors"
    shutil.copy(original, weights)
    shutil.copy(common.sidecar_path(original), common.sidecar_path(weights))
    return weights


@pytest.mark.slow
@pytest.mark.parametrize("case, message", [
    ("invalid-json", "not valid UTF-8 JSON"), ("json-list", "not a unlearn-toolkit"),
    ("non-utf8", "not valid UTF-8 JSON"), ("missing-key", "lacks 'arch'"), ("no-weights-hash", "lacks 'weights_sha256'"),
    ("wrong-type", "for 'num_classes'"), ("directory", "not a regular file"), ("fifo", "not a regular file"),
    ("dev-zero", "not a regular file"), ("no-sidecar", "no sidecar"),
])
def test_corrupted_checkpoints_are_refused_at_once(case, message, original, data_dir, tmp_path):
    model = _copy_checkpoint(original, tmp_path)
    side = common.sidecar_path(model)
    meta = json.loads(side.read_text())
    if case == "invalid-json":
        side.write_text("{not json")
    elif case == "json-list":
        side.write_text("[1, 2]")
    elif case == "non-utf8":
        side.write_bytes(b"\xff\xfe{}")
    elif case in ("missing-key", "no-weights-hash", "wrong-type"):
        key = {"missing-key": "arch", "no-weights-hash": "weights_sha256"}.get(case)
        meta.pop(key) if key else meta.update(num_classes="ten")
        side.write_text(json.dumps(meta))
    elif case == "directory":
        model.unlink()
        model.mkdir()
    elif case == "fifo":
        model.unlink()
        os.mkfifo(model)
    elif case == "dev-zero":
        model.unlink()
        model.symlink_to("/dev/zero")
    elif case == "no-sidecar":
        side.unlink()
    out = tmp_path / "out" / "ft.safetensors"
    proc = subprocess.run([sys.executable, str(ROOT / "finetune.py"), "--model", str(model), "--data-dir",
                           str(data_dir), "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert message in _one_error_line(proc)
    assert not out.exists()


@pytest.mark.slow
def test_an_edited_forget_hash_is_not_trusted(original, retrain, data_dir, tmp_path):
    edited = _copy_checkpoint(retrain, tmp_path, "retrain")
    meta = json.loads(common.sidecar_path(edited).read_text())
    meta["data"]["forget_hash"] = "0123456789abcdef"
    common.sidecar_path(edited).write_text(json.dumps(meta))
    proc = run_script("evaluate.py", original, "--retrain", edited, "--data-dir", data_dir, check=False)
    assert "forget hash" in _one_error_line(proc)
