"""Tests of models/fast.py (the fast path: folded ResNet blocks, fused attention, fast dropout), --exact and
--compile (util/compile.py).

The fast path must stay within float rounding of the exact one: outputs and losses within 1e-4, gradients within
1e-3 relative, on the parity case's configuration and its neighbours (R50, masks, two-stage, pre-norm)."""

import copy
import math

import pytest
import torch

import engine
import main as main_py
import util.compile
from helpers import MASK_HEAD_FLAGS, run_main, tiny_args, tiny_detr_and_optimizer, tiny_flags
from models import build_model
from models import fast as fast_path
from models.backbone import FrozenBatchNorm2d
from models.fast import (
    ContiguousWeightGradConv2d,
    FoldedBasicBlock,
    FoldedBottleneck,
    FoldedLayerGetter,
    FusedMultiheadAttention,
    adamw_options,
    contiguous_weight_grad_convs,
    enable_fast_path,
    fold_norm_into_conv,
)
from util.misc import nested_tensor_from_tensor_list

# The parity case's flags (tests/data/spec/parity/case.json), without the ImageNet weights the default asks for.
PARITY_FLAGS = [
    "--device",
    "cpu",
    "--backbone",
    "resnet18",
    "--hidden_dim",
    "64",
    "--nheads",
    "4",
    "--enc_layers",
    "2",
    "--dec_layers",
    "2",
    "--dim_feedforward",
    "128",
    "--num_queries",
    "10",
    "--dropout",
    "0.0",
    "--backbone_weights",
    "none",
]
CONFIGURATIONS = {
    "parity": PARITY_FLAGS,
    # The mask head's group norms need widths in multiples of 8.
    "masks": PARITY_FLAGS + ["--masks", *MASK_HEAD_FLAGS],
    "two_stage": PARITY_FLAGS + ["--two_stage", "--feature_stride", "16"],
    "pre_norm": PARITY_FLAGS + ["--pre_norm"],
    "resnet50": [
        "--device",
        "cpu",
        "--backbone",
        "resnet50",
        "--backbone_weights",
        "none",
        "--dropout",
        "0.0",
        "--enc_layers",
        "2",
        "--dec_layers",
        "2",
        "--num_queries",
        "20",
    ],
}


@torch.no_grad()
def fill_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Every floating parameter and buffer set from a seeded generator: matrices uniform with variance 1 / fan-in
    (activations keep their scale through a ResNet without trained norms), norm scales and running variances
    near 1, biases and means small."""
    g = torch.Generator().manual_seed(seed)
    for key, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            continue
        u = torch.rand(tensor.shape, generator=g, dtype=torch.float64) * 2 - 1
        if tensor.dim() > 1:
            values = u * math.sqrt(3.0 / math.prod(tensor.shape[1:]))
        elif key.endswith(("running_var", "weight")):
            values = 1.0 + 0.2 * u
        else:
            values = 0.1 * u
        tensor.copy_(values.to(tensor.dtype))


def inputs(seed: int = 0):
    """Two images of different sizes (so the batch has padding) and their targets."""
    g = torch.Generator().manual_seed(seed)
    images = nested_tensor_from_tensor_list(
        [torch.randn(3, 96, 128, generator=g), torch.randn(3, 112, 80, generator=g)]
    )
    targets = []
    for n in (3, 5):
        boxes = torch.cat([torch.rand(n, 2, generator=g) * 0.5 + 0.25, torch.rand(n, 2, generator=g) * 0.3 + 0.1], 1)
        masks = torch.rand(n, 112, 128, generator=g) > 0.5
        targets.append({"labels": torch.randint(0, 5, (n,), generator=g), "boxes": boxes, "masks": masks})
    return images, targets


class ReplayingMatcher(torch.nn.Module):
    """The criterion's matcher, recording its assignments, or replaying given ones. The Hungarian matching is
    discontinuous: where two queries' costs tie within float rounding (random weights make near-twin queries),
    any change of rounding may swap them. The fast path's losses are compared under the exact path's matching."""

    def __init__(self, matcher: torch.nn.Module, replay=None):
        super().__init__()
        self.matcher, self.replay, self.calls = matcher, replay, []

    def forward(self, outputs, targets):
        computed = self.matcher(outputs, targets)
        self.calls.append(computed)
        return computed if self.replay is None else self.replay[len(self.calls) - 1]


def run_case(flags, fast: bool, replay=None):
    """(eval outputs, train outputs, losses, gradients, matcher assignments) of the model built from flags,
    exact or fast; `replay`: the assignments to use instead of the matcher's."""
    torch.manual_seed(0)
    model, criterion, _ = build_model(main_py.get_args_parser().parse_args(flags))
    criterion.matcher = ReplayingMatcher(criterion.matcher, replay)
    fill_weights(model)
    if fast:
        enable_fast_path(model)
    images, targets = inputs()
    if "--masks" not in flags:
        targets = [{k: v for k, v in t.items() if k != "masks"} for t in targets]
    model.eval()
    with torch.no_grad():
        eval_out = model(images)
    model.train()
    train_out = model(images)
    losses = criterion(train_out, targets)
    sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return eval_out, train_out, losses, grads, criterion.matcher.calls


def max_abs_difference(a, b) -> float:
    """Largest absolute difference over the tensors of two nests of dicts and lists."""
    if isinstance(a, torch.Tensor):
        return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    if isinstance(a, dict):
        return max([max_abs_difference(v, b[k]) for k, v in a.items()], default=0.0)
    return max([max_abs_difference(x, y) for x, y in zip(a, b)], default=0.0)


@pytest.fixture(scope="module", params=list(CONFIGURATIONS))
def exact_and_fast(request):
    flags = CONFIGURATIONS[request.param]
    exact = run_case(flags, fast=False)
    return request.param, exact, run_case(flags, fast=True, replay=exact[4])


def test_fast_path_outputs_and_losses_within_1e_4_of_exact(exact_and_fast):
    name, exact, fast = exact_and_fast
    for index, what in ((0, "eval outputs"), (1, "train outputs"), (2, "losses")):
        difference = max_abs_difference(exact[index], fast[index])
        assert difference <= 1e-4, f"{name}: {what} differ by {difference:.2e}"
    # Not equal either: the fast path really runs other kernels.
    assert max_abs_difference(exact[0], fast[0]) > 0
    if name == "parity":  # no near-ties there: the fast path's own matching is the exact one's
        assert max_abs_difference(exact[4], fast[4]) == 0


def test_fast_path_gradients_within_1e_3_relative(exact_and_fast):
    name, (_, _, _, exact, _), (_, _, _, fast, _) = exact_and_fast
    assert exact.keys() == fast.keys()
    # Each gradient's error relative to its own size, as the norm of the difference over the norm of the gradient.
    # Rounding differs between CPU kinds and a deep backbone amplifies it unevenly over a tensor's elements: on AVX2
    # the worst element of a ResNet-50 layer4 gradient moves by 4.5e-3 of the tensor's largest, its norm by 4.3e-4
    # (on AVX-512 both by about 2e-6), so an element-wise maximum measures the CPU, the norm the path. The first decoder
    # layer's self-attention acts on all-zero queries: its projection gradients are rounding noise (about 1e-10,
    # their true value 0) on both paths, and are measured against a floor of 1e-5 of the largest gradient norm.
    floor = 1e-5 * max(g.norm().item() for g in exact.values())
    worst = max(((exact[n] - fast[n]).norm().item() / max(exact[n].norm().item(), floor), n) for n in exact)
    assert worst[0] <= 1e-3, f"{name}: gradient of {worst[1]} differs by {worst[0]:.2e} (relative, in norm)"


def test_fast_path_keeps_weights_and_state_dict_layout():
    model, _, _ = build_model(tiny_args("--masks", *MASK_HEAD_FLAGS))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    enable_fast_path(model)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    body = model.detr.backbone[0].body
    assert type(body) is FoldedLayerGetter
    assert all(type(m) is FoldedBasicBlock for name, m in body.named_modules() if name.count(".") == 1)
    # A checkpoint of the fast model loads into the exact one (and back): nothing to convert.
    exact, _, _ = build_model(tiny_args("--masks", *MASK_HEAD_FLAGS))
    exact.load_state_dict(after, strict=True)


@pytest.mark.parametrize("stride,bias,input_grad", [(2, False, False), (1, True, True), (2, True, True)])
def test_contiguous_weight_grad_conv_gives_nn_conv2ds_gradients(stride, bias, input_grad):
    torch.manual_seed(0)
    reference = torch.nn.Conv2d(128, 64, 3, stride=stride, padding=1, bias=bias)
    conv = copy.deepcopy(reference)
    assert contiguous_weight_grad_convs(torch.nn.Sequential(conv)) == ["0"]
    assert type(conv) is ContiguousWeightGradConv2d and conv.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(2, 128, 20, 18).to(memory_format=torch.channels_last).requires_grad_(input_grad)
    gradients = []
    for module in (reference, conv.to(memory_format=torch.channels_last)):
        inputs = x.detach().clone().requires_grad_(input_grad)
        out = module(inputs)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        gradients.append(
            [module.weight.grad] + ([module.bias.grad] if bias else []) + ([inputs.grad] if input_grad else [])
        )
    assert type(conv(x).grad_fn).__name__ == "_ContiguousWeightGradBackward"
    for expected, got in zip(*gradients):
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    # Elsewhere it is nn.Conv2d: without gradients, and under autocast (its 16-bit kernels are the fast ones).
    with torch.no_grad():
        assert conv(x).grad_fn is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert type(conv(x).grad_fn).__name__ == "ConvolutionBackward0"


def test_only_the_wide_3x3_convolutions_of_the_resnet_get_contiguous_weight_gradients():
    model, _, _ = build_model(tiny_args("--lr_backbone", "1e-5"))
    enable_fast_path(model)
    converted = {n for n, m in model.named_modules() if type(m) is ContiguousWeightGradConv2d}
    # ResNet-18's 3x3 convolutions of 128 input channels and more: 3 of layer2's 4 (its first reads layer1's 64
    # channels), and all 4 of layer3 and of layer4; none in layer1, no 1x1 downsample.
    body = "backbone.0.body."
    expected = {body + f"layer2.{b}.conv{c}" for b, c in ((0, 2), (1, 1), (1, 2))}
    expected |= {body + f"layer{i}.{b}.conv{c}" for i in (3, 4) for b in (0, 1) for c in (1, 2)}
    assert converted == expected


def test_folded_bottleneck_trains_the_convolution_weight_and_keeps_the_norm_frozen():
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_args("--backbone", "resnet50", "--lr_backbone", "1e-5"))
    fill_weights(model)
    enable_fast_path(model)
    assert any(type(m) is FoldedBottleneck for m in model.modules())
    model.train()
    model(torch.randn(1, 3, 64, 64))["pred_boxes"].sum().backward()
    conv = model.backbone[0].body.layer2[0].conv1
    norm = model.backbone[0].body.layer2[0].bn1
    assert isinstance(norm, FrozenBatchNorm2d)
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert list(norm.parameters()) == []


def test_fold_equals_convolution_then_frozen_norm():
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, bias=True)
    norm = FrozenBatchNorm2d(6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(6, generator=g) + 0.5)
        norm.bias.copy_(torch.randn(6, generator=g))
        norm.running_mean.copy_(torch.randn(6, generator=g))
        norm.running_var.copy_(torch.rand(6, generator=g) + 0.1)
    x = torch.randn(2, 4, 9, 7, generator=g)
    weight, bias = fold_norm_into_conv(norm.scale_and_shift(), conv.weight, conv.bias)
    torch.testing.assert_close(conv._conv_forward(x, weight, bias), norm(conv(x)), rtol=1e-5, atol=1e-5)


def test_fast_path_leaves_trainable_batch_norm_unfolded():
    model, _, _ = build_model(tiny_args("--backbone_norm", "batch"))
    enable_fast_path(model)
    assert not any(type(m) in (FoldedBasicBlock, FoldedLayerGetter) for m in model.modules())
    assert model.backbone[0].channels_last


def test_fast_model_scripts_and_matches_eager():
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_args("--no_aux_loss"))
    enable_fast_path(model).eval()
    x = nested_tensor_from_tensor_list([torch.randn(3, 64, 96)])  # a scripted DETR takes NestedTensors
    with torch.no_grad():
        expected = model(x)
        scripted = torch.jit.script(model)(x)
    torch.testing.assert_close(scripted["pred_boxes"], expected["pred_boxes"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_fast_dropout_drops_at_rate_p_and_scales_the_kept_elements(p):
    n = 1_000_003  # not a multiple of 4: the last 64-bit draw is used in part
    x = torch.ones(n, requires_grad=True)
    torch.manual_seed(0)
    y = fast_path.fast_dropout(x, p, True)
    dropped = (y == 0).double().mean().item()
    quantized = round(p * 65536) / 65536
    assert abs(dropped - quantized) < 5 * math.sqrt(p * (1 - p) / n), dropped
    assert torch.equal(y[y != 0].unique(), torch.tensor([1 / (1 - p)]))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient is the same mask, scaled
    torch.manual_seed(0)
    assert torch.equal(fast_path.fast_dropout(torch.ones(n), p, True), y)  # the default generator decides
    assert not torch.equal(fast_path.fast_dropout(torch.ones(n), p, True), y)
    # Halves of the mask are independent (no period within a tensor).
    first, second = (y[: n // 2] == 0).double(), (y[n // 2 : 2 * (n // 2)] == 0).double()
    assert abs((first * second).mean().item() - dropped**2) < 0.01
    half = fast_path.fast_dropout(torch.ones(8, dtype=torch.bfloat16), p, True)
    assert half.dtype == torch.bfloat16
    same = torch.randn(5)
    assert fast_path.fast_dropout(same, p, False) is same and fast_path.fast_dropout(same, 0.0, True) is same


@pytest.mark.parametrize("training", [False, True])
def test_fused_attention_is_multihead_attention_without_weights(training):
    """Without dropout, the fast path's attention computes what nn.MultiheadAttention computes when asked for no
    weights, bit for bit, from the same state_dict."""
    torch.manual_seed(0)
    attention = torch.nn.MultiheadAttention(32, 4, dropout=0.0)
    fused = copy.deepcopy(attention)
    fused.__class__ = FusedMultiheadAttention
    assert list(fused.state_dict()) == list(attention.state_dict())
    query, key, value = torch.randn(7, 2, 32), torch.randn(9, 2, 32), torch.randn(9, 2, 32)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, 6:] = True
    attention.train(training), fused.train(training)
    expected, _ = attention(query, key, value, key_padding_mask=padding, need_weights=False)
    got, weights = fused(query, key, value=value, key_padding_mask=padding)  # as the layers call it
    assert weights is None
    assert torch.equal(got, expected)
    assert not torch.equal(got, attention(query, key, value, key_padding_mask=padding)[0])  # the explicit path


def test_explicit_attention_fast_dropout_is_multihead_attention_with_other_dropout_masks(monkeypatch):
    """With its dropout made the identity, the fast path's training attention is nn.MultiheadAttention's."""
    torch.manual_seed(0)
    attention = torch.nn.MultiheadAttention(32, 4, dropout=0.1)
    query, key = torch.randn(7, 2, 32, requires_grad=True), torch.randn(9, 2, 32)
    value = torch.randn(9, 2, 32)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, 6:] = True
    attention.eval()
    expected = attention(query, key, value, key_padding_mask=padding)[0]
    monkeypatch.setattr(fast_path, "fast_dropout", lambda x, p, training: x)
    got = fast_path.explicit_attention_fast_dropout(
        query,
        key,
        value,
        padding,
        attention.in_proj_weight,
        attention.in_proj_bias,
        attention.out_proj.weight,
        attention.out_proj.bias,
        attention.num_heads,
        attention.dropout,
    )
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    (grad_expected,) = torch.autograd.grad(expected.square().sum(), query)
    (grad_got,) = torch.autograd.grad(got.square().sum(), query)
    torch.testing.assert_close(grad_got, grad_expected, rtol=1e-5, atol=1e-6)


def test_fast_path_trains_with_fast_dropout_in_the_transformer(monkeypatch):
    model, criterion, _ = build_model(tiny_args("--dropout", "0.1"))
    enable_fast_path(model)
    layers = [*model.transformer.encoder.layers, *model.transformer.decoder.layers]
    assert not any(type(m) is torch.nn.Dropout for layer in layers for m in layer.modules())
    assert all(m.p == 0.1 for layer in layers for m in layer.modules() if isinstance(m, fast_path.FastDropout))
    calls = []
    original = fast_path.explicit_attention_fast_dropout
    monkeypatch.setattr(fast_path, "explicit_attention_fast_dropout", lambda *a: calls.append(a[-1]) or original(*a))
    images, targets = inputs()
    model.train()
    losses = criterion(model(images), [{k: v for k, v in t.items() if k != "masks"} for t in targets])
    assert all(torch.isfinite(v) for v in losses.values())
    # The encoder's self-attention and the decoder's cross-attention, each with the layer's dropout.
    assert calls == [0.1] * (len(model.transformer.encoder.layers) + len(model.transformer.decoder.layers))
    calls.clear()
    model.eval()
    with torch.no_grad():
        model(images)
    assert calls == []  # evaluation: scaled_dot_product_attention, no dropout


def test_adamw_options_fused_on_the_fast_path_only():
    cpu = torch.device("cpu")
    assert adamw_options(cpu, exact=True) == {}
    options = adamw_options(cpu)
    assert options in ({}, {"fused": True})
    torch.optim.AdamW([torch.zeros(2, requires_grad=True)], **options)  # accepted where offered


# The synthetic datasets train their ResNet from scratch with trainable norms; the frozen ones fold.
FROZEN_NORMS = ("--backbone_norm", "frozen")


def used_model(monkeypatch, argv):
    """(the model main.py builds and runs for argv, the args it was built from); main runs in this process."""
    built = []

    def recording_build_model(args):
        result = build_model(args)
        built.append((result[0], copy.deepcopy(args)))
        return result

    monkeypatch.setattr(main_py, "build_model", recording_build_model)
    run_main(argv)
    return built[0]


@pytest.mark.slow
def test_exact_flag_gives_the_plain_build_bit_for_bit(monkeypatch, synthetic_root, tmp_path):
    used, args = used_model(monkeypatch, tiny_flags(synthetic_root, "", "--exact", "--eval", *FROZEN_NORMS))
    plain, criterion, _ = build_model(args)
    plain.load_state_dict(used.state_dict())
    assert not any(type(m) in (FoldedBasicBlock, FoldedLayerGetter) for m in used.modules())
    images, targets = inputs()
    outputs = []
    for model in (used, plain):
        model.train()
        out = model(images)
        loss_dict = criterion(out, [{k: v for k, v in t.items() if k != "masks"} for t in targets])
        sum(loss_dict[k] * criterion.weight_dict[k] for k in loss_dict if k in criterion.weight_dict).backward()
        outputs.append((out, [p.grad for p in model.parameters() if p.grad is not None]))
    assert torch.equal(outputs[0][0]["pred_logits"], outputs[1][0]["pred_logits"])
    assert torch.equal(outputs[0][0]["pred_boxes"], outputs[1][0]["pred_boxes"])
    assert all(torch.equal(a, b) for a, b in zip(outputs[0][1], outputs[1][1]))


@pytest.mark.slow
def test_main_runs_the_fast_path_with_fast(monkeypatch, synthetic_root):
    used, _ = used_model(monkeypatch, tiny_flags(synthetic_root, "", "--eval", "--fast", *FROZEN_NORMS))
    assert type(used.backbone[0].body) is FoldedLayerGetter
    assert used.backbone[0].channels_last
    assert all(type(layer.self_attn) is FusedMultiheadAttention for layer in used.transformer.encoder.layers)
    decoder = used.transformer.decoder.layers
    assert all(type(layer.multihead_attn) is FusedMultiheadAttention for layer in decoder)
    assert all(type(layer.self_attn) is torch.nn.MultiheadAttention for layer in decoder)


# ------------------------------------------------------------------------------------------------------ --compile


def test_compile_unavailable_falls_back_with_a_message(monkeypatch, capsys):
    monkeypatch.setattr(util.compile.shutil, "which", lambda name: None)
    model, _, _ = build_model(tiny_args())
    assert util.compile.enable_compile(model, torch.device("cpu")) is False
    assert "no C++ compiler" in capsys.readouterr().out
    assert util.compile.forward_function(model) is model


def test_compile_failure_falls_back_to_eager_with_a_message(monkeypatch, capsys):
    def failing_compile(model, **kwargs):
        def call(*args):
            raise torch._dynamo.exc.InternalTorchDynamoError("simulated failure")

        return call

    monkeypatch.setattr(util.compile.torch, "compile", failing_compile)
    monkeypatch.setattr(util.compile.shutil, "which", lambda name: "/usr/bin/g++")
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_args())
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        assert util.compile.enable_compile(model, torch.device("cpu"))
        out = engine.run_model(model, x, torch.device("cpu"))
    assert "torch.compile failed in the forward pass (InternalTorchDynamoError: simulated failure)" in (
        capsys.readouterr().out
    )
    assert util.compile.compile_record(model)["fallback"].startswith("torch.compile failed in the forward pass")
    assert torch.equal(out["pred_boxes"], expected["pred_boxes"])
    assert util.compile.forward_function(model) is model  # eager from now on


class SimulatedInductorError(RuntimeError):
    """An error as inductor raises it: its module is what tells a compile failure from the model's own."""


SimulatedInductorError.__module__ = "torch._inductor.exc"


def compile_with_failing_backward(error):
    """A stand-in for torch.compile whose twin computes the model's outputs eagerly, and whose backward raises
    `error` (as inductor's lazily compiled backward graph can), once."""

    class FailingBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            raise error

    def compile(model, **kwargs):
        def call(samples):
            out = model(samples)
            return dict(out, pred_boxes=FailingBackward.apply(out["pred_boxes"]))

        return call

    return compile


def training_batch():
    g = torch.Generator().manual_seed(0)
    samples = nested_tensor_from_tensor_list([torch.randn(3, 64, 64, generator=g), torch.randn(3, 56, 64, generator=g)])
    boxes = torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.6, 0.5, 0.4, 0.2]])
    return samples, [
        {"labels": torch.tensor([1, 3]), "boxes": boxes},
        {"labels": torch.tensor([2]), "boxes": boxes[:1]},
    ]


def test_a_compile_failure_in_backward_falls_back_and_takes_the_step_eagerly(monkeypatch, capsys):
    monkeypatch.setattr(util.compile.shutil, "which", lambda name: "/usr/bin/g++")
    error = SimulatedInductorError("simulated backward failure")
    monkeypatch.setattr(util.compile.torch, "compile", compile_with_failing_backward(error))
    cpu = torch.device("cpu")
    args = tiny_args()
    model, criterion, _, optimizer = tiny_detr_and_optimizer(args)
    eager, eager_criterion, _, eager_optimizer = tiny_detr_and_optimizer(args)
    assert util.compile.enable_compile(model, cpu)
    stats = engine.train_one_epoch(model, criterion, [training_batch()], optimizer, cpu, epoch=0, max_norm=0.1)
    expected = engine.train_one_epoch(eager, eager_criterion, [training_batch()], eager_optimizer, cpu, 0, 0.1)
    printed = capsys.readouterr().out
    assert (
        "--compile: torch.compile failed in the backward pass (SimulatedInductorError: simulated backward " in printed
    )
    assert util.compile.compile_record(model)["fallback"].startswith("torch.compile failed in the backward pass")
    assert util.compile.forward_function(model) is model  # eager from now on
    # The step was taken from the eager forward pass: the weights are those of a run never compiled.
    assert stats["loss"] == expected["loss"]
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert torch.equal(p, q), name


def test_the_models_own_error_in_backward_is_raised(monkeypatch):
    monkeypatch.setattr(util.compile.shutil, "which", lambda name: "/usr/bin/g++")
    monkeypatch.setattr(util.compile.torch, "compile", compile_with_failing_backward(ValueError("the model's own")))
    model, criterion, _, optimizer = tiny_detr_and_optimizer(tiny_args())
    assert util.compile.enable_compile(model, torch.device("cpu"))
    with pytest.raises(ValueError, match="the model's own"):
        engine.train_one_epoch(model, criterion, [training_batch()], optimizer, torch.device("cpu"), 0, 0.1)
    assert util.compile.compile_record(model)["fallback"] is None


def test_hitting_the_recompile_limit_is_said_and_recorded(monkeypatch, capsys):
    monkeypatch.setattr(util.compile.shutil, "which", lambda name: "/usr/bin/g++")
    monkeypatch.setattr(util.compile.torch, "compile", lambda model, **kwargs: lambda samples: model(samples))
    hits = iter([0, 1, 1, 1, 1, 3])  # dynamo's count before and after each call
    monkeypatch.setattr(util.compile, "compile_counts", lambda: {"recompile_limit_hits": next(hits)})
    model, _, _ = build_model(tiny_args())
    model.eval()
    cpu = torch.device("cpu")
    assert util.compile.enable_compile(model, cpu)
    with torch.no_grad():
        for _ in range(3):
            engine.run_model(model, torch.randn(1, 3, 64, 64), cpu)
    printed = capsys.readouterr().out
    assert printed.count("--compile: torch.compile reached its recompile limit") == 1  # said once
    assert util.compile.compile_record(model) == {"fallback": None, "recompile_limit_hits": 3}  # every hit recorded


def test_compile_counts_reads_dynamos_tallies(monkeypatch):
    from collections import Counter, defaultdict

    from torch._dynamo import convert_frame, utils

    counters = defaultdict(Counter)
    counters["frames"].update(total=5, ok=4)
    counters["unimplemented"].update({"Dynamo recompile limit exceeded ...": 2, "a graph break": 7})
    monkeypatch.setattr(utils, "counters", counters)
    monkeypatch.setattr(convert_frame, "FRAME_COMPILE_COUNTER", Counter({0: 4, 1: 1}))
    assert util.compile.compile_counts() == {
        "frames_compiled": 4,
        "frames_failed": 1,
        "recompiles": 3,
        "recompile_limit_hits": 2,
    }


@pytest.mark.slow
@pytest.mark.skipif(
    util.compile.compile_unavailable_reason(torch.device("cpu")) != "",
    reason=f"torch.compile cannot run here: {util.compile.compile_unavailable_reason(torch.device('cpu'))}",
)
def test_compiled_model_matches_eager_across_image_sizes():
    torch.manual_seed(0)
    # ResNet-18 ending after layer2 (stride 8): compiling costs in proportion to the graph, minutes on 2 cores.
    model, criterion, _ = build_model(tiny_args("--enc_layers", "1", "--dec_layers", "1", "--feature_stride", "8"))
    enable_fast_path(model).eval()
    eager = copy.deepcopy(model)
    cpu = torch.device("cpu")
    assert util.compile.enable_compile(model, cpu)
    with torch.no_grad():
        # Two sizes, one compilation (dynamic shapes), and a padded batch. All of 2 images: a batch of 1 would be
        # specialized and compiled again for the batch of 2.
        for images in (
            torch.randn(2, 3, 64, 96),
            torch.randn(2, 3, 96, 64),
            nested_tensor_from_tensor_list([torch.randn(3, 64, 64), torch.randn(3, 80, 48)]),
        ):
            out, expected = engine.run_model(model, images, cpu), eager(images)
            for key in ("pred_logits", "pred_boxes"):
                torch.testing.assert_close(out[key], expected[key], rtol=1e-4, atol=1e-4)
    assert getattr(model, "compile_forward", False), "compile fell back to eager"
    assert util.compile.compile_record(model) == {"fallback": None, "recompile_limit_hits": 0}
    # The state_dict keys stay those of the plain model (no _orig_mod prefix).
    assert list(model.state_dict()) == list(eager.state_dict())
