"""The lean LoRA path (issue: LoRA and PruneLoRA cheaper than fine-tuning) computes what the plain paths compute."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

ARCH_INFO = {"resnet_tiny": common.DATASETS["fashion-mnist"], "vit_tiny": common.DATASETS["cifar10"]}


def _model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    model = common.build_model(arch, ARCH_INFO[arch])
    for m in model.modules():  # timm zeroes each block's last BatchNorm scale at init, which silences the blocks
        if isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
    return model


def _trained_merged(arch: str, prune_method: str, dropout: float, steps: int = 3) -> dict[str, torch.Tensor]:
    """Prune, add LoRA, take a few Adam steps on fixed random batches (seeded), merge; the plain state dict."""
    family = common.ARCHS[arch].family
    model = _model(arch)
    if prune_method != "none":
        common.prune_model(model, family, prune_method, 0.5)
    model = common.add_lora(model, rank=4, alpha=8, dropout=dropout, targets=common.LORA_DEFAULTS[family]["targets"])
    common.set_train_mode(model, freeze_bn=True)
    info = ARCH_INFO[arch]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, info.channels, info.size, info.size, generator=gen)
    y = torch.randint(0, info.num_classes, (16,), generator=gen)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(2)  # the dropout masks
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return common.plain_state_dict(common.merge_lora(model))


@pytest.mark.parametrize("arch", ["resnet_tiny", "vit_tiny"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lean_lora_equals_peft_on_an_unpruned_model(arch, dropout, monkeypatch):
    # The same random stream: the lean path draws each dropout mask once in forward, as peft does, and replays
    # it (restored RNG state) when it recomputes the dropped input in backward.
    lean = _trained_merged(arch, "none", dropout)
    monkeypatch.setattr(common, "_lora_layer_classes", lambda: {})  # peft's own LoRA layers
    plain = _trained_merged(arch, "none", dropout)
    assert lean.keys() == plain.keys()
    for key in lean:
        torch.testing.assert_close(lean[key], plain[key], atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.parametrize("arch", ["resnet_tiny", "vit_tiny"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_structured_mask_on_the_adapter_output_equals_the_dense_masked_delta(arch, dropout, monkeypatch):
    lean = _trained_merged(arch, "l2-structured", dropout)
    monkeypatch.setattr(common, "output_row_mask", lambda mask: None)  # force M * (BA) and a second conv
    dense = _trained_merged(arch, "l2-structured", dropout)
    for key in lean:
        torch.testing.assert_close(lean[key], dense[key], atol=1e-5, rtol=1e-4, msg=key)
    family = common.ARCHS[arch].family
    weights = {name: lean[f"{name}.weight"] for name in common.prunable_modules(_model(arch), family)}
    zeros = sum(int((w == 0).sum()) for w in weights.values()) / sum(w.numel() for w in weights.values())
    assert zeros == pytest.approx(0.5, abs=0.01)  # the merged model keeps exactly the pruned filters


def test_output_row_mask_tells_structured_from_unstructured_masks():
    structured = torch.zeros(4, 3, 3, 3, dtype=torch.bool)
    structured[[0, 2]] = True
    assert torch.equal(common.output_row_mask(structured), torch.tensor([True, False, True, False]))
    unstructured = structured.clone()
    unstructured[0, 0, 0, 0] = False
    assert common.output_row_mask(unstructured) is None


def test_dropout_keeps_no_copy_of_the_adapted_input():
    """Saved-for-backward bytes of a LoRA model in training are the same with dropout 0.1 as with 0."""
    def saved_bytes(dropout):
        model = common.add_lora(_model("resnet_tiny"), rank=4, alpha=8, dropout=dropout,
                                targets=common.LORA_DEFAULTS["resnet"]["targets"])
        common.set_train_mode(model, freeze_bn=True)
        return common.saved_activation_bytes(model, lambda m: m(torch.randn(8, 1, 28, 28)).sum())
    assert saved_bytes(0.1) == saved_bytes(0.0)


def test_frozen_batchnorm_computes_eval_batchnorm_keeps_less_and_restores_the_model():
    model = common.add_lora(_model("resnet_tiny"), rank=4, alpha=8, dropout=0.0,
                            targets=common.LORA_DEFAULTS["resnet"]["targets"])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # statistics unlike the init's, so a wrong formula shows
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.bias.uniform_(-1, 1)
    common.set_train_mode(model, freeze_bn=True)
    x = torch.randn(4, 1, 28, 28)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    eval_bytes = common.saved_activation_bytes(model, lambda m: m(x).sum())
    expected = model(x)
    with common.frozen_batchnorm(model):
        assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
        assert common.saved_activation_bytes(model, lambda m: m(x).sum()) < 0.75 * eval_bytes
    assert [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)] == norms  # the same modules are back
