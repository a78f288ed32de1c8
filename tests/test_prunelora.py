"""The four PruneLoRA methods, and the seed code's defects that must not come back (arXiv 2411.11907)."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file

import common
from conftest import made_once, run_script


def _lora_model(model, arch, prune_method="none"):
    """loraprune.py's steps 1-2 at the paper's LoRA settings: prune (unless "none"), then add adapters + head."""
    family = common.ARCHS[arch].family
    if prune_method != "none":
        common.prune_model(model, family, prune_method, 0.5)
    return common.add_lora(model, **common.lora_settings(family), train_head=True)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet_tiny", "vit_tiny"])
@pytest.mark.parametrize("prune_method", ["none", "l2-structured", "l1-global"])
def test_every_lora_adapter_gets_a_gradient(arch, prune_method, original, original_vit):
    # Trained models: at random init timm zeroes each block's last BatchNorm, which silences the blocks.
    model, meta = common.load_checkpoint(original if arch == "resnet_tiny" else original_vit)
    info = common.DATASETS[meta["data"]["dataset"]]
    model = _lora_model(model, arch, prune_method)
    model.train()
    x = common.normalize(torch.randint(0, 256, (16, info.channels, info.size, info.size), dtype=torch.uint8), info)
    y = torch.arange(16) % info.num_classes
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # B starts at zero, so A's gradient is zero until B has moved once
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    adapters = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert adapters and all(p.requires_grad for p in adapters.values())
    silent = [n for n, p in adapters.items() if p.grad is None or not torch.any(p.grad != 0)]
    assert not silent, f"adapters without gradient: {silent[:5]}"
    expected = {"qkv", "proj", "fc1", "fc2"} if arch == "vit_tiny" else {"conv1", "conv2"}
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in adapters} == expected


def test_lora_trains_about_2_5_percent_of_resnet50():
    model = _lora_model(common.build_model("resnet50", common.DATASETS["cifar10"]), "resnet50")
    trainable, total = common.count_params(model)
    assert 2.3 < 100 * trainable / total < 2.7  # the PruneLoRA paper: 2.5% trainable


@pytest.mark.slow
def test_masked_lora_merge_equals_the_trained_function_and_keeps_the_zeros(original):
    model, meta = common.load_checkpoint(original)
    info = common.DATASETS[meta["data"]["dataset"]]
    model = _lora_model(model, "resnet_tiny", "l1-global")
    with torch.no_grad():  # give the adapters a non-zero update, as training would
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.eval()
    x = common.normalize(torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8), info)
    with torch.no_grad():
        before = model(x)
    merged = common.merge_lora(model).eval()
    with torch.no_grad():
        after = merged(x)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    assert common.sparsity(merged, "resnet") == pytest.approx(0.5, abs=1e-3)


FORGOTTEN_BELOW = 20  # Acc(Df) and Acc on the test images of the class after 3 epochs; the original's is 88%


@pytest.fixture(scope="module")
def four_methods(original, data_dir, workdir):
    return {script: made_once(workdir / f"{script}_class3.safetensors", f"{script}.py", "--model", original,
                              "--forget-class", "3", "--epochs", "3", "--data-dir", data_dir)
            for script in ("finetune", "pruneft", "lora", "loraprune")}


@pytest.mark.slow
def test_the_four_methods_run_end_to_end_and_forget(four_methods, original):
    before = common.read_sidecar(original)
    for method, path in four_methods.items():
        meta = common.read_sidecar(path)
        report = meta["quick_report"]
        assert meta["method"] == method and meta["data"]["forget_class"] == 3
        # Training on Dr only drives Acc(Df) from the original's 88% towards Retrain's 0. LoRA moves slowest: its
        # 3 epochs end at 11% on an AMD EPYC and under 10% on other CPUs (float order in the kernels).
        assert report["forget_acc"] < FORGOTTEN_BELOW, (method, report)
        if method == "loraprune":
            # A few dozen steps of rank-8 adapters cannot fully repair 50% structured pruning of a 0.3M-parameter
            # net; it must still be far above chance (11%).
            assert report["test_retain_acc"] > before["test_acc"] - 25, report
        else:
            assert report["test_retain_acc"] > before["test_acc"] - 15, (method, report)
        for key in ("wall_time_s", "peak_mem_mb", "trainable_params", "total_params", "sparsity"):
            assert meta[key] is not None
    lora = common.read_sidecar(four_methods["lora"])
    assert lora["trainable_params"] < 0.2 * lora["total_params"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pruneft", "loraprune"])
def test_pruned_methods_save_exactly_the_pruned_sparsity_with_a_dense_head(four_methods, method):
    meta = common.read_sidecar(four_methods[method])
    assert meta["sparsity"] == meta["sparsity_after_pruning"] == pytest.approx(0.5, abs=0.01)
    state = load_file(str(four_methods[method]))
    assert not any(k.endswith(("_orig", "_mask")) for k in state)  # plain state dict
    assert torch.all(state["fc.weight"].abs().sum(1) > 0) and torch.all(state["fc.weight"] != 0)
    # Whole output filters are zero (structured), and every pruned conv lost exactly half of them.
    for name in meta["pruned_modules"]:
        weight = state[f"{name}.weight"]
        dead = (weight.flatten(1).abs().sum(1) == 0).sum().item()
        assert dead == weight.shape[0] // 2, name


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pruneft", "loraprune"])
def test_shrink_trains_on_a_smaller_network_and_saves_the_usual_sparse_checkpoint(original, data_dir, workdir, method):
    no_dropout = ["--lora-dropout", "0"] if method == "loraprune" else []  # no dropout masks drawn differently
    runs = {}
    for shrink in ("--no-shrink", "--shrink"):
        runs[shrink] = workdir / f"{method}{shrink}.safetensors"
        run_script(f"{method}.py", "--model", original, "--forget-class", "3", "--epochs", "1", shrink, *no_dropout,
                   "--data-dir", data_dir, "--out", runs[shrink])
    meta, masked = common.read_sidecar(runs["--shrink"]), common.read_sidecar(runs["--no-shrink"])
    assert meta["config"]["shrink"] is True
    assert meta["trainable_params"] < masked["trainable_params"]  # the pruned rows were not there to train
    assert meta["sparsity"] == meta["sparsity_after_pruning"] == pytest.approx(0.5, abs=0.01)
    state, base = load_file(str(runs["--shrink"])), load_file(str(original))
    assert state.keys() == base.keys()  # the plain architecture
    for name in meta["pruned_modules"]:
        weight = state[f"{name}.weight"]
        assert (weight.flatten(1).abs().sum(1) == 0).sum().item() == weight.shape[0] // 2, name
    # The same method. Prune+FT's runs differ by float rounding only. PruneLoRA's adapters A come from the same
    # distribution but other draws (test_efficiency checks that the same adapters train alike), so its runs
    # differ as two seeds do: Dr accuracy after this one epoch 58.1 / 55.2 / 56.8 for seeds 0 / 1 / 2, 55.8 shrunk.
    tolerance = 1.0 if method == "pruneft" else 5.0
    for key in ("forget_acc", "retain_acc", "test_retain_acc"):
        assert abs(meta["quick_report"][key] - masked["quick_report"][key]) < tolerance, key


@pytest.mark.slow
def test_shrink_with_regrowth_is_refused_in_one_line(original, data_dir, workdir):
    proc = run_script("pruneft.py", "--model", original, "--forget-class", "3", "--shrink", "--allow-regrowth",
                      "--data-dir", data_dir, "--out", workdir / "refused.safetensors", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--shrink needs filters that stay pruned" in proc.stderr
    assert not (workdir / "refused.safetensors").exists()


@pytest.mark.slow
def test_allow_regrowth_reproduces_the_seed_codes_refilled_filters(original, data_dir, workdir):
    out = workdir / "loraprune_regrowth.safetensors"
    run_script("loraprune.py", "--model", original, "--forget-class", "3", "--epochs", "1", "--allow-regrowth",
               "--data-dir", data_dir, "--out", out)
    meta = common.read_sidecar(out)
    assert meta["sparsity_after_pruning"] == pytest.approx(0.5, abs=0.01)
    # The dense low-rank update refilled pruned filters of every adapted block conv; the layers without
    # adapters (stem, downsample) keep their zeros.
    assert meta["sparsity"] < 0.35
    state = load_file(str(out))
    block_convs = [k for k in state if re.fullmatch(r"layer\d+\.\d+\.conv\d+\.weight", k)]
    dead_filters = {k: int((state[k].flatten(1).abs().sum(1) == 0).sum()) for k in block_convs}
    assert block_convs and all(dead < state[k].shape[0] // 2 for k, dead in dead_filters.items()), dead_filters


@pytest.mark.slow
def test_lora_keeps_batchnorm_statistics_frozen_unless_asked(original, four_methods):
    base = load_file(str(original))
    lora = load_file(str(four_methods["lora"]))
    stats = [k for k in base if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(base[k], lora[k]) for k in stats)
    finetuned = load_file(str(four_methods["finetune"]))
    assert not all(torch.equal(base[k], finetuned[k]) for k in stats)  # full fine-tuning updates them
    # After pruning they are re-estimated on Dr once (--recalibrate-bn), then frozen.
    loraprune = load_file(str(four_methods["loraprune"]))
    assert not any(torch.equal(base[k], loraprune[k]) for k in stats if k.endswith("running_var"))


@pytest.mark.slow
def test_no_recalibrate_bn_keeps_the_dense_statistics_after_pruning(original, data_dir, workdir):
    out = workdir / "loraprune_no_recalibration.safetensors"
    run_script("loraprune.py", "--model", original, "--forget-class", "3", "--epochs", "1", "--no-recalibrate-bn",
               "--data-dir", data_dir, "--out", out)
    base, pruned = load_file(str(original)), load_file(str(out))
    stats = [k for k in base if k.endswith(("running_mean", "running_var"))]
    assert all(torch.equal(base[k], pruned[k]) for k in stats)


@pytest.mark.slow
def test_evaluate_compares_the_four_methods_with_retrain(four_methods, original, retrain, data_dir, tmp_path):
    js = tmp_path / "rows.json"
    run_script("evaluate.py", original, *four_methods.values(), "--retrain", retrain, "--mia-draws", "2",
               "--data-dir", data_dir, "--json", js)
    rows = {r["method"]: r for r in json.loads(js.read_text())["rows"]}
    assert list(rows) == ["retrain", "original", "finetune", "pruneft", "lora", "loraprune"]
    for method in four_methods:
        assert rows[method]["FTA"] < FORGOTTEN_BELOW and rows[method]["UA"] > 100 - FORGOTTEN_BELOW
        # On Df the unlearned outputs move from the original's towards Retrain's. (Avg Gap is not asserted: on
        # a model this weak the confidence MIA flips between 0 and 100 and dominates it.)
        assert rows[method]["act_dist_forget"] < rows["original"]["act_dist_forget"]
        assert rows[method]["js_forget"] < rows["original"]["js_forget"]
        assert rows[method]["sparsity"] == (0.5 if "prune" in method else 0.0)
