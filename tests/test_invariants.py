"""Fast guards of what users rely on, on tiny real models and Fashion-MNIST images: the integrity checks (an
edited forget hash, non-finite weights, a live run's lock, mixed forget sets), BatchNorm frozen in the adapter
modes, and NegGrad+'s weighting. Each fails when its invariant is broken by a one-line change."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import common
import neggradplus


@pytest.fixture(scope="module")
def tiny(data_dir):
    """Class-wise forgetting of class 3 on 400 images, and a random resnet_tiny for them."""
    data = common.make_data("fashion-mnist", data_dir, train_subset=400, forget_class=3)
    common.seed_everything(0)
    return data, common.build_model("resnet_tiny", data.info)


def _save(model, data, path):
    return common.save_checkpoint(model, path, arch="resnet_tiny", method="finetune", data=data, config={},
                                  result=None, trainable_params=0)


def test_a_sidecars_forget_hash_is_recomputed_and_an_edited_one_refused(tiny, data_dir):
    data, _ = tiny
    assert common.data_from_spec(data.spec, data_dir, "cpu").forget_hash == data.forget_hash
    edited = dict(data.spec, forget_hash="0" * 16)
    with pytest.raises(common.UserError, match="does not match the forget set"):
        common.data_from_spec(edited, data_dir, "cpu")


def test_non_finite_weights_are_neither_saved_nor_loaded(tiny, tmp_path):
    data, model = tiny
    broken = common.copy_model(model)
    with torch.no_grad():
        next(broken.parameters())[0].fill_(float("nan"))
    with pytest.raises(common.UserError, match="NaN or inf"):
        _save(broken, data, tmp_path / "nan.safetensors")
    assert list(tmp_path.iterdir()) == []
    # A file whose checksum matches its sidecar but holds a NaN (written by another tool) is refused on load.
    good = tmp_path / "good.safetensors"
    meta = _save(model, data, good)
    state = common.plain_state_dict(broken)
    save_file(state, str(good))
    meta["weights_sha256"] = common.file_sha256(good)
    common.sidecar_path(good).write_text(json.dumps(meta))
    with pytest.raises(common.UserError, match="NaN or inf"):
        common.load_checkpoint(good)


def test_an_output_held_by_a_live_process_is_refused_and_free_once_it_ends(tmp_path):
    out = tmp_path / "model.safetensors"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import fcntl, os, sys, time
        fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b"pid 4242 on host elsewhere")
        print("held", flush=True)
        time.sleep(60)"""), str(common.lock_path(out))], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(common.UserError, match=r"being written by another run \(pid 4242 on host elsewhere\)"):
            common.check_writable(out, overwrite=False)
    finally:
        holder.kill()
        holder.wait()
    assert common.check_writable(out, overwrite=False) == out  # the kernel let go of the dead holder's lock
    common.release_claim(out)
    assert not common.lock_path(out).exists()


def test_evaluate_refuses_models_that_forgot_different_sets(tiny):
    data, _ = tiny
    spec = data.spec
    meta = dict(arch="resnet_tiny", data=spec)
    other = dict(arch="resnet_tiny", data=dict(spec, forget_class=4, forget_hash="f" * 16))
    assert common.check_compatible({"a": meta, "b": dict(meta)}) == spec
    with pytest.raises(common.UserError, match="forgot a different set"):
        common.check_compatible({"a": meta, "b": other})
    with pytest.raises(common.UserError, match="differ in data split_seed"):
        common.check_compatible({"a": meta, "b": dict(meta, data=dict(spec, split_seed=1))})


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_batchnorm_statistics_stay_frozen_in_the_adapter_modes(tiny, freeze_bn):
    data, model = tiny
    model = common.add_lora(common.copy_model(model), **common.lora_settings("resnet"))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [(m.running_mean.clone(), m.running_var.clone()) for m in norms]
    x, y = data.subset("retain")
    optimizer = common.make_optimizer("adam", model.parameters(), 1e-3)
    common.train_loop(model, optimizer, 1, lambda epoch: common.batches(x[:128], y[:128], 64),
                      common.ce_loss(data.info, None, False), device=torch.device("cpu"), freeze_bn=freeze_bn,
                      log=False)
    unchanged = [torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
                 for m, (mean, var) in zip(norms, before)]
    assert all(unchanged) if freeze_bn else not any(unchanged)


def test_neggradplus_descends_beta_retain_loss_minus_the_rest_on_the_forget_loss(tiny):
    data, model = tiny
    ce = common.ce_loss(data.info, None, False)
    retain, forget = data.subset("retain"), data.subset("forget")
    pair = ((retain[0][:16], retain[1][:16]), (forget[0][:16], forget[1][:16]))
    model.eval()
    with torch.no_grad():
        loss = neggradplus.neggradplus_loss(ce, 0.9)(model, pair)
        logits = [model(common.normalize(x, data.info)) for x, _ in pair]
    expected = 0.9 * F.cross_entropy(logits[0], pair[0][1]) - 0.1 * F.cross_entropy(logits[1], pair[1][1])
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
