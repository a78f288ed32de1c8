"""The Unlearn-Sparse methods: OMP/IMP pruning, GA, RL, l1-sparse, FF, IU (Jia et al. 2023)."""
import json

import pytest
import torch
from safetensors.torch import load_file

import common
import iu
from conftest import SUBSET, TINY_RESNET, assert_no_read_per_step, made_once, run_script

# Small but real settings: one pass, few Fisher samples.
QUICK = {"ga": ["--epochs", "1"], "rl": ["--epochs", "1"], "l1sparse": ["--epochs", "1"],
         "ff": ["--fisher-samples", "64"], "iu": ["--fisher-samples", "64"]}


def _zero_pattern(path):
    meta = common.read_sidecar(path)
    state = load_file(str(path))
    return {name: state[f"{name}.weight"] == 0 for name in meta["pruned_modules"]}


@pytest.mark.slow
def test_omp_reaches_its_sparsity_and_still_classifies(omp):
    meta = common.read_sidecar(omp)
    assert meta["sparsity"] == pytest.approx(0.5, abs=1e-4) and meta["method"] == "omp"
    assert meta["test_acc"] > 50
    state = load_file(str(omp))
    assert torch.all(state["fc.weight"] != 0)  # the head stays dense


@pytest.mark.slow
def test_imp_sparsity_after_k_rounds(workdir, data_dir, tmp_path):
    # IMP retrains with the original's recipe each round: a one-epoch original keeps the two rounds short.
    one_epoch = made_once(workdir / "original_1epoch.safetensors", "pretrain.py", *SUBSET, *TINY_RESNET, "--epochs",
                          "1", "--data-dir", data_dir)
    out = tmp_path / "imp.safetensors"
    run_script("prune.py", "--model", one_epoch, "--rounds", "2", "--rewind-epoch", "0", "--data-dir", data_dir,
               "--out", out)
    assert common.read_sidecar(out)["sparsity"] == pytest.approx(1 - 0.8 ** 2, abs=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(QUICK))
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "omp50"])
def test_method_end_to_end_keeps_the_input_sparsity_exactly(method, sparse, original, omp, data_dir, workdir,
                                                            train_loop_reads):
    source = omp if sparse else original
    out = workdir / f"{method}_{'omp' if sparse else 'dense'}.safetensors"
    run_script(f"{method}.py", "--model", source, "--forget-class", "3", *QUICK[method], "--data-dir", data_dir,
               "--out", out)
    meta = common.read_sidecar(out)
    assert meta["method"] == method and meta["sparsity"] == common.read_sidecar(source)["sparsity"]
    if sparse:
        before, after = _zero_pattern(source), _zero_pattern(out)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    report = meta["quick_report"]
    assert 0 <= report["forget_acc"] <= 100 and report["test_retain_acc"] > 11  # above chance (9 classes)
    if method not in ("ff", "iu"):  # one-shot updates, no training loop
        assert_no_read_per_step(train_loop_reads)
    if method == "ff":  # the Fisher's batches are augmented as the original was trained (upstream's retain loader)
        assert meta["config"]["fisher_augment"] is common.read_sidecar(source)["config"]["augment"] is True


@pytest.mark.slow
def test_lora_variant_of_a_gradient_method_on_a_pruned_model(omp, data_dir, workdir):
    out = workdir / "rl_lora_omp.safetensors"
    run_script("rl.py", "--model", omp, "--lora", "--epochs", "1", "--data-dir", data_dir, "--out", out)
    meta = common.read_sidecar(out)
    assert meta["sparsity"] == common.read_sidecar(omp)["sparsity"]
    assert meta["trainable_params"] < 0.2 * meta["total_params"]


@pytest.mark.slow
def test_ga_with_a_huge_learning_rate_stops_with_the_divergence_error(original, data_dir, tmp_path):
    out = tmp_path / "ga.safetensors"
    proc = run_script("ga.py", "--model", original, "--lr", "1e6", "--epochs", "3", "--data-dir", data_dir,
                      "--out", out, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "diverged" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_inverse_fisher_product_matches_a_direct_solve():
    torch.manual_seed(0)
    grads, v, damping = torch.randn(20, 50, dtype=torch.float64), torch.randn(50, dtype=torch.float64), 0.1
    fisher = damping * torch.eye(50, dtype=torch.float64) + grads.T @ grads / 20
    torch.testing.assert_close(iu.inverse_fisher_product(grads, v, damping), torch.linalg.solve(fisher, v))


@pytest.mark.slow
def test_random_sample_forgetting_end_to_end_against_retrain(original, retrain_random, data_dir, workdir, tmp_path):
    out = workdir / "rl_random300.safetensors"
    run_script("rl.py", "--model", original, "--forget-random", "300", "--epochs", "1", "--data-dir", data_dir,
               "--out", out)
    js = tmp_path / "rows.json"
    run_script("evaluate.py", out, "--retrain", retrain_random, "--mia-draws", "2", "--data-dir", data_dir,
               "--json", js)
    rows = json.loads(js.read_text())["rows"]
    assert [r["method"] for r in rows] == ["retrain", "rl"] and rows[1]["FTA"] is None
    assert rows[1]["avg_gap"] is not None and rows[0]["avg_gap"] == 0
