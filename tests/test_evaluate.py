"""evaluate.py: the metrics on constructed cases with known answers, and the tool end to end."""
import json
import math

import numpy as np
import pytest
import torch

import common
from conftest import made_once, run_script


def test_attacks_on_separable_scores_call_members_members_and_non_members_non_members():
    rng = np.random.default_rng(0)
    members, non_members = rng.uniform(0.9, 1.0, 500), rng.uniform(0.0, 0.1, 500)
    assert common.mia_efficacy(members, non_members, rng.uniform(0.0, 0.1, 200)) == 100
    assert common.mia_efficacy(members, non_members, rng.uniform(0.9, 1.0, 200)) == 0
    # Loss: members have low loss. Entropy attack reports the member fraction (lower = more forgotten).
    assert common.loss_mia(non_members, members, rng.uniform(0.9, 1.0, 200)) == 100
    assert common.entropy_mia(non_members, members, rng.uniform(0.0, 0.1, 200)) == 100
    assert common.entropy_mia(non_members, members, rng.uniform(0.9, 1.0, 200)) == 0


def test_attacks_cannot_tell_identical_distributions_apart():
    rng = np.random.default_rng(1)
    members, non_members, forget = (rng.uniform(0, 1, n) for n in (2000, 2000, 2000))
    for score in (common.mia_efficacy(members, non_members, forget), common.loss_mia(members, non_members, forget)):
        assert 15 < score < 85  # no systematic one-sided verdict (a constant attacker would give 0 or 100)


def test_distances_to_a_model_itself_are_zero_and_js_of_disjoint_outputs_is_ln2():
    logits = torch.randn(100, 10)
    assert common.activation_distance(logits, logits) == pytest.approx(0, abs=1e-7)
    assert common.js_divergence(logits, logits) == pytest.approx(0, abs=1e-9)
    one_hot_a = torch.full((5, 10), -1e4).scatter(1, torch.zeros(5, 1, dtype=torch.long), 1e4)
    one_hot_b = torch.full((5, 10), -1e4).scatter(1, torch.ones(5, 1, dtype=torch.long), 1e4)
    assert common.js_divergence(one_hot_a, one_hot_b) == pytest.approx(math.log(2), abs=1e-6)
    assert common.activation_distance(one_hot_a, one_hot_b) == pytest.approx(math.sqrt(2), abs=1e-6)
    # Per sample, not on the batch mean: two samples swapped between two models still differ.
    swapped = torch.cat([one_hot_b[:1], one_hot_a[:1]])
    assert common.js_divergence(torch.cat([one_hot_a[:1], one_hot_b[:1]]), swapped) == pytest.approx(math.log(2))


def test_avg_gap_is_the_mean_absolute_gap_over_ua_ra_ta_mia():
    retrain = dict(UA=100, RA=100, TA=90, mia_efficacy=100)
    row = dict(UA=90, RA=98, TA=92, mia_efficacy=80)
    assert common.avg_gap(row, retrain) == pytest.approx((10 + 2 + 2 + 20) / 4)


@pytest.fixture(scope="module")
def finetuned(original, data_dir, workdir):
    return made_once(workdir / "eval_finetune_class3.safetensors", "finetune.py", "--model", original,
                     "--forget-class", "3", "--epochs", "1", "--data-dir", data_dir)


@pytest.mark.slow
def test_evaluate_end_to_end_class_wise(original, retrain, finetuned, data_dir, tmp_path):
    js, md = tmp_path / "rows.json", tmp_path / "table.md"
    proc = run_script("evaluate.py", original, finetuned, "--retrain", retrain, "--mia-draws", "2",
                      "--data-dir", data_dir, "--json", js, "--md", md, process=True)  # through the interpreter
    rows = {r["method"]: r for r in json.loads(js.read_text())["rows"]}
    assert list(rows) == ["retrain", "original", "finetune"]
    # a progress line per model as it is scored, on stderr: stdout is the report alone
    assert [line.split(":")[0] for line in proc.stderr.splitlines() if "scored in" in line] == \
        ["[1/3] retrain", "[2/3] original", "[3/3] finetune"] and "scored in" not in proc.stdout
    assert rows["retrain"]["UA"] == 100 and rows["retrain"]["FTA"] == 0 and rows["retrain"]["avg_gap"] == 0
    assert rows["retrain"]["act_dist_forget"] == 0 and rows["retrain"]["js_forget"] == 0
    assert rows["original"]["UA"] < 50 and rows["original"]["avg_gap"] > rows["finetune"]["avg_gap"]
    assert rows["finetune"]["trainable_params"] == rows["finetune"]["total_params"]
    table = md.read_text()
    assert "higher = more forgotten" in table and "lower = more forgotten" in table and "UA ↑" in proc.stdout


@pytest.mark.slow
def test_evaluate_random_sample_forgetting(original, retrain_random, data_dir, workdir, tmp_path):
    retrain = retrain_random
    ft = workdir / "finetune_random300.safetensors"
    run_script("finetune.py", "--model", original, "--forget-random", "300", "--epochs", "1", "--data-dir", data_dir,
               "--out", ft)
    js = tmp_path / "rows.json"
    run_script("evaluate.py", ft, "--retrain", retrain, "--mia-draws", "2", "--data-dir", data_dir, "--json", js)
    rows = json.loads(js.read_text())["rows"]
    assert all(r["FTA"] is None for r in rows)
    data = common.data_from_spec(common.read_sidecar(ft)["data"], data_dir, "cpu")
    model, _ = common.load_checkpoint(ft)
    x, y = data.subset("test")  # TA is on the whole test set in random-sample forgetting
    assert rows[1]["TA"] == pytest.approx(common.accuracy(common.predict(model, x, data.info), y))
    assert 0 < rows[0]["UA"] < 60  # Retrain still classifies much of a random forget set correctly


@pytest.mark.slow
def test_evaluate_refuses_different_forget_sets_and_existing_outputs(retrain, original, data_dir, workdir, tmp_path):
    other = workdir / "finetune_class5.safetensors"
    run_script("finetune.py", "--model", original, "--forget-class", "5", "--epochs", "1", "--data-dir", data_dir,
               "--out", other)
    js = tmp_path / "rows.json"
    proc = run_script("evaluate.py", other, "--retrain", retrain, "--data-dir", data_dir, "--json", js, check=False)
    assert proc.returncode == 2 and "forgot a different set" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert not js.exists()
    js.write_text("keep")
    proc = run_script("evaluate.py", retrain, "--data-dir", data_dir, "--json", js, check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr and js.read_text() == "keep"
