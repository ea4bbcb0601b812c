"""Tests of models/detr.py: DETR's inputs and outputs, SetCriterion's loss values, PostProcess, MLP; and build_model."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import util.misc as utils
from helpers import MASK_HEAD_FLAGS, tiny_args, tiny_model
from models.detr import DETR, MLP, PostProcess, SetCriterion
from models.matcher import HungarianMatcher
from util.misc import NestedTensor


@pytest.fixture(scope="module")
def tiny():
    """(model, criterion, postprocessors): the tiny configuration with aux loss, 2 decoder layers."""
    return tiny_model()


def rand_images(*sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


# ---------------------------------------------------------------------------------------------- forward


def test_outputs(tiny):
    model, _, _ = tiny
    model.eval()
    with torch.no_grad():
        out = model(rand_images((64, 64), (64, 96)))
    assert set(out) == {"pred_logits", "pred_boxes", "aux_outputs"}
    assert out["pred_logits"].shape == (2, 5, 92)  # 91 COCO classes + no-object
    assert out["pred_boxes"].shape == (2, 5, 4)
    assert bool((out["pred_boxes"] > 0).all()) and bool((out["pred_boxes"] < 1).all())  # sigmoid
    assert len(out["aux_outputs"]) == 1  # dec_layers - 1
    assert out["aux_outputs"][0]["pred_logits"].shape == (2, 5, 92)


def test_aux_outputs_are_the_heads_on_each_decoder_layer(tiny):
    # Aux output i is what the same model would predict with its decoder cut after layer i (same final norm).
    model, _, _ = tiny
    model.eval()
    images = rand_images((64, 64), (64, 96))
    with torch.no_grad():
        out = model(images)
        cut = copy.deepcopy(model)
        cut.transformer.decoder.layers = cut.transformer.decoder.layers[:1]
        cut.transformer.decoder.num_layers = 1
        cut.aux_loss = False
        first = cut(images)
    torch.testing.assert_close(out["aux_outputs"][0]["pred_logits"], first["pred_logits"])
    torch.testing.assert_close(out["aux_outputs"][0]["pred_boxes"], first["pred_boxes"])


def test_input_forms_agree(tiny):
    model, _, _ = tiny
    model.eval()
    images = rand_images((64, 80), (64, 80))
    batch = torch.stack(images)
    with torch.no_grad():
        from_tensor = model(batch)
        from_list = model(images)
        from_nested = model(NestedTensor(batch, torch.zeros(2, 64, 80, dtype=torch.bool)))
        from_single = model(images[1])  # one [3, H, W] image
    for k in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(from_list[k], from_tensor[k])
        torch.testing.assert_close(from_nested[k], from_tensor[k])
        torch.testing.assert_close(from_single[k], from_tensor[k][1:], rtol=1e-5, atol=1e-5)


def test_padding_is_handled_through_the_mask(tiny):
    # An image batched with a larger one is zero-padded and masked; that must be exactly what the model sees, so
    # running it alone, padded by hand to the same size with the same mask, gives the same predictions.
    model, _, _ = tiny
    model.eval()
    small, large = rand_images((64, 64), (96, 80), seed=1)
    padded = torch.zeros(1, 3, 96, 80)
    padded[0, :, :64, :64] = small
    mask = torch.ones(1, 96, 80, dtype=torch.bool)
    mask[0, :64, :64] = False
    with torch.no_grad():
        batched = model([small, large])
        alone = model(NestedTensor(padded, mask))
        unmasked = model(NestedTensor(padded, torch.zeros_like(mask)))
    for k in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(batched[k][:1], alone[k], rtol=1e-5, atol=1e-5)
    # The mask matters: ignoring it changes the predictions.
    assert not torch.allclose(unmasked["pred_logits"], alone["pred_logits"], atol=1e-4)


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (torch.rand(64, 64), ValueError, r"\[B, 3, H, W\]"),
        (torch.rand(1, 1, 3, 64, 64), ValueError, r"\[B, 3, H, W\]"),
        (torch.rand(2, 1, 64, 64), ValueError, "3 channels, got 1"),
        (torch.rand(1, 4, 64, 64), ValueError, "3 channels, got 4"),
        (torch.rand(4, 64, 64), ValueError, "3 channels, got 4"),
        ([torch.rand(3, 64, 64), torch.rand(64, 64)], ValueError, r"\[3, H, W\]"),
        ([torch.rand(1, 64, 64)], ValueError, "3 channels, got 1"),
        ("image.jpg", TypeError, "NestedTensor, a tensor or a list"),
    ],
)
def test_bad_inputs_raise_clear_errors(tiny, bad, error, message):
    model, _, _ = tiny
    with pytest.raises(error, match=message):
        model(bad)


def on_bfloat16_grid(x):
    return torch.equal(x, x.bfloat16().float())


def within(actual, expected, rel=1e-6, floor=1e-6):
    """Elementwise |actual - expected| <= rel * |expected| + floor."""
    return bool(((actual - expected).abs() <= rel * expected.abs() + floor).all())


def test_under_bfloat16_autocast_the_heads_compute_in_float32_from_the_decoder_states(tiny):
    model, _, _ = tiny
    model.eval()
    images = rand_images((64, 64), (64, 96))
    states = []
    hook = model.transformer.decoder.register_forward_hook(lambda m, i, out: states.append(out.transpose(1, 2)))
    try:
        with torch.no_grad():
            full = model(images)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                half = model(images)
                rounded = {"pred_logits": model.class_embed(states[1]), "pred_boxes": model.bbox_embed(states[1])}
            # The float32 heads on the decoder's own bfloat16 states: all the rounding the outputs may carry.
            logits, boxes = model.output_heads(states[1].float())
    finally:
        hook.remove()
    # The decoder ran under autocast: its states carry bfloat16 rounding (their residual sums stay float32 here).
    assert not torch.equal(states[1], states[0])
    expected = {"pred_logits": logits[-1], "pred_boxes": boxes[-1].sigmoid()}
    for key, value in expected.items():
        assert half[key].dtype == torch.float32, key
        assert not on_bfloat16_grid(half[key]), key
        assert on_bfloat16_grid(rounded[key].float()), key  # what the heads gave in bfloat16
        assert within(half[key], value), key
        assert within(half["aux_outputs"][0][key], (logits[0] if key == "pred_logits" else boxes[0].sigmoid())), key
        # So the outputs differ from the fp32 model's by what the states' rounding makes of them, and no more.
        assert (half[key] - full[key]).abs().max() <= (value - full[key]).abs().max() * (1 + 1e-5) + 1e-6, key
    # Without autocast the heads are the plain modules, bit for bit.
    with torch.no_grad():
        plain_logits, plain_boxes = model.output_heads(states[0])
    assert torch.equal(plain_logits[-1], full["pred_logits"]) and torch.equal(
        plain_boxes[-1].sigmoid(), full["pred_boxes"]
    )


def predictions(outputs, path=""):
    """{path: tensor} of every pred_logits, pred_boxes and pred_masks in a model's nested outputs."""
    found = {}
    items = outputs.items() if isinstance(outputs, dict) else enumerate(outputs)
    for key, value in items:
        if torch.is_tensor(value):
            if key in ("pred_logits", "pred_boxes", "pred_masks"):
                found[f"{path}{key}"] = value
        elif isinstance(value, (dict, list)):
            found.update(predictions(value, f"{path}{key}."))
    return found


@pytest.mark.parametrize(
    "flags",
    [
        ("--two_stage",),
        ("--masks", *MASK_HEAD_FLAGS),
        ("--dn_groups", "2", "--dense_aux", "layer3", "--num_classes", "5"),
    ],
    ids=["two_stage", "masks", "train_only"],
)
def test_every_head_gives_float32_off_the_bfloat16_grid_under_autocast(flags):
    model, _, _ = tiny_model(*flags)
    images = rand_images((64, 64), (64, 96))
    targets = [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.6, 0.5, 0.4, 0.2]])}
    ] * 2
    model.train()  # the training-only query sets exist in training mode only
    with torch.no_grad(), utils.training_targets(model, targets), torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = predictions(model(images))
    expected = {"pred_logits", "pred_boxes", "aux_outputs.0.pred_logits", "aux_outputs.0.pred_boxes"}
    expected |= {
        "--two_stage": {"enc_outputs.pred_logits", "enc_outputs.pred_boxes"},
        "--masks": {"pred_masks"},
        "--dn_groups": {"train_only.dn.pred_boxes", "train_only.dense.pred_boxes", "train_only.dense.pred_logits"},
    }[flags[0]]
    assert expected <= set(outputs)
    for path, value in outputs.items():
        assert value.dtype == torch.float32 and not on_bfloat16_grid(value), path


# ---------------------------------------------------------------------------------------------- SetCriterion


class FixedMatcher(torch.nn.Module):
    """Returns the given indices, so the losses are checked apart from the matching."""

    def __init__(self, indices):
        super().__init__()
        self.indices = indices

    def forward(self, outputs, targets):
        return self.indices


def hand_case():
    # 3 classes (0, 1, 2) + no-object (3); 2 images, 3 queries each.
    logits = torch.tensor(
        [
            [
                [2.0, 0.5, -1.0, 0.0],  # argmax 0
                [0.1, 0.2, 2.3, 1.5],  # argmax 2
                [-0.5, 1.0, 0.0, 0.2],
            ],  # argmax 1, matched to label 1: right
            [
                [0.0, 0.0, 3.0, 0.5],  # argmax 2, matched to label 2: right
                [1.0, -1.0, 0.5, 1.2],  # argmax 3 (no-object), matched to label 0: wrong
                [0.3, 0.2, 0.1, 0.9],
            ],
        ]
    )  # argmax 3
    boxes = torch.tensor(
        [
            [[0.2, 0.2, 0.1, 0.1], [0.6, 0.6, 0.2, 0.2], [0.45, 0.55, 0.3, 0.2]],
            [[0.3, 0.5, 0.2, 0.2], [0.6, 0.6, 0.4, 0.2], [0.5, 0.5, 0.5, 0.5]],
        ]
    )
    targets = [
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])},
        {"labels": torch.tensor([2, 0]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.4], [0.7, 0.6, 0.3, 0.2]])},
    ]
    indices = [(torch.tensor([2]), torch.tensor([0])), (torch.tensor([0, 1]), torch.tensor([0, 1]))]
    return {"pred_logits": logits, "pred_boxes": boxes}, targets, indices


def giou_by_hand(a, b):
    """GIoU of two (cx, cy, w, h) boxes, from the definition."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def test_set_criterion_hand_computed_losses():
    outputs, targets, indices = hand_case()
    eos = 0.1
    criterion = SetCriterion(
        3, FixedMatcher(indices), weight_dict={}, eos_coef=eos, losses=["labels", "boxes", "cardinality"]
    )
    losses = criterion(outputs, targets)
    assert set(losses) == {"loss_ce", "class_error", "loss_bbox", "loss_giou", "cardinality_error"}

    # Weighted cross-entropy: unmatched queries target no-object (class 3) with weight eos; the mean is
    # weighted too, i.e. divided by the sum of the weights.
    target_class = [[3, 3, 1], [2, 0, 3]]
    num, den = 0.0, 0.0
    for b in range(2):
        for q in range(3):
            row = outputs["pred_logits"][b, q].tolist()
            log_p = row[target_class[b][q]] - math.log(sum(math.exp(v) for v in row))
            w = eos if target_class[b][q] == 3 else 1.0
            num += -w * log_p
            den += w
    assert losses["loss_ce"].item() == pytest.approx(num / den, rel=1e-6)

    # Boxes: sums over the 3 matched pairs, divided by the number of target boxes (3).
    pairs = [
        (outputs["pred_boxes"][0, 2].tolist(), targets[0]["boxes"][0].tolist()),
        (outputs["pred_boxes"][1, 0].tolist(), targets[1]["boxes"][0].tolist()),
        (outputs["pred_boxes"][1, 1].tolist(), targets[1]["boxes"][1].tolist()),
    ]
    l1 = sum(abs(p - t) for pred, tgt in pairs for p, t in zip(pred, tgt)) / 3
    giou = sum(1 - giou_by_hand(pred, tgt) for pred, tgt in pairs) / 3
    assert losses["loss_bbox"].item() == pytest.approx(l1, rel=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(giou, rel=1e-6)

    # Of the 3 matched queries, one predicts the wrong class: 33.3% error.
    assert losses["class_error"].item() == pytest.approx(100 / 3, rel=1e-5)
    # Image 0 predicts 3 objects for 1 target, image 1 predicts 1 for 2: mean |difference| = (2 + 1) / 2.
    assert losses["cardinality_error"].item() == pytest.approx(1.5)


def test_set_criterion_matches_independent_functional_losses():
    # The same case with torch's own functions for cross-entropy and torchvision's GIoU.
    import torchvision

    outputs, targets, indices = hand_case()
    weight = torch.tensor([1.0, 1.0, 1.0, 0.25])
    criterion = SetCriterion(3, FixedMatcher(indices), weight_dict={}, eos_coef=0.25, losses=["labels", "boxes"])
    assert torch.equal(criterion.empty_weight, weight)
    losses = criterion(outputs, targets)
    target_class = torch.tensor([[3, 3, 1], [2, 0, 3]])
    expected_ce = F.cross_entropy(outputs["pred_logits"].reshape(-1, 4), target_class.flatten(), weight=weight)
    torch.testing.assert_close(losses["loss_ce"], expected_ce)
    src = torch.stack([outputs["pred_boxes"][0, 2], outputs["pred_boxes"][1, 0], outputs["pred_boxes"][1, 1]])
    tgt = torch.cat([targets[0]["boxes"], targets[1]["boxes"]])
    xyxy = torchvision.ops.box_convert
    giou = torchvision.ops.generalized_box_iou(xyxy(src, "cxcywh", "xyxy"), xyxy(tgt, "cxcywh", "xyxy")).diag()
    torch.testing.assert_close(losses["loss_giou"], (1 - giou).sum() / 3)


def test_aux_losses_have_suffixes_and_equal_the_per_layer_losses():
    g = torch.Generator().manual_seed(0)

    def layer_outputs():
        return {
            "pred_logits": torch.randn(2, 4, 6, generator=g),
            "pred_boxes": torch.rand(2, 4, 4, generator=g) * 0.5 + 0.2,
        }

    targets = [
        {"labels": torch.tensor([1, 4]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]])},
        {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]
    outputs = layer_outputs()
    outputs["aux_outputs"] = [layer_outputs(), layer_outputs()]  # 3 decoder layers
    criterion = SetCriterion(
        5, HungarianMatcher(1, 5, 2), weight_dict={}, eos_coef=0.1, losses=["labels", "boxes", "cardinality"]
    )
    losses = criterion(outputs, targets)
    base = {"loss_ce", "loss_bbox", "loss_giou", "cardinality_error"}
    # class_error is logged for the last layer only.
    assert set(losses) == base | {"class_error"} | {f"{k}_{i}" for k in base for i in (0, 1)}
    for i, aux in enumerate(outputs["aux_outputs"]):
        alone = criterion(aux, targets)  # each layer is matched on its own
        for k in base:
            torch.testing.assert_close(losses[f"{k}_{i}"], alone[k])


def test_unknown_loss_name_is_rejected():
    outputs, targets, indices = hand_case()
    criterion = SetCriterion(3, FixedMatcher(indices), weight_dict={}, eos_coef=0.1, losses=["labels", "box"])
    with pytest.raises(ValueError, match="'box'"):
        criterion(outputs, targets)


def no_objects():
    return {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}


@pytest.mark.parametrize("case", ["one image empty", "all images empty"])
def test_training_on_images_without_objects(tiny, case):
    model, criterion, _ = tiny
    model.train()
    one = {"labels": torch.tensor([3]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4]])}
    targets = [one, no_objects()] if case == "one image empty" else [no_objects(), no_objects()]
    model.zero_grad()
    out = model(rand_images((64, 64), (64, 64)))
    losses = criterion(out, targets)
    total = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
    assert all(torch.isfinite(v).all() for v in losses.values()), losses
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    if case == "all images empty":
        # Nothing to match: no box loss, and every query is pushed towards no-object.
        assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou"].item() == 0.0
        logits = out["pred_logits"].detach()
        expected = F.cross_entropy(logits.flatten(0, 1), torch.full((10,), 91))
        torch.testing.assert_close(losses["loss_ce"].detach(), expected)
        assert losses["cardinality_error"].item() == (logits.argmax(-1) != 91).sum().item() / 2


# ---------------------------------------------------------------------------------------------- PostProcess


def test_postprocess_hand_computed():
    logits = torch.tensor(
        [
            [
                [1.0, 2.0, 0.0, 3.0],  # no-object (last) is likeliest, but it is dropped
                [0.0, 0.0, 4.0, 0.0],
            ]
        ]
    )
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5]]])
    (result,) = PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]))
    z0 = math.exp(1) + math.exp(2) + math.exp(0) + math.exp(3)
    z1 = 3 + math.exp(4)
    assert result["labels"].tolist() == [1, 2]
    torch.testing.assert_close(result["scores"], torch.tensor([math.exp(2) / z0, math.exp(4) / z1]))
    # (h, w) = (100, 200): x scales by 200, y by 100; cxcywh -> xyxy.
    torch.testing.assert_close(result["boxes"], torch.tensor([[80.0, 30.0, 120.0, 70.0], [0.0, 50.0, 100.0, 100.0]]))


def test_postprocess_scales_each_image_by_its_own_size():
    boxes = torch.tensor([[[0.5, 0.5, 1.0, 1.0]], [[0.5, 0.5, 1.0, 1.0]]])
    outputs = {"pred_logits": torch.zeros(2, 1, 3), "pred_boxes": boxes}
    results = PostProcess()(outputs, torch.tensor([[480, 640], [300, 200]]))
    torch.testing.assert_close(results[0]["boxes"], torch.tensor([[0.0, 0.0, 640.0, 480.0]]))
    torch.testing.assert_close(results[1]["boxes"], torch.tensor([[0.0, 0.0, 200.0, 300.0]]))
    with pytest.raises(ValueError, match="target_sizes"):
        PostProcess()(outputs, torch.tensor([[480, 640]]))
    with pytest.raises(ValueError, match="target_sizes"):
        PostProcess()(outputs, torch.tensor([[480, 640, 3], [1, 2, 3]]))


# ---------------------------------------------------------------------------------------------- MLP and build


def test_mlp_is_linear_relu_chain():
    torch.manual_seed(0)
    mlp = MLP(6, 8, 4, 3)
    assert [(layer.in_features, layer.out_features) for layer in mlp.layers] == [(6, 8), (8, 8), (8, 4)]
    x = torch.randn(5, 6)
    a, b, c = mlp.layers
    expected = c(F.relu(b(F.relu(a(x)))))  # no activation after the last layer
    torch.testing.assert_close(mlp(x), expected)


def test_build_from_flags():
    model, criterion, post = tiny_model(
        "--dec_layers", "3", "--num_classes", "7", "--eos_coef", "0.2", "--bbox_loss_coef", "4", "--giou_loss_coef", "3"
    )
    assert isinstance(model, DETR) and model.aux_loss and model.num_queries == 5
    assert model.class_embed.out_features == 8 and criterion.num_classes == 7
    assert criterion.empty_weight[-1].item() == pytest.approx(0.2) and criterion.empty_weight[:-1].eq(1).all()
    expected = {"loss_ce": 1, "loss_bbox": 4, "loss_giou": 3}
    for i in (0, 1):
        expected.update({"loss_ce_%d" % i: 1, "loss_bbox_%d" % i: 4, "loss_giou_%d" % i: 3})
    assert criterion.weight_dict == expected
    assert sorted(criterion.losses) == ["boxes", "cardinality", "labels"]
    assert list(post) == ["bbox"] and isinstance(post["bbox"], PostProcess)
    # Defaults: 91 COCO classes, aux loss on; --no_aux_loss turns it off everywhere.
    model, criterion, _ = tiny_model("--no_aux_loss")
    assert model.class_embed.out_features == 92 and not model.aux_loss
    assert set(criterion.weight_dict) == {"loss_ce", "loss_bbox", "loss_giou"}
    assert tiny_args().num_classes is None
