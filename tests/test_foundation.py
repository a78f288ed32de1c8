"""Datasets, splits, model builders, training and checkpoints (the foundation every stage stands on)."""
import pickle
import shutil

import numpy as np
import pytest
import torch

import common
from conftest import TEST_IMAGES, copy_sidecar, run_script


@pytest.fixture(scope="module")
def fashion(full_data_dir):
    return common.load_dataset("fashion-mnist", full_data_dir)


def test_fashion_mnist_loads_the_real_debian_data(fashion):
    info, (x_train, y_train), (x_test, y_test) = fashion
    assert x_train.shape == (60000, 1, 28, 28) and x_train.dtype == torch.uint8
    assert x_test.shape == (10000, 1, 28, 28)
    assert torch.equal(torch.bincount(y_train), torch.full((10,), 6000))
    assert info.num_classes == 10 and info.channels == 1


def test_the_tests_data_folder_is_the_whole_training_split_and_the_first_test_images(data_dir, fashion):
    _, (x_train, y_train), (x_test, y_test) = common.load_dataset("fashion-mnist", data_dir)
    _, (full_x_train, full_y_train), (full_x_test, full_y_test) = fashion
    assert torch.equal(x_train, full_x_train) and torch.equal(y_train, full_y_train)
    assert torch.equal(x_test, full_x_test[:TEST_IMAGES]) and torch.equal(y_test, full_y_test[:TEST_IMAGES])


def test_class_wise_split_properties(full_data_dir):
    data = common.make_data("fashion-mnist", full_data_dir, val_fraction=0.1, forget_class=3)
    train, forget, retain = set(data.train.tolist()), set(data.forget.tolist()), set(data.retain.tolist())
    assert forget.isdisjoint(retain) and forget | retain == train
    assert set(data.val.tolist()).isdisjoint(train)
    assert len(train) + len(data.val) == 60000 and len(data.val) == 6000  # 10% of each class held out
    assert torch.all(data.y_train[data.forget] == 3) and len(forget) == 5400
    assert not torch.any(data.y_train[data.retain] == 3)
    assert not torch.any(data.y_test[data.test_retain] == 3)
    assert torch.all(data.y_test[data.test_forget] == 3) and len(data.test_forget) == 1000
    assert data.spec["forget_count"] == 5400 and len(data.forget_hash) == 16


def test_val_fraction_zero_keeps_the_papers_5000_image_forget_class(data_dir):
    data = common.make_data("fashion-mnist", data_dir, val_fraction=0.0, forget_class=3)
    assert len(data.val) == 0 and len(data.forget) == 6000 and len(data.retain) == 54000


def test_random_forget_set_follows_its_own_seed(full_data_dir):
    def forget(seed, split_seed=0):
        return common.make_data("fashion-mnist", full_data_dir, forget_random=500, forget_seed=seed,
                                split_seed=split_seed).forget
    first, again, other = forget(1), forget(1), forget(2)
    assert torch.equal(first, again) and not torch.equal(first, other) and len(first) == 500
    data = common.make_data("fashion-mnist", full_data_dir, forget_random=500, forget_seed=1)
    assert len(data.test_forget) == 0 and len(data.test_retain) == 10000  # random-sample: whole test set kept
    assert common.index_hash(first) == data.forget_hash


def _write_pickle(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


@pytest.fixture
def skip_md5(monkeypatch):
    """Generated files cannot match torchvision's md5 sums of the real archives; everything else is real."""
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.svhn as svhn
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    monkeypatch.setattr(svhn, "check_integrity", lambda *args, **kwargs: True)


def test_cifar10_loader_reads_torchvisions_format(tmp_path, skip_md5):
    rng = np.random.default_rng(0)
    base = tmp_path / "cifar-10-batches-py"
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = list(range(10)) * 2
        _write_pickle(base / name, {"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), "labels": labels})
    _write_pickle(base / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    info, (x_train, y_train), (x_test, y_test) = common.load_dataset("cifar10", tmp_path)
    assert x_train.shape == (100, 3, 32, 32) and x_test.shape == (20, 3, 32, 32) and info.num_classes == 10
    with open(base / "data_batch_1", "rb") as f:
        first = pickle.load(f)["data"][0]
    assert torch.equal(x_train[0], torch.from_numpy(first.reshape(3, 32, 32)))  # CHW order preserved
    data = common.make_data("cifar10", tmp_path, val_fraction=0.1, forget_class=9)
    assert torch.all(data.y_train[data.forget] == 9) and len(data.val) == 10


def test_cifar100_loader_reads_torchvisions_format(tmp_path, skip_md5):
    rng = np.random.default_rng(0)
    base = tmp_path / "cifar-100-python"
    for name in ("train", "test"):
        _write_pickle(base / name, {"data": rng.integers(0, 256, (200, 3072), dtype=np.uint8),
                                    "fine_labels": list(range(100)) * 2, "coarse_labels": [0] * 200})
    _write_pickle(base / "meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
    info, (x_train, y_train), _ = common.load_dataset("cifar100", tmp_path)
    assert x_train.shape == (200, 3, 32, 32) and int(y_train.max()) == 99 and info.num_classes == 100


def test_svhn_loader_reads_torchvisions_format(tmp_path, skip_md5):
    from scipy.io import savemat
    rng = np.random.default_rng(0)
    for name in ("train_32x32.mat", "test_32x32.mat"):
        labels = np.arange(1, 11).repeat(3).reshape(-1, 1)  # SVHN stores digit 0 as label 10
        savemat(tmp_path / name, {"X": rng.integers(0, 256, (32, 32, 3, 30), dtype=np.uint8), "y": labels})
    info, (x_train, y_train), _ = common.load_dataset("svhn", tmp_path)
    assert x_train.shape == (30, 3, 32, 32) and set(y_train.tolist()) == set(range(10)) and not info.flip


def test_missing_dataset_gives_a_clear_error(tmp_path):
    with pytest.raises(common.UserError, match="cifar10 not found"):
        common.load_dataset("cifar10", tmp_path)


@pytest.mark.parametrize("arch", ["resnet_tiny", "resnet18", "resnet50", "vit_tiny", "vit_small"])
@pytest.mark.parametrize("dataset", ["fashion-mnist", "cifar100"])
def test_builders_give_logits_for_each_channel_count(arch, dataset):
    info = common.DATASETS[dataset]
    model = common.build_model(arch, info).eval()
    x = torch.randint(0, 256, (2, info.channels, info.size, info.size), dtype=torch.uint8)
    with torch.no_grad():
        logits = model(common.normalize(x, info))
    assert logits.shape == (2, info.num_classes)


def test_paper_architectures_have_the_papers_size():
    info = common.DATASETS["cifar10"]
    resnet50 = common.count_params(common.build_model("resnet50", info))[1]
    vit_small = sum(p.numel() for p in common.build_model("vit_small", info).parameters())
    assert 23.4e6 < resnet50 < 23.6e6  # the PruneLoRA paper: 23.5M
    assert 21.2e6 < vit_small < 21.5e6  # the PruneLoRA paper: 21.3M


def test_vit_base_without_hub_weights_says_how_to_provide_them(tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(common.UserError, match="--pretrained-weights"):
        common.build_model("vit_base", common.DATASETS["cifar10"], str(missing))


def test_augment_keeps_shape_and_content():
    info = common.DATASETS["cifar10"]
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = common.augment(x, info, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    # A crop shifted by at most 4 pixels (possibly flipped) keeps the central pixels of the image.
    assert not torch.equal(out, x)
    centre = x[:, :, 12:20, 12:20].float().mean()
    assert abs(out[:, :, 12:20, 12:20].float().mean() - centre) < 10


@pytest.mark.slow
def test_short_training_run_learns_and_checkpoint_round_trips(original, data_dir):
    meta = common.read_sidecar(original)
    assert meta["test_acc"] > 50  # chance is 10%
    for key in ("config", "data", "versions", "wall_time_s", "peak_mem_mb", "trainable_params", "total_params",
                "sparsity", "git_commit"):
        assert key in meta
    model, meta2 = common.load_checkpoint(original)
    data = common.data_from_spec(meta["data"], data_dir, "cpu")
    x, y = data.subset("test")
    assert abs(common.accuracy(common.predict(model, x, data.info), y) - meta["test_acc"]) < 0.01


def _last_line(proc):
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # one line, no traceback
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("flags, message", [
    (["--dataset", "mnist"], "unknown dataset"),
    (["--arch", "resnet7"], "unknown architecture"),
    (["--retrain", "--forget-class", "10"], "out of range"),
    (["--retrain", "--forget-random", "999999"], "--forget-random"),
    (["--val-fraction", "1.5"], "--val-fraction"),
])
def test_bad_pretrain_input_is_one_line_and_writes_nothing(tmp_path, data_dir, flags, message):
    base = ["--dataset", "fashion-mnist", "--arch", "resnet_tiny", "--train-subset", "500", "--epochs", "1"]
    # argparse keeps the last value of a repeated flag, so the bad value overrides the base one
    proc = run_script("pretrain.py", *base, *flags, "--data-dir", data_dir, "--out-dir", tmp_path, check=False)
    assert proc.returncode == 2 and message in _last_line(proc)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_existing_output_is_not_overwritten(original, data_dir, tmp_path):
    out = tmp_path / "ft.safetensors"
    out.write_bytes(b"keep me")
    proc = run_script("finetune.py", "--model", original, "--data-dir", data_dir, "--out", out, "--epochs", "1",
                      check=False)
    assert proc.returncode == 2 and "--overwrite" in _last_line(proc)
    assert out.read_bytes() == b"keep me" and not common.sidecar_path(out).exists()


@pytest.mark.slow
def test_truncated_and_foreign_checkpoints_are_rejected(original, original_vit, data_dir, tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(original.read_bytes()[:1000])
    shutil.copy(common.sidecar_path(original), common.sidecar_path(truncated))
    proc = run_script("finetune.py", "--model", truncated, "--data-dir", data_dir, "--out-dir", tmp_path,
                      check=False)
    assert proc.returncode == 2 and "truncated" in _last_line(proc)

    # A ViT's weights under a sidecar that claims resnet_tiny (checksum made consistent): wrong architecture.
    foreign = tmp_path / "foreign.safetensors"
    shutil.copy(original_vit, foreign)
    copy_sidecar(original, foreign)
    with pytest.raises(common.UserError, match="do not fit a resnet_tiny model"):
        common.load_checkpoint(foreign)
    with pytest.raises(common.UserError, match="holds a resnet_tiny model, not vit_tiny"):
        common.load_checkpoint(original, expect_arch="vit_tiny")
    outputs = {p.name for p in tmp_path.iterdir()}
    assert outputs == {"truncated.safetensors", "truncated.json", "foreign.safetensors", "foreign.json"}


@pytest.mark.slow
def test_pretrain_help_lists_every_flag_with_its_default():
    proc = run_script("pretrain.py", "--help")
    for flag in ("--arch", "--retrain", "--dataset", "--data-dir", "--val-fraction", "--split-seed", "--forget-class",
                 "--forget-random", "--forget-seed", "--epochs", "--lr", "--batch-size", "--seed", "--overwrite"):
        assert flag in proc.stdout
    assert "resnet50" in proc.stdout and "./data" in proc.stdout
    assert "lr=0.1" in proc.stdout  # the per-architecture recipe defaults are listed too


def test_random_images_are_the_same_on_every_call_and_each_caller_owns_its_copy(tmp_path):
    _, (x, y), (x_test, _) = common.load_dataset("random-cifar10", tmp_path)
    assert x.shape == (50000, 3, 32, 32) and x.dtype == torch.uint8 and x_test.shape == (1000, 3, 32, 32)
    first = x[:100].clone()
    x.zero_()  # a caller's in-place change stays in its copy
    _, (again, y_again), _ = common.load_dataset("random-cifar10", tmp_path)
    assert torch.equal(again[:100], first) and torch.equal(y_again, y)
    assert not any(tmp_path.iterdir())  # no files read or written
