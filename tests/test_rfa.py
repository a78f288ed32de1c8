"""RFA-style unlearning: zero residual at the start, alignment on Dr, both shift targets, ResNet and ViT."""
import pytest
import torch
from safetensors.torch import load_file

import common
import rfa
from conftest import assert_no_read_per_step, run_script


def _taps(original):
    teacher, meta = common.load_checkpoint(original)
    student, _ = common.load_checkpoint(original)
    student = common.add_lora(student, **common.lora_settings(common.ARCHS[meta["arch"]].family),
                              train_head=rfa.LORA_HEAD)
    teacher.eval(), student.eval()
    return (teacher, rfa.FeatureTap(teacher, teacher.get_classifier()),
            student, rfa.FeatureTap(student, student.get_classifier()), common.DATASETS[meta["data"]["dataset"]])


@pytest.mark.slow
@pytest.mark.parametrize("which", ["resnet", "vit"])
def test_student_equals_teacher_at_initialisation(which, original, original_vit):
    teacher, teacher_tap, student, student_tap, info = _taps(original if which == "resnet" else original_vit)
    x = common.normalize(torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8), info)
    with torch.no_grad():
        assert torch.equal(teacher_tap(teacher, x), student_tap(student, x))
    assert len(teacher_tap.blocks) == len(student_tap.blocks) > 0
    assert all(torch.equal(t, s) for t, s in zip(teacher_tap.blocks, student_tap.blocks))


@pytest.mark.slow
def test_training_on_retain_only_keeps_the_features_close(original, data_dir, workdir):
    out = workdir / "rfa_retain_only.safetensors"
    # A strong initial push on Df moves the adapters, then the retain alignment alone must hold Dr's features.
    run_script("rfa.py", "--model", original, "--forget-weight", "0", "--epochs", "2", "--data-dir", data_dir,
               "--out", out)
    assert common.read_sidecar(out)["config"]["target"] == rfa.TARGET["class"]  # the class-wise default
    teacher, meta = common.load_checkpoint(original)
    student, _ = common.load_checkpoint(out)
    data = common.data_from_spec(common.read_sidecar(out)["data"], data_dir, "cpu")
    x = common.normalize(data.subset("retain")[0][:256], data.info)
    teacher_tap, student_tap = (rfa.FeatureTap(m, m.get_classifier()) for m in (teacher, student))
    with torch.no_grad():
        teacher_tap(teacher.eval(), x), student_tap(student.eval(), x)
    for t, s in zip(teacher_tap.blocks, student_tap.blocks):
        assert (s - t).pow(2).mean() <= 1e-3 * t.pow(2).mean()


@pytest.mark.slow
@pytest.mark.parametrize("target", ["teacher-ce", "nearest-class-mean"])
@pytest.mark.parametrize("forget", [["--forget-class", "3"], ["--forget-random", "300"]], ids=["class", "random"])
def test_each_shift_target_end_to_end(target, forget, original, data_dir, workdir, train_loop_reads):
    out = workdir / f"rfa_{target}_{forget[0][2:]}.safetensors"
    run_script("rfa.py", "--model", original, *forget, "--target", target, "--epochs", "6", "--lr", "3e-3",
               "--data-dir", data_dir, "--out", out)
    meta = common.read_sidecar(out)
    assert meta["method"] == "rfa" and meta["trainable_params"] < 0.15 * meta["total_params"]
    assert_no_read_per_step(train_loop_reads)
    if forget[0] == "--forget-class":
        teacher, _ = common.load_checkpoint(original)
        data = common.data_from_spec(meta["data"], data_dir, "cpu")
        x, y = data.subset("forget")
        before = common.accuracy(common.predict(teacher, x, data.info), y)
        assert meta["quick_report"]["forget_acc"] < before - 25, (before, meta["quick_report"])


@pytest.mark.slow
def test_vit_path_moves_every_adapted_layer(original_vit, data_dir, workdir):
    out = workdir / "rfa_vit.safetensors"
    run_script("rfa.py", "--model", original_vit, "--forget-class", "3", "--epochs", "1", "--data-dir", data_dir,
               "--out", out)
    before, after = load_file(str(original_vit)), load_file(str(out))
    adapted = [k for k in before if k.endswith(("qkv.weight", "proj.weight", "fc1.weight", "fc2.weight"))
               and k.startswith("blocks.")]
    assert len(adapted) == 16  # 4 blocks x (qkv, proj, fc1, fc2)
    unchanged = [k for k in adapted if torch.equal(before[k], after[k])]
    assert not unchanged, f"adapters without effect: {unchanged}"
    assert torch.equal(before["head.weight"], after["head.weight"])  # head frozen by default
