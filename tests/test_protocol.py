"""The evaluation protocol: the exact Unlearn-Sparse MIA and its draws, the references (sparse Retrain, the
seed-noise floor, refusals), the validation split, float32 metrics, and the recipe fixes (RL, FF, MixUp, ViT
LoRA targets)."""
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.svm import SVC

import common
import ff
import pretrain
from conftest import SUBSET, TINY_RESNET, made_once, run_script


# ---------------------------------------------------------------------------------------------------------
# MIA-efficacy: the Unlearn-Sparse protocol exactly, and its spread over member draws.

def _fixed_logits(n, confidence, seed):
    """Logits whose true class (0) has softmax probability around `confidence`, with per-sample noise."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 10, generator=gen)
    logits[:, 0] += torch.logit(torch.tensor(confidence)) + 2.5 + 1.5 * torch.randn(n, generator=gen)
    return logits, torch.zeros(n, dtype=torch.long)


def _upstream_svc_mia(shadow_train_conf, shadow_test_conf, target_test_conf):
    """Independent re-statement of Unlearn-Sparse's evaluation/SVC_MIA.py (SVC_fit_predict, target_test only)."""
    x = np.concatenate([shadow_train_conf, shadow_test_conf]).reshape(-1, 1)
    y = np.concatenate([np.ones(len(shadow_train_conf)), np.zeros(len(shadow_test_conf))])
    clf = SVC(C=3, gamma="auto", kernel="rbf").fit(x, y)
    return (1 - clf.predict(target_test_conf.reshape(-1, 1)).mean()) * 100


def test_mia_efficacy_draw_0_is_the_unlearn_sparse_protocol_exactly():
    retain, test, forget = _fixed_logits(3000, 0.9, 0), _fixed_logits(1000, 0.6, 1), _fixed_logits(400, 0.75, 2)
    conf = {name: common.true_class_confidence(*part) for name, part in
            (("retain", retain), ("test", test), ("forget", forget))}
    # Upstream: members = Subset(retain_dataset, range(len(test))), unshuffled; all of the test set; no cap.
    expected = _upstream_svc_mia(conf["retain"][:1000], conf["test"], conf["forget"])
    result = common.membership_attacks(retain, test, forget, draws=5)
    assert result["mia_efficacy_draws"][0] == pytest.approx(expected, abs=0.1)
    assert common.mia_members(3000, 1000, 0).tolist() == list(range(1000))
    # The other draws are random member sets of the same size: a spread, around the same value.
    assert len(set(result["mia_efficacy_draws"])) > 1 and result["mia_efficacy_std"] > 0
    assert result["mia_efficacy"] == pytest.approx(np.mean(result["mia_efficacy_draws"]))
    assert abs(result["mia_efficacy"] - expected) < 5


def test_mia_efficacy_mean_over_draws_is_stable_to_which_draws_are_taken():
    retain, test, forget = _fixed_logits(3000, 0.9, 3), _fixed_logits(1000, 0.6, 4), _fixed_logits(400, 0.75, 5)
    conf = [common.true_class_confidence(*part) for part in (retain, test, forget)]

    def mean_over(draws):
        return np.mean([common.mia_efficacy(conf[0][common.mia_members(3000, 1000, d)], conf[1], conf[2])
                        for d in draws])

    assert mean_over([0, 1, 2, 3, 4]) == pytest.approx(mean_over([0, 5, 6, 7, 8]), abs=3)


def test_predict_fp32_ignores_autocast():
    """Metrics come from float32 logits even where training runs under bf16 autocast (CUDA)."""
    model = common.build_model("resnet_tiny", common.DATASETS["fashion-mnist"]).eval()
    x = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    info = common.DATASETS["fashion-mnist"]
    exact = common.predict(model, x, info)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as a caller on CUDA runs under bf16
        assert not torch.equal(common.predict(model, x, info), exact)  # bf16 logits do differ
        assert torch.equal(common.predict(model, x, info, fp32=True), exact)


# ---------------------------------------------------------------------------------------------------------
# References: the sparse Retrain, the floor, and what evaluate.py refuses as a Retrain.

@pytest.fixture(scope="module")
def sparse_retrain(omp, data_dir, workdir):
    return made_once(workdir / "retrain_sparse_class3.safetensors", "pretrain.py", *SUBSET, *TINY_RESNET,
                     "--retrain", "--forget-class", "3", "--mask-from", omp, "--data-dir", data_dir)


@pytest.mark.slow
def test_sparse_retrain_has_exactly_its_sources_mask(omp, sparse_retrain):
    source, source_meta = common.load_checkpoint(omp)
    model, meta = common.load_checkpoint(sparse_retrain)
    assert meta["method"] == "retrain" and meta["config"]["mask_from"] == str(omp)
    assert meta["pruned_modules"] == source_meta["pruned_modules"]
    assert meta["sparsity"] == pytest.approx(source_meta["sparsity"], abs=1e-6)
    modules, source_modules = dict(model.named_modules()), dict(source.named_modules())
    for name in meta["pruned_modules"]:
        assert torch.equal(modules[name].weight_mask, source_modules[name].weight_mask), name
        assert torch.equal(modules[name].weight != 0, source_modules[name].weight_mask.bool()), name


@pytest.mark.slow
def test_sparse_rows_are_scored_against_the_sparse_retrain(omp, sparse_retrain, original, retrain, data_dir,
                                                           workdir, tmp_path):
    from_sparse = workdir / "protocol_ft_from_omp.safetensors"
    pruned_now = workdir / "protocol_pruneft.safetensors"
    run_script("finetune.py", "--model", omp, "--forget-class", "3", "--epochs", "1", "--data-dir", data_dir,
               "--out", from_sparse)
    run_script("pruneft.py", "--model", original, "--forget-class", "3", "--epochs", "1", "--data-dir", data_dir,
               "--out", pruned_now)
    js = tmp_path / "rows.json"
    run_script("evaluate.py", omp, from_sparse, pruned_now, "--retrain", retrain, "--sparse-retrain", sparse_retrain,
               "--mia-draws", "2", "--data-dir", data_dir, "--json", js)
    rows = {r["name"]: r for r in json.loads(js.read_text())["rows"]}
    assert list(rows) == ["retrain", "retrain-sparse", "omp", "finetune", "pruneft"]
    assert rows["omp"]["reference"] == rows["finetune"]["reference"] == "retrain-sparse"
    assert rows["pruneft"]["reference"] == "retrain"  # pruned during unlearning: dense reference ...
    assert rows["pruneft"]["avg_gap_other"] is not None  # ... and the sparse one beside it
    assert rows["retrain-sparse"]["avg_gap"] == 0 or rows["retrain-sparse"]["reference"] == "retrain"
    gap = common.avg_gap(rows["finetune"], rows["retrain-sparse"])
    assert rows["finetune"]["avg_gap"] == pytest.approx(gap)


@pytest.mark.slow
def test_floor_rows_measure_retrain_against_retrain(original, retrain, retrain_seed1, data_dir, tmp_path):
    other_seed = retrain_seed1
    js, md = tmp_path / "rows.json", tmp_path / "table.md"
    run_script("evaluate.py", original, "--retrain", retrain, "--floor", other_seed, "--mia-draws", "2",
               "--data-dir", data_dir, "--json", js, "--md", md)
    rows = {r["name"]: r for r in json.loads(js.read_text())["rows"]}
    assert list(rows) == ["retrain", "retrain-floor s1", "original"]
    floor = rows["retrain-floor s1"]
    assert 0 < floor["avg_gap"] < rows["original"]["avg_gap"]  # two Retrains differ, far less than the original
    assert rows["original"]["within_floor"] is False and floor["within_floor"] is None
    assert "| retrain-floor s1 |" in md.read_text() and "≈ Retrain" in md.read_text()


def _edited_copy(src, dst, edit):
    shutil.copy(src, dst)
    meta = json.loads(common.sidecar_path(src).read_text())
    edit(meta)
    common.sidecar_path(dst).write_text(json.dumps(meta))
    return dst


@pytest.mark.slow
@pytest.mark.parametrize("case, message", [
    ("not-a-retrain", "is not a Retrain"),
    ("other-recipe", "another recipe"),
    ("other-dataset", "differ in data dataset"),
    ("other-forget-set", "forgot a different set"),
    ("dense-as-sparse", "dense Retrain"),
])
def test_evaluate_refuses_a_retrain_that_is_not_this_originals(case, message, original, retrain, data_dir, workdir,
                                                                tmp_path):
    other_recipe = workdir / "retrain_class3_3epochs.safetensors"
    if case == "other-recipe" and not other_recipe.exists():
        run_script("pretrain.py", *SUBSET, *TINY_RESNET, "--epochs", "1", "--retrain", "--forget-class", "3",
                   "--data-dir", data_dir, "--out", other_recipe)
    copy = tmp_path / "x.safetensors"
    args = {
        "not-a-retrain": lambda: [original, "--retrain", _edited_copy(retrain, copy, lambda m: m.update(method="ft"))],
        "other-recipe": lambda: [original, "--retrain", other_recipe],
        "other-dataset": lambda: [original, "--retrain",
                                  _edited_copy(retrain, copy, lambda m: m["data"].update(dataset="cifar10"))],
        "other-forget-set": lambda: [retrain, "--retrain",
                                     _edited_copy(retrain, copy, lambda m: m["data"].update(forget_hash="0" * 16))],
        "dense-as-sparse": lambda: [original, "--retrain", retrain, "--sparse-retrain",
                                    _edited_copy(retrain, copy, lambda m: None)],
    }[case]()
    js = tmp_path / "rows.json"
    proc = run_script("evaluate.py", *args, "--data-dir", data_dir, "--json", js, check=False)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not js.exists()


@pytest.mark.slow
def test_validation_split_replaces_the_test_set(original, retrain, data_dir, tmp_path):
    js = tmp_path / "rows.json"
    proc = run_script("evaluate.py", original, "--retrain", retrain, "--split", "val", "--mia-draws", "1",
                      "--data-dir", data_dir, "--json", js)
    assert "VALIDATION split" in proc.stdout
    row = json.loads(js.read_text())["rows"][1]
    data = common.data_from_spec(common.read_sidecar(retrain)["data"], data_dir, "cpu")
    model, _ = common.load_checkpoint(original)
    x, y = data.subset("val")
    logits = common.predict(model, x, data.info)
    assert row["TA"] == pytest.approx(common.accuracy(logits[y != 3], y[y != 3]))
    assert row["FTA"] == pytest.approx(common.accuracy(logits[y == 3], y[y == 3]))


# ---------------------------------------------------------------------------------------------------------
# Recipe fixes.

@pytest.mark.parametrize("mixed", [False, True])
def test_rl_epoch_is_a_relabelled_df_pass_then_a_dr_pass_or_one_mixed_pass(mixed):
    gen = torch.Generator().manual_seed(0)
    x_forget, y_forget = torch.arange(300).view(-1, 1), torch.full((300,), 3)
    x_retain, y_retain = torch.arange(300, 1000).view(-1, 1), torch.arange(700) % 10
    batches = list(common.random_label_epoch((x_forget, y_forget), (x_retain, y_retain), num_classes=10,
                                             batch_size=64, gen=gen, mixed=mixed))
    x = torch.cat([b[0] for b in batches]).flatten()
    y = torch.cat([b[1] for b in batches])
    assert sorted(x.tolist()) == list(range(1000))  # every Df and Dr image exactly once
    if mixed:  # the authors' CIFAR-100 branch: one shuffled pass over the union
        assert len(batches) == 16 and any(((b[0] < 300).any() and (b[0] >= 300).any()) for b in batches)
    else:  # their CIFAR-10/SVHN branch: 5 batches of Df alone (shuffled), then 11 of Dr
        assert len(batches) == 16 and (x[:300] < 300).all() and x[:300].tolist() != list(range(300))
    retained = x >= 300
    assert torch.equal(y[retained], y_retain[x[retained] - 300])  # Dr keeps its labels
    forget_labels = y[~retained]
    assert set(forget_labels.tolist()) == set(range(10))  # uniform over all classes, the true one included
    assert 10 < (forget_labels == 3).sum() < 60
    wrong = common.random_labels(y_forget, 10, gen, wrong_only=True)
    assert (wrong != 3).all()


def test_ff_fisher_and_noise_scale_on_a_model_with_a_known_fisher():
    info = common.DatasetInfo(2, 1, 1, (0.0,), (1 / 255,), False, 0)  # normalize(x) = x as a float
    model = nn.Sequential(nn.Flatten(), nn.Linear(1, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[0.5], [-0.5]]))
    x = torch.tensor([[[[2]]]], dtype=torch.uint8)  # one sample, value 2: one batch of one
    fisher = ff.retain_fisher(model, x, info, None, batch_size=32)["1.weight"].flatten()
    p = F.softmax(torch.tensor([1.0, -1.0]), 0)
    # d CE(y) / d w_c = (p_c - [c == y]) * x;  F_c = sum_y p_y * that^2
    expected = torch.stack([sum(p[y] * ((p[c] - float(c == y)) * 2) ** 2 for y in range(2)) for c in range(2)])
    torch.testing.assert_close(fisher, expected)

    alpha, eps = 1e-6, 1e-8
    body = ff.noise_variance(torch.tensor([[1e-2, 1e-4], [1.0, 1.0]]), alpha, eps, is_head=False)
    # 1/F clamped at 1e3, times alpha, then averaged over each row's inputs (dim 1)
    torch.testing.assert_close(body, alpha * torch.tensor([[(100 + 1e3) / 2] * 2, [1.0, 1.0]]))
    head = ff.noise_variance(torch.tensor([[1e-4, 1e-4]]), alpha, eps, is_head=True)
    torch.testing.assert_close(head, alpha * torch.tensor([[1e2 * 10, 1e2 * 10]]))  # head: clamp 1e2, x10
    bn = ff.noise_variance(torch.tensor([0.5, 2.0]), alpha, eps, is_head=False)
    torch.testing.assert_close(bn, alpha * 10 / (torch.tensor([0.5, 2.0]) + eps))  # 1-D: x10


def test_ff_fisher_on_augmented_batches_is_the_fisher_of_those_batches_augmented_as_in_training():
    info = common.DatasetInfo(2, 1, 6, (0.0,), (1.0,), True, 2)  # inputs in [0, 1]; crop padding and flips
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 2))
    x = torch.randint(0, 256, (8, 1, 6, 6), dtype=torch.uint8)
    augmented = ff.retain_fisher(model, x, info, None, batch_size=4, augment_gen=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    by_hand = torch.cat([common.augment(x[:4], info, gen), common.augment(x[4:], info, gen)])
    expected = ff.retain_fisher(model, by_hand, info, None, batch_size=4)
    plain = ff.retain_fisher(model, x, info, None, batch_size=4)
    assert all(torch.allclose(augmented[n], expected[n]) for n in expected)
    assert not torch.allclose(augmented["1.weight"], plain["1.weight"])


def test_mixup_uses_the_recipes_label_smoothing_not_timms_default():
    assert pretrain.RECIPES["vit_small"]["label_smoothing"] == 0.0
    x, y = torch.randn(8, 3, 32, 32), torch.zeros(8, dtype=torch.long)
    _, soft = common.make_mixup(0.2, 10, 0.0)(x, y)
    assert torch.equal(soft, F.one_hot(y, 10).float())  # same labels mixed: no mass leaks to other classes
    _, smoothed = common.make_mixup(0.2, 10, 0.1)(x, y)
    assert smoothed[0, 1] > 0


def test_vit_lora_adapts_the_blocks_and_leaves_the_patch_embedding_alone():
    from peft.tuners.lora import LoraLayer
    model = common.build_model("vit_tiny", common.DATASETS["fashion-mnist"])
    targets = common.LORA_DEFAULTS["vit"]["targets"]
    adapted = {name.removeprefix("base_model.model.") for name, m in
               common.add_lora(model, rank=4, alpha=8, dropout=0.0, targets=targets).named_modules()
               if isinstance(m, LoraLayer)}
    expected = {f"blocks.{i}.{leaf}" for i in range(4) for leaf in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert adapted == expected
