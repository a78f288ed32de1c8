"""audit.py: the linear probe and relearning tell the original (which still knows Df) from Retrain, and two
Retrains of different seeds apart by no more than their noise; both subcommands end to end."""
import json

import pytest
import torch

import audit
import common
from conftest import run_script


def test_steps_to_finds_the_first_step_at_the_target():
    assert audit.steps_to([0.0, 10.0, 80.0, 95.0, 90.0], 80.0) == 2
    assert audit.steps_to([0.0, 10.0], 80.0) is None


def test_relearn_data_is_one_draw_with_the_held_out_forgotten_images_kept_out(data_dir):
    data = common.make_data("fashion-mnist", data_dir, train_subset=1000, forget_random=100)
    (x, y), (x_held, _) = audit.relearn_data(data, n_forget=30, n_retain=50, gen=torch.Generator().manual_seed(0))
    assert len(x) == 80 and len(x_held) == 70  # random-sample: the Df images outside the relearn set
    flat = {tuple(img.flatten().tolist()) for img in x[:30]}
    assert not flat & {tuple(img.flatten().tolist()) for img in x_held}
    with pytest.raises(common.UserError, match="Df has only"):
        audit.relearn_data(data, n_forget=100, n_retain=50, gen=torch.Generator().manual_seed(0))


# A model that memorises its training images (2,000 images, 30 epochs, no augmentation: 100% train accuracy), and
# two Retrains without 200 random ones: the probe should read the memorised Df on the original's features only.
MEMORISING = ["--dataset", "fashion-mnist", "--train-subset", "2000", "--val-fraction", "0.1", "--arch",
              "resnet_tiny", "--epochs", "30", "--batch-size", "64", "--lr", "0.1", "--augment", "false"]


@pytest.fixture(scope="module")
def memorising(workdir, data_dir):
    """(original, Retrain seed 0, Retrain seed 1) for 200 random images, on the memorising recipe."""
    paths = [workdir / f"memorising_{name}.safetensors" for name in ("original", "retrain_s0", "retrain_s1")]
    run_script("pretrain.py", *MEMORISING, "--data-dir", data_dir, "--out", paths[0])
    for seed, out in enumerate(paths[1:]):
        run_script("pretrain.py", *MEMORISING, "--retrain", "--forget-random", "200", "--seed", seed,
                   "--data-dir", data_dir, "--out", out)
    return paths


@pytest.mark.slow
def test_probe_tells_the_original_from_retrain_but_not_two_retrains(memorising, data_dir, tmp_path):
    original, retrain, retrain_seed1 = memorising
    out = tmp_path / "probe.json"
    proc = run_script("audit.py", "probe", original, "--retrain", retrain, "--floor", retrain_seed1,
                      "--data-dir", data_dir, "--json", out)
    assert "probe Acc(Df) ↓" in proc.stdout
    rows = {r["model"]: r for r in json.loads(out.read_text())["rows"]}
    floor = abs(rows["retrain"]["probe_forget_acc"] - rows["retrain-floor s1"]["probe_forget_acc"])
    # Measured: original 96.5, Retrains 81.5 and 84.0.
    assert rows["original"]["probe_forget_acc"] - rows["retrain"]["probe_forget_acc"] > max(3 * floor, 5.0)
    assert rows["retrain"]["probe_test_forget_acc"] is None  # random-sample: no forgotten class


@pytest.mark.slow
def test_relearn_tells_the_original_from_retrain_but_not_two_retrains(original, retrain, retrain_seed1, data_dir,
                                                                      tmp_path):
    out = tmp_path / "relearn.json"
    run_script("audit.py", "relearn", original, "--retrain", retrain, "--floor", retrain_seed1,
               "--relearn-steps", "200", "--data-dir", data_dir, "--json", out)
    rows = {r["model"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["original"]["steps_to_threshold"] == 0 and rows["original"]["ain"] == 0
    assert rows["retrain"]["curve"][0] < 5 and rows["retrain"]["steps_to_threshold"] > 5  # it has to learn
    assert 0.5 <= rows["retrain-floor s1"]["ain"] <= 2.0
    assert len(rows["retrain"]["curve"]) == 201


@pytest.mark.slow
def test_audit_refuses_a_reference_that_is_not_a_retrain(original, retrain, data_dir):
    proc = run_script("audit.py", "probe", retrain, "--retrain", original, "--data-dir", data_dir, check=False)
    assert proc.returncode != 0 and "not a Retrain" in proc.stderr and "Traceback" not in proc.stderr
