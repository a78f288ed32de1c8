"""The lean LoRA path (issue: LoRA and PruneLoRA cheaper than fine-tuning) computes what the plain paths compute."""
import copy
import platform
import resource

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from conftest import HostReads, assert_no_read_per_step, run_script

ARCH_INFO = {"resnet_tiny": common.DATASETS["fashion-mnist"], "vit_tiny": common.DATASETS["cifar10"],
             "resnet18": common.DATASETS["cifar10"], "resnet50": common.DATASETS["cifar10"]}


def _model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    model = common.build_model(arch, ARCH_INFO[arch])
    for m in model.modules():  # timm zeroes each block's last BatchNorm scale at init, which silences the blocks
        if isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
    return model


class SharedDropoutMasks(nn.Dropout):
    """Dropout whose masks come, in call order, from one seeded generator; also stands in for
    add_lora's drop_mask. Two paths that draw their masks in the same order then drop the same elements, however
    differently each samples its own (peft: torch's Bernoulli; the lean path: 16 random bits per element)."""
    def __init__(self, p: float):
        super().__init__(p)
        self.gen = torch.Generator().manual_seed(2)

    def drop_mask(self, x: torch.Tensor, p: float) -> torch.Tensor:
        return torch.rand(x.shape, generator=self.gen) < p

    def forward(self, x):
        return x * ~self.drop_mask(x, self.p) / (1 - self.p) if self.training else x


def _trained_merged(arch: str, prune_method: str, dropout: float, steps: int = 3,
                    **lora_options) -> dict[str, torch.Tensor]:
    """Prune, add LoRA, take a few Adam steps on fixed random batches (seeded), merge; the plain state dict.
    With dropout, every adapter's dropout masks (peft's dropout modules and add_lora's drop_mask alike) come from
    a fresh SharedDropoutMasks, so every call drops the same elements."""
    family = common.ARCHS[arch].family
    model = _model(arch)
    if prune_method != "none":
        common.prune_model(model, family, prune_method, 0.5)
    masks = SharedDropoutMasks(dropout) if dropout else None
    if masks is not None:
        lora_options["drop_mask"] = masks.drop_mask
    model = common.add_lora(model, rank=4, alpha=8, dropout=dropout, targets=common.LORA_DEFAULTS[family]["targets"],
                            **lora_options)
    if masks is not None:
        for m in model.modules():
            if hasattr(m, "lora_dropout"):
                m.lora_dropout["default"] = masks
    common.set_train_mode(model, freeze_bn=True)
    info = ARCH_INFO[arch]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, info.channels, info.size, info.size, generator=gen)
    y = torch.randint(0, info.num_classes, (16,), generator=gen)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return common.plain_state_dict(common.merge_lora(model))


@pytest.mark.parametrize("arch", ["resnet_tiny", "vit_tiny"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lean_lora_equals_peft_on_an_unpruned_model(arch, dropout):
    # The same dropped elements in both (SharedDropoutMasks): the lean path draws each mask once in forward, as
    # peft does, and keeps it for backward's rebuilding of the dropped input.
    lean = _trained_merged(arch, "none", dropout)
    plain = _trained_merged(arch, "none", dropout, lean_forward=False)  # peft's own LoRA layers
    assert lean.keys() == plain.keys()
    for key in lean:
        torch.testing.assert_close(lean[key], plain[key], atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.parametrize("arch", ["resnet_tiny", "vit_tiny"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_structured_mask_on_the_adapter_output_equals_the_dense_masked_delta(arch, dropout):
    lean = _trained_merged(arch, "l2-structured", dropout)
    dense = _trained_merged(arch, "l2-structured", dropout, factor_row_masks=False)  # M * (BA), a second conv
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


def test_dropout_keeps_only_a_bool_mask_of_the_adapted_input():
    """Dropout 0.1 adds to the saved-for-backward bytes one byte per adapted input element (the drop mask),
    where peft keeps two float copies (eight bytes)."""
    x = torch.randn(8, 1, 28, 28)

    def saved_and_input_elements(dropout):
        model = common.add_lora(_model("resnet_tiny"), rank=4, alpha=8, dropout=dropout,
                                targets=common.LORA_DEFAULTS["resnet"]["targets"])
        common.set_train_mode(model, freeze_bn=True)
        adapted = [m for m in model.modules() if hasattr(m, "lora_A")]
        elements = []
        hooks = [m.register_forward_pre_hook(lambda m, args: elements.append(args[0].numel())) for m in adapted]
        _, saved = common.saved_activation_bytes(model, lambda m: m(x).sum())
        for hook in hooks:
            hook.remove()
        return saved, sum(elements)
    with_dropout, adapted_elements = saved_and_input_elements(0.1)
    without, _ = saved_and_input_elements(0.0)
    assert adapted_elements > 0 and with_dropout - without == adapted_elements


def test_adapters_on_layernorm_and_gelu_outputs_keep_their_inputs_and_rebuild_them_in_backward():
    """ViT's qkv and fc1 read a LayerNorm's output, fc2 a GELU's: their adapters keep the LayerNorm's or GELU's
    input, which the network keeps anyway, and rerun it in backward. The same gradients as when they keep the
    outputs; less kept by exactly those outputs' bytes; no hook left after merging."""
    torch.manual_seed(0)
    model = common.add_lora(_model("vit_tiny"), rank=4, alpha=8, dropout=0.0,
                            targets=common.LORA_DEFAULTS["vit"]["targets"])
    common.set_train_mode(model, freeze_bn=True)
    x = torch.randn(4, 3, 32, 32)
    outputs = []  # the LayerNorm and GELU outputs an adapter reads

    def remember_rebuildable(module, args):
        if hasattr(args[0], "rebuilt_by"):  # the output, and whether the network keeps its source for backward
            outputs.append((args[0], args[0].rebuilt_by[1]().requires_grad))
    for m in model.modules():
        if hasattr(m, "lora_A"):
            m.register_forward_pre_hook(remember_rebuildable)

    def saved_and_gradients():
        model.zero_grad(set_to_none=True)
        out, saved = common.saved_activation_bytes(model, lambda m: m(x))
        out.square().sum().backward()
        return saved, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    rebuilt_saved, rebuilt_grads = saved_and_gradients()
    blocks = len(model.base_model.model.blocks)
    assert len(outputs) == 3 * blocks  # qkv, fc1 and fc2 of every block
    # Block 0's first LayerNorm reads the frozen patch embedding, which needs no gradient and which the network
    # so does not keep: that adapter keeps the embedding instead of the LayerNorm's output, as many bytes.
    output_bytes = sum(t.numel() * t.element_size() for t, source_kept in outputs if source_kept)
    for hook in model.rebuild_hooks:
        hook.remove()
    kept_saved, kept_grads = saved_and_gradients()
    assert kept_saved - rebuilt_saved == output_bytes
    for name, grad in kept_grads.items():
        torch.testing.assert_close(rebuilt_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    model.rebuild_hooks = []
    merged = common.merge_lora(model)
    assert not any(m._forward_hooks for m in merged.modules())


def test_an_output_changed_in_place_after_its_layernorm_is_not_rebuilt():
    class AddOneInPlace(nn.Module):
        def forward(self, x):
            return x.add_(1.0)

    def gradients(lean_forward: bool):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), AddOneInPlace(), nn.Linear(8, 4))
        model = common.add_lora(net, rank=2, alpha=4, dropout=0.0, targets="3", train_head=False,
                                lean_forward=lean_forward)
        for m in model.modules():
            if hasattr(m, "lora_B"):
                nn.init.normal_(m.lora_B["default"].weight)
        model(torch.randn(5, 6, generator=torch.Generator().manual_seed(1))).square().sum().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    lean = gradients(lean_forward=True)
    plain = gradients(lean_forward=False)  # peft's own LoRA layers
    assert lean.keys() == plain.keys()
    for name in lean:
        torch.testing.assert_close(lean[name], plain[name], msg=name)


@pytest.mark.parametrize("arch", ["resnet_tiny", "resnet18", "resnet50"])
def test_frozen_batchnorm_folds_into_the_convolutions_keeps_less_and_restores_the_model(arch):
    """Inside frozen_batchnorm a pruned LoRA ResNet computes what it computes in eval mode (BatchNorm folded into
    every frozen convolution, the adapters' rows scaled alike), with the same adapter gradients, less kept for
    backward; afterwards the model is the one before, tensor for tensor."""
    info = ARCH_INFO[arch]
    model = _model(arch)
    common.prune_model(model, "resnet", "l2-structured", 0.5)
    model = common.prepare_model(common.add_lora(model, rank=4, alpha=8, dropout=0.0,
                                                 targets=common.LORA_DEFAULTS["resnet"]["targets"]), torch.device("cpu"))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # statistics unlike the init's, so a wrong formula shows
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.bias.uniform_(-1, 1)
            if hasattr(m, "lora_B"):  # a non-zero update, so the adapters' scaling shows
                nn.init.normal_(m.lora_B["default"].weight, std=0.1)
    common.set_train_mode(model, freeze_bn=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    x = torch.randn(2, info.channels, 32, 32)

    def output_and_gradients(net, x):
        net.zero_grad(set_to_none=True)
        out, saved = common.saved_activation_bytes(net, lambda m: m(x))
        out.square().sum().backward()
        return out, saved, {n: p.grad for n, p in net.named_parameters() if p.requires_grad}
    # The reference in float64: in float32 the unfolded network's own gradients are off by up to 2e-4 (relative)
    # on ResNet-50, the folded one's by about 1e-6.
    expected, _, expected_grads = output_and_gradients(copy.deepcopy(model).double(), x.double())
    eval_bytes = output_and_gradients(model, x)[1]
    with common.frozen_batchnorm(model):
        assert not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in model.modules())  # all folded
        out, saved, grads = output_and_gradients(model, x)
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
        for name, grad in expected_grads.items():
            assert (grads[name].double() - grad).norm() <= 1e-5 * grad.norm(), name
        assert saved < 0.75 * eval_bytes
    assert [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)] == norms  # the same modules are back
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_frozen_batchnorm_without_a_frozen_convolution_before_it_runs_as_frozen_batchnorm():
    from torchvision.ops.misc import FrozenBatchNorm2d
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    model[2].requires_grad_(False), model[4].requires_grad_(False)  # the convolutions train: nothing to fold into
    with torch.no_grad():
        for bn in (model[2], model[4]):
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.bias.uniform_(-1, 1)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    with common.frozen_batchnorm(model):
        assert isinstance(model[2], FrozenBatchNorm2d) and isinstance(model[4], FrozenBatchNorm2d)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_lora_drop_mask_keeps_one_minus_p_in_the_input_layout_and_draws_anew():
    x = torch.randn(64, 32, 16, 16).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    first, second = ~common.lora_drop_mask(x, 0.1), ~common.lora_drop_mask(x, 0.1)
    assert first.shape == x.shape and first.dtype == torch.bool and first.stride() == x.stride()
    n = x.numel()
    for keep in (first, second):  # the kept fraction within 5 standard deviations of 0.9
        assert abs(keep.float().mean().item() - 0.9) < 5 * (0.09 / n) ** 0.5
    assert abs((first & second).float().mean().item() - 0.81) < 5 * (0.81 * 0.19 / n) ** 0.5  # independent draws
    for dim in range(4):  # no position, channel or image is favoured
        per_slice = first.float().mean([d for d in range(4) if d != dim])
        assert per_slice.min() > 0.88 and per_slice.max() < 0.92


@pytest.mark.slow  # an inductor compilation
def test_the_compiled_lora_drop_mask_keeps_one_minus_p_in_the_input_layout():
    x = torch.randn(64, 32, 16, 16).contiguous(memory_format=torch.channels_last)
    torch._dynamo.reset()
    keep = ~torch.compile(common.lora_drop_mask, fullgraph=True)(x, 0.1)
    assert keep.shape == x.shape and keep.dtype == torch.bool and keep.stride() == x.stride()
    assert abs(keep.float().mean().item() - 0.9) < 5 * (0.09 / x.numel()) ** 0.5


@pytest.mark.parametrize("arch", ["resnet_tiny", "vit_tiny"])
def test_dynamo_traces_a_pruned_lora_training_step_as_one_graph(arch):
    """--compile's premise: with the paper's adapter dropout and frozen BatchNorm folded in, the training forward
    is one graph. A break at every adapted layer (int64 random_ in the dropout sampler did that) left ResNet-50
    compiled frame by frame, past dynamo's recompile limit, and made its LoRA step twice as slow as eager."""
    family = common.ARCHS[arch].family
    model = _model(arch)
    common.prune_model(model, family, "l2-structured", 0.5)
    model = common.add_lora(model, **common.lora_settings(family, dropout=0.1), train_head=True)
    info = ARCH_INFO[arch]
    x = torch.randn(4, info.channels, info.size, info.size)
    torch._dynamo.reset()
    with common.frozen_batchnorm(model):
        common.set_train_mode(model, freeze_bn=True)
        explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, [b.reason.splitlines()[0] for b in explained.break_reasons]


@pytest.mark.slow  # torch.compile takes most of a minute on 2 CPU cores
def test_compiled_training_equals_eager_with_one_static_graph_per_batch_size():
    """train_loop(compile_mode="reduce-overhead") on a pruned LoRA model (the PruneLoRA path, frozen BatchNorm
    swapped in): the same weights as eager after two epochs, up to inductor's reordering of float sums. Batches of
    16, 16, 7 and 5 (a pass's partial last batch, then a second pass's, as in RL's Df-then-Dr epoch) compile three
    static graphs in the first epoch and none in the second; a symbolic batch size would have covered 7 and 5 with
    one graph."""
    def trained(compile_mode):
        model = _model("resnet_tiny")
        common.prune_model(model, "resnet", "l2-structured", 0.5)
        model = common.add_lora(model, rank=4, alpha=8, dropout=0.0, targets=common.LORA_DEFAULTS["resnet"]["targets"])
        gen = torch.Generator().manual_seed(1)
        batches = [(torch.randn(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen))
                   for n in (16, 16, 7, 5)]
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        common.train_loop(model, optimizer, 2, lambda epoch: batches, lambda m, b: F.cross_entropy(m(b[0]), b[1]),
                          device=torch.device("cpu"), freeze_bn=True, compile_mode=compile_mode)
        return common.plain_state_dict(common.merge_lora(model))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager, compiled = trained(None), trained("reduce-overhead")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3  # 16, 7, 5: static, none recompiled
    assert compiled.keys() == eager.keys()  # no torch.compile wrapper prefix reaches the checkpoint
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], atol=1e-4, rtol=1e-3, msg=key)


def test_train_loop_reads_the_loss_once_per_epoch_and_never_per_step():
    """The loop sums the loss on the device and reads it at each epoch's end; the batch order, the augmentation,
    the scheduler and gradient clipping read nothing. On a GPU, a read per step makes the host wait for each step
    to finish before it queues the next one's kernels."""
    info = common.DATASETS["fashion-mnist"]
    model = _model("resnet_tiny")
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (100, 1, 28, 28), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 10, (100,), generator=gen)
    optimizer = common.make_optimizer("sgd", model.parameters(), 0.01)
    scheduler = common.make_scheduler("cosine", optimizer, 14, 2)
    reads = HostReads()
    with reads:
        result = common.train_loop(model, optimizer, 2, common.shuffled_batches(x, y, 16, gen),
                                   common.ce_loss(info, None, True, gen), device=torch.device("cpu"),
                                   scheduler=scheduler, grad_clip=1.0, log=False)
    assert len(result.history) == 2 and reads.count == 2


def test_train_loop_counts_the_first_steps_flops_and_a_frozen_layer_costs_only_its_forward():
    """The sidecar's step_gflop: a linear layer of I -> O on B rows costs 2BIO in the forward, and as much again
    in the backward for the gradient of its weight and for that of its input, each where something needs it: the
    first layer's input needs none, a frozen layer's weight none, and then nothing below the second layer."""
    batch, sizes = 8, (6, 5, 3)
    x, y = torch.randn(4 * batch, sizes[0]), torch.randint(0, sizes[-1], (4 * batch,))

    def first_step_flops(freeze_first: bool) -> int:
        model = nn.Sequential(nn.Linear(*sizes[:2]), nn.ReLU(), nn.Linear(*sizes[1:]))
        model[0].requires_grad_(not freeze_first)
        optimizer = common.make_optimizer("sgd", model.parameters(), 0.01)
        result = common.train_loop(model, optimizer, 2, lambda epoch: common.batches(x, y, batch),
                                   lambda m, b: F.cross_entropy(m(b[0]), b[1]), device=torch.device("cpu"),
                                   log=False)
        return result.step_flops

    first, second = (2 * batch * i * o for i, o in zip(sizes, sizes[1:]))
    assert first_step_flops(freeze_first=False) == 2 * first + 3 * second
    assert first_step_flops(freeze_first=True) == first + 2 * second


@pytest.mark.slow
@pytest.mark.parametrize("method", ["finetune", "pruneft", "lora", "loraprune"])
def test_the_prunelora_scripts_read_no_tensor_value_per_training_step(method, train_loop_reads, original_small,
                                                                      data_dir, tmp_path):
    """The methods' batches and losses run whole epochs without making the host wait for a value (the loop's own
    read at each epoch's end is allowed). The other training scripts are checked in their end-to-end tests."""
    run_script(f"{method}.py", "--model", original_small, "--forget-random", "60", "--epochs", "1", "--batch-size",
               "32", "--data-dir", data_dir, "--out", tmp_path / f"{method}.safetensors")
    assert_no_read_per_step(train_loop_reads)


def test_batchnorm_reestimation_averages_over_all_images_and_builds_no_graph():
    info = common.DATASETS["fashion-mnist"]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    x = torch.randint(0, 256, (512, 1, 28, 28), dtype=torch.uint8)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        common.recalibrate_batchnorm(model, x, info, None, batch_size=256)
    assert not saved  # statistics only: nothing kept for a backward pass
    with torch.no_grad():
        features = model[0](common.normalize(x, info, None))
    torch.testing.assert_close(model[1].running_mean, features.mean((0, 2, 3)), atol=1e-5, rtol=1e-5)
    assert model[1].momentum == 0.1  # the usual momentum is back for later training


def test_global_magnitude_pruning_of_a_channels_last_model_equals_torchs_global_unstructured():
    """Two rounds (IMP's second prunes among the survivors) on a channels_last model (prepare_model's layout, which
    torch's global_unstructured refuses) give exactly the masks torch's rule gives the same weights contiguous."""
    import torch.nn.utils.prune as torch_prune
    ours = common.prepare_model(_model("resnet_tiny"), torch.device("cpu"))
    reference = _model("resnet_tiny")
    for amount in (0.5, 0.3):
        common.global_magnitude_prune(ours, "resnet", amount)
        layers = common.prunable_modules(reference, "resnet").values()
        torch_prune.global_unstructured([(m, "weight") for m in layers], pruning_method=torch_prune.L1Unstructured,
                                        amount=amount)
        for name, m in common.prunable_modules(ours, "resnet").items():
            assert torch.equal(m.weight_mask.bool(), dict(reference.named_modules())[name].weight_mask.bool()), name
    assert common.sparsity(ours, "resnet") == pytest.approx(1 - 0.5 * 0.7, abs=1e-3)


def _architecture(arch: str) -> nn.Module:
    """A model of `arch`; "bottleneck": a ResNet-50-shaped tiny net (bottleneck blocks) for Fashion-MNIST."""
    from timm.models.resnet import Bottleneck, ResNet
    if arch == "bottleneck":
        return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10, in_chans=1, channels=(8, 16, 32, 64))
    return common.build_model(arch, ARCH_INFO[arch])


def _shrinkable(arch: str) -> tuple[nn.Module, str, torch.Tensor, torch.Tensor]:
    """A structurally pruned float64 model with BatchNorm statistics, scales and shifts unlike the init's (so a
    pruned channel's constant output is not zero), and a fixed batch."""
    torch.manual_seed(0)
    info = ARCH_INFO["resnet_tiny" if arch == "bottleneck" else arch]
    model = _architecture(arch)
    family = "vit" if arch.startswith("vit") else "resnet"
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(), m.running_mean.normal_(), m.running_var.uniform_(0.5, 2)
            if isinstance(m, nn.Linear):
                m.bias.normal_(0, 0.5)  # a pruned ViT row outputs its bias
    model = common.prepare_model(model.double(), torch.device("cpu"))
    common.prune_model(model, family, "l2-structured", 0.5)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, info.channels, info.size, info.size, generator=gen, dtype=torch.float64)
    return model, family, x, torch.randint(0, info.num_classes, (8,), generator=gen)


@pytest.mark.parametrize("arch", ["resnet_tiny", "bottleneck", "vit_tiny"])
def test_shrunk_model_computes_and_trains_exactly_as_the_masked_model(arch):
    """--shrink: the same outputs (train and eval mode), and after a few SGD steps with momentum and weight decay
    (BatchNorm in train mode: pruned channels' shifts and statistics move too) the expanded model equals the
    masked model trained alike, to float64 rounding; it is the plain architecture with the same masks."""
    masked, family, x, y = _shrinkable(arch)
    small = common.shrink_pruned(masked, family)
    assert sum(p.numel() for p in small.parameters()) < 0.85 * sum(p.numel() for p in masked.parameters())
    for mode in (False, True):
        one, other = common.copy_model(masked).train(mode), common.copy_model(small).train(mode)
        torch.testing.assert_close(other(x), one(x), atol=1e-10, rtol=1e-10)
    trained = {}
    for name, net in (("masked", common.copy_model(masked)), ("shrunk", common.copy_model(small))):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(net.train()(x), y).backward()
            optimizer.step()
        trained[name] = net
    expanded = common.expand_pruned(common.copy_model(masked), trained["shrunk"], family)
    assert common.pruned_modules(expanded) == common.pruned_modules(masked)
    reference, result = common.plain_state_dict(trained["masked"]), common.plain_state_dict(expanded)
    assert result.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(result[key], reference[key], atol=1e-8, rtol=1e-8, msg=key)
    before = common.plain_state_dict(masked)
    assert sum(not torch.equal(result[k], before[k]) for k in result) > len(result) // 2  # it did train
    plain = _architecture(arch).double()
    plain.load_state_dict(result)  # strict: the usual architecture
    assert common.sparsity(plain, family) == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("arch", ["bottleneck", "vit_tiny"])
def test_shrunk_prunelora_trains_exactly_as_the_masked_prunelora(arch):
    """PruneLoRA --shrink: given the masked model's adapters (A over the whole input: lora_A_removed holds the
    columns for the removed constant inputs; B non-zero), the shrunk LoRA model computes the same (frozen
    BatchNorm folded in too), and after a few Adam steps (dropout 0) merging and expanding give the masked
    PruneLoRA's merged model, to float64 rounding."""
    masked, family, x, y = _shrinkable(arch)
    targets = common.LORA_DEFAULTS[family]["targets"]
    reference = common.add_lora(common.copy_model(masked), rank=4, alpha=8, dropout=0.0, targets=targets)
    shrunk = common.add_lora(common.shrink_pruned(masked, family), rank=4, alpha=8, dropout=0.0, targets=targets)
    rows, inputs = common.shrink._shrink_plan(masked, family)
    with torch.no_grad():
        for name, m in reference.named_modules():
            if hasattr(m, "lora_B"):
                s = shrunk.get_submodule(name)
                nn.init.normal_(s.lora_B["default"].weight, std=0.1)
                plain_name = name.removeprefix("base_model.model.")
                m.lora_B["default"].weight.zero_()[rows.get(plain_name, slice(None))] = s.lora_B["default"].weight
                a = m.lora_A["default"].weight
                if plain_name in inputs:
                    kept, removed = inputs[plain_name][:2]
                    a[:, kept], a[:, removed] = s.lora_A["default"].weight, s.lora_A_removed["default"]
                else:
                    a.copy_(s.lora_A["default"].weight)
    assert any(hasattr(m, "lora_A_removed") for m in shrunk.modules())
    for net in (reference, shrunk):
        common.set_train_mode(net, freeze_bn=True)
    expected = reference(x)
    torch.testing.assert_close(shrunk(x), expected, atol=1e-10, rtol=1e-10)
    with common.frozen_batchnorm(shrunk):  # BatchNorm folded into ShrunkConv2d, removed-input weights scaled
        torch.testing.assert_close(shrunk(x), expected, atol=1e-10, rtol=1e-10)
    for net in (reference, shrunk):
        optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
    merged = common.plain_state_dict(common.merge_lora(reference))
    expanded = common.expand_pruned(common.copy_model(masked), common.merge_lora(shrunk), family)
    result = common.plain_state_dict(expanded)
    assert result.keys() == merged.keys()
    for key in merged:
        torch.testing.assert_close(result[key], merged[key], atol=1e-8, rtol=1e-8, msg=key)
    assert common.sparsity(expanded, family) == common.sparsity(masked, family)


def test_adapters_on_a_shrunk_layer_are_drawn_as_over_the_whole_input():
    """peft draws A from kaiming-uniform over the layer's inputs; on a shrunk layer the bound is the whole (kept +
    removed) input's, for the kept and the removed columns alike, so training starts as the masked model's."""
    masked, family, _, _ = _shrinkable("bottleneck")
    torch.manual_seed(3)
    shrunk = common.add_lora(common.shrink_pruned(masked, family), rank=64, alpha=8, dropout=0.0,
                             targets=common.LORA_DEFAULTS[family]["targets"])
    layer = shrunk.get_submodule("base_model.model.layer4.0.conv3")  # 1x1, half of its inputs removed
    bound = 1 / masked.get_submodule("layer4.0.conv3").in_channels ** 0.5
    for weight in (layer.lora_A["default"].weight, layer.lora_A_removed["default"]):
        assert weight.abs().max() <= bound and weight.abs().max() > 0.95 * bound


def test_shrink_refuses_a_model_without_structured_masks():
    model, family, _, _ = _shrinkable("resnet_tiny")
    common.allow_regrowth(model)
    with pytest.raises(common.UserError, match="--shrink needs filters that stay pruned"):
        common.shrink_pruned(model, family)


def test_batchnorm_reestimated_on_the_shrunk_model_is_the_masked_models():
    """The scripts re-estimate BatchNorm on the shrunk copy (a cheaper forward): written back, the statistics are
    those of the masked model's re-estimation, the pruned channels' (zero inputs) included."""
    masked, family, _, _ = _shrinkable("bottleneck")
    masked.float()  # the dtype of normalised images
    info = ARCH_INFO["resnet_tiny"]
    x = torch.randint(0, 256, (96, info.channels, info.size, info.size), dtype=torch.uint8)
    small = common.shrink_pruned(masked, family)
    common.recalibrate_batchnorm(masked, x, info, None, batch_size=32)
    common.recalibrate_batchnorm(small, x, info, None, batch_size=32)
    expanded = common.plain_state_dict(common.expand_pruned(common.copy_model(masked), small, family))
    reference = common.plain_state_dict(masked)
    stats = [k for k in reference if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert stats
    for key in stats:
        torch.testing.assert_close(expanded[key], reference[key], atol=1e-5, rtol=1e-5, msg=key)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc; a no-op elsewhere")
def test_a_cpu_run_reuses_freed_memory_instead_of_faulting_it_in_every_step():
    # What cli.run_main sets for every script (process-wide; this test process may not have run a script yet).
    common.keep_freed_memory()
    for _ in range(10):  # the heap grows to hold the block (placement needs a few rounds to settle)
        torch.ones(2**24)  # 64 MB: glibc's default maps it afresh every time, 16,384 page faults
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.ones(2**24)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 1_000  # 81,925 without
