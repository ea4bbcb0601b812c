"""Tests of models/two_stage.py (--two_stage: decoder queries from the encoder's proposals) and of --feature_stride
(a backbone ending early)."""

import warnings

import pytest
import torch

import main as main_py
from helpers import MASK_HEAD_FLAGS, load_checkpoint_safely, run_main, tiny_args, tiny_flags, tiny_model
from models.backbone import Backbone
from models.detr import DETR, SetCriterion
from models.two_stage import (
    TwoStageCriterion,
    add_nearby_tokens,
    TwoStageDETR,
    inverse_sigmoid,
    match_to_nearest_anchor,
    select_distinct,
    token_anchors,
)
from util.box_ops import box_cxcywh_to_xyxy, box_iou
from util.checkpoint import architecture_differences
from util.misc import nested_tensor_from_tensor_list


def two_images():
    torch.manual_seed(1)
    return nested_tensor_from_tensor_list([torch.rand(3, 96, 128), torch.rand(3, 64, 96)])


def scripted_and_eager_outputs(model):
    """(TorchScript outputs, eager outputs) of `model` in eval mode on two_images()."""
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script's deprecation warning
        scripted = torch.jit.script(model)
    samples = two_images()
    with torch.no_grad():
        return scripted(samples), model(samples)


def test_token_anchors_are_cell_centres_of_the_unpadded_image():
    mask = torch.zeros(1, 2, 4, dtype=torch.bool)
    mask[0, :, 3] = True  # the last column is padding: the image is 3 cells wide
    anchors = token_anchors(mask, size=0.25)[0]
    assert anchors.shape == (8, 4)
    # Row-major cells: centres (x + 0.5) / 3 and (y + 0.5) / 2, so the padding column lies past 1.
    expected_cx = torch.tensor([0.5, 1.5, 2.5, 3.5] * 2) / 3
    expected_cy = torch.tensor([0.25] * 4 + [0.75] * 4)
    torch.testing.assert_close(anchors[:, 0], expected_cx)
    torch.testing.assert_close(anchors[:, 1], expected_cy)
    assert torch.equal(anchors[:, 2:], torch.full((8, 2), 0.25))


def test_inverse_sigmoid_inverts_sigmoid_and_stays_finite():
    x = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(inverse_sigmoid(x).sigmoid(), x)
    assert torch.isfinite(inverse_sigmoid(torch.tensor([0.0, 1.0, 3.0]))).all()


def test_objects_are_assigned_to_the_nearest_free_token():
    # A 2 x 2 grid of anchors at 0.25 / 0.75.
    anchors = token_anchors(torch.zeros(1, 2, 2, dtype=torch.bool))
    # Two objects centred in the top-left cell, one in the bottom-right cell.
    boxes = torch.tensor([[0.20, 0.20, 0.1, 0.1], [0.30, 0.26, 0.2, 0.2], [0.80, 0.70, 0.3, 0.3]])
    ((rows, cols),) = match_to_nearest_anchor(anchors, [{"boxes": boxes, "labels": torch.tensor([1, 2, 3])}])
    assigned = dict(zip(cols.tolist(), rows.tolist()))
    assert assigned[2] == 3  # bottom-right
    assert sorted([assigned[0], assigned[1]]) in ([0, 1], [0, 2])  # two distinct tokens, top-left one of them
    # The pair with the least total distance: object 1 (x 0.30) moves to the top-right cell, object 0 stays.
    assert assigned[0] == 0 and assigned[1] == 1
    # An image without objects gets no pair.
    ((rows, cols),) = match_to_nearest_anchor(anchors, [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}])
    assert rows.numel() == 0 and cols.numel() == 0


def test_nearby_tokens_inside_the_box_join_the_nearest_one():
    anchors = token_anchors(torch.zeros(1, 4, 4, dtype=torch.bool))  # cell centres 0.125, 0.375, 0.625, 0.875
    # A large box centred on a cell corner, a small one inside the bottom-right cell, a thin one spanning column 1.
    boxes = torch.tensor([[0.375, 0.375, 0.5, 0.5], [0.875, 0.875, 0.1, 0.1], [0.25, 0.875, 0.5, 0.05]])
    targets = [{"labels": torch.tensor([1, 2, 3]), "boxes": boxes}]
    first = match_to_nearest_anchor(anchors, targets)
    ((rows, cols),) = add_nearby_tokens(anchors, targets, first, radius=1.0)
    assigned = dict(zip(rows.tolist(), cols.tolist()))
    # The large box: the 3 x 3 cells whose centres lie within a cell of (0.375, 0.375), all inside it.
    assert sorted(r for r, c in assigned.items() if c == 0) == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    # The small box holds no other cell centre; the thin one only those of its row within a cell of its centre.
    assert [r for r, c in assigned.items() if c == 1] == [15]
    assert sorted(r for r, c in assigned.items() if c == 2) == [12, 13]
    # The first assignment is kept, and every token has one object.
    first_pairs = dict(zip(first[0][0].tolist(), first[0][1].tolist()))
    assert all(assigned[r] == c for r, c in first_pairs.items())
    assert len(assigned) == len(rows)
    # Radius 0 adds nothing.
    ((rows0, cols0),) = add_nearby_tokens(anchors, targets, first, radius=0.0)
    assert sorted(rows0.tolist()) == sorted(first[0][0].tolist())


def test_proposal_radius_box_terms_are_means_over_the_pairs():
    model, _, _ = tiny_model("--two_stage", "--num_classes", "4")
    out = model(two_images())
    targets = [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.4, 0.4], [0.7, 0.6, 0.3, 0.4]])},
        {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.6, 0.6]])},
    ]
    _, criterion, _ = tiny_model("--two_stage", "--num_classes", "4", "--proposal_radius", "1")
    losses = criterion(out, targets)
    indices = add_nearby_tokens(
        out["enc_outputs"]["anchors"], targets, match_to_nearest_anchor(out["enc_outputs"]["anchors"], targets), 1.0
    )
    pairs = sum(len(src) for src, _ in indices)
    assert pairs > 3  # the tiny model's map is coarse, but these boxes span more than a cell
    enc_boxes = torch.cat([out["enc_outputs"]["pred_boxes"][i, src] for i, (src, _) in enumerate(indices)])
    tgt_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)])
    # Summed over the pairs, divided by their number: the box terms weigh in the total as much as without the radius.
    torch.testing.assert_close(losses["loss_bbox_enc"], (enc_boxes - tgt_boxes).abs().sum() / pairs)
    with pytest.raises(ValueError, match="--proposal_radius"):
        tiny_model("--two_stage", "--proposal_radius", "-1")


def test_two_stage_outputs_and_state_dict():
    model, criterion, _ = tiny_model("--two_stage", "--num_classes", "4")
    # build_model plugs the extension in with --two_stage only.
    assert isinstance(model, TwoStageDETR) and isinstance(criterion, TwoStageCriterion)
    plain, plain_criterion, _ = tiny_model("--num_classes", "4")
    assert type(plain) is DETR and type(plain_criterion) is SetCriterion
    names = set(model.state_dict())
    assert "query_embed.weight" not in names
    assert {
        "enc_output.weight",
        "enc_output_norm.weight",
        "enc_class_embed.weight",
        "enc_bbox_embed.layers.2.weight",
    } <= names
    out = model(two_images())
    b, q = 2, 5
    assert out["pred_logits"].shape == (b, q, 5) and out["pred_boxes"].shape == (b, q, 4)
    h, w = 3, 4  # 96 x 128 at stride 32
    assert out["enc_outputs"]["pred_logits"].shape == (b, h * w, 5)
    assert out["enc_outputs"]["pred_boxes"].shape == (b, h * w, 4)
    assert len(out["aux_outputs"]) == 1
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()


def test_each_proposal_sees_its_3x3_neighbourhood_without_encoder_layers():
    """With --enc_layers 0 the memory is the projected feature map itself; changing one cell of it changes the
    proposals of that cell and its 8 neighbours, and no other."""
    model, _, _ = tiny_model("--two_stage", "--num_classes", "4", "--enc_layers", "0")
    model.eval()
    torch.manual_seed(2)
    src, pos = torch.randn(1, 32, 4, 5), torch.randn(1, 32, 4, 5)
    mask = torch.zeros(1, 4, 5, dtype=torch.bool)
    changed_src = src.clone()
    changed_src[0, :, 1, 1] += 1.0
    with torch.no_grad():
        hs, memory, _, logits, boxes, _, _ = model.forward_queries_from_encoder(src, mask, pos)
        _, changed_memory, _, changed_logits, changed_boxes, _, _ = model.forward_queries_from_encoder(
            changed_src, mask, pos
        )
    assert torch.equal(memory, src) and torch.equal(changed_memory, changed_src)
    assert hs.shape == (2, 1, 5, 32)
    differs = ((logits - changed_logits).abs().amax(-1) > 1e-6) | ((boxes - changed_boxes).abs().amax(-1) > 1e-6)
    expected = torch.zeros(4, 5, dtype=torch.bool)
    expected[0:3, 0:3] = True
    assert torch.equal(differs.reshape(4, 5), expected)


def test_decoder_starts_from_the_best_proposals():
    """At initialization the decoder's offsets are zero: its outputs are the top-scoring proposals of the
    unpadded cells, in score order."""
    model, _, _ = tiny_model("--two_stage", "--num_classes", "4")
    model.eval()
    samples = two_images()
    with torch.no_grad():
        out = model(samples)
    enc_logits, enc_boxes = out["enc_outputs"]["pred_logits"], out["enc_outputs"]["pred_boxes"]
    scores = enc_logits.softmax(-1)[..., :-1].max(-1)[0]
    # Image 1 is 64 x 96 in a 96 x 128 batch: at stride 32 its cells are the top-left 2 x 3 of 3 x 4.
    valid = torch.zeros(3, 4, dtype=torch.bool)
    valid[:2, :3] = True
    for i, cells in enumerate([torch.ones(3, 4, dtype=torch.bool), valid]):
        cell_scores = scores[i].masked_fill(~cells.flatten(), -1)
        top = cell_scores.topk(5).indices
        assert cells.flatten()[top].all()
        torch.testing.assert_close(out["pred_logits"][i], enc_logits[i, top])
        torch.testing.assert_close(out["pred_boxes"][i], enc_boxes[i, top])


def test_select_distinct_passes_over_overlapping_boxes():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5]])
    boxes = torch.tensor(
        [
            [
                [0.50, 0.5, 0.2, 0.2],  # kept
                [0.51, 0.5, 0.2, 0.2],  # IoU 0.9 with box 0: passed over
                [0.20, 0.2, 0.1, 0.1],  # kept
                [0.80, 0.8, 0.1, 0.1],  # kept
                [0.21, 0.2, 0.1, 0.1],
            ]
        ]
    )  # IoU 0.82 with box 2: passed over
    assert select_distinct(scores, boxes, 3, 0.5).tolist() == [[0, 2, 3]]
    # Fewer than k left: the passed-over ones follow, best first.
    assert select_distinct(scores, boxes, 5, 0.5).tolist() == [[0, 2, 3, 1, 4]]
    # A threshold above every overlap keeps the score order.
    assert select_distinct(scores, boxes, 5, 0.95).tolist() == [[0, 1, 2, 3, 4]]


def test_query_nms_applies_in_evaluation_only():
    """With --query_nms the queries of an eval-mode model are the distinct proposals (no two of the kept ones
    overlapping by more than the threshold); in training mode they stay the plain top scores."""
    model, _, _ = tiny_model("--two_stage", "--num_classes", "4", "--feature_stride", "16", "--query_nms", "0.1")
    samples = nested_tensor_from_tensor_list([torch.rand(3, 96, 128)])
    model.eval()
    with torch.no_grad():
        out = model(samples)
    enc_logits, enc_boxes = out["enc_outputs"]["pred_logits"], out["enc_outputs"]["pred_boxes"]
    scores = enc_logits.softmax(-1)[..., :-1].max(-1)[0]
    chosen = select_distinct(scores, enc_boxes, 5, 0.1)[0]
    assert not torch.equal(chosen, scores[0].topk(5).indices)  # the threshold made a difference here
    torch.testing.assert_close(out["pred_boxes"][0], enc_boxes[0, chosen])  # the decoder starts from them
    iou = box_iou(box_cxcywh_to_xyxy(out["pred_boxes"][0]), box_cxcywh_to_xyxy(out["pred_boxes"][0]))[0]
    assert (iou.triu(1) <= 0.1).all()
    model.train()
    with torch.no_grad():
        out = model(samples)
    top = out["enc_outputs"]["pred_logits"].softmax(-1)[0, :, :-1].max(-1)[0].topk(5).indices
    torch.testing.assert_close(out["pred_boxes"][0], out["enc_outputs"]["pred_boxes"][0, top])
    script, eager = scripted_and_eager_outputs(model)
    torch.testing.assert_close(script["pred_boxes"], eager["pred_boxes"], rtol=0, atol=0)


def test_proposal_radius_applies_query_nms_in_training_too():
    # Several tokens learn to propose each object: the training queries must be distinct too, as at evaluation.
    flags = ("--two_stage", "--num_classes", "4", "--feature_stride", "16", "--query_nms", "0.1")
    model, _, _ = tiny_model(*flags, "--proposal_radius", "1")
    assert model.query_nms_in_training and not tiny_model(*flags)[0].query_nms_in_training
    model.train()
    with torch.no_grad():
        out = model(nested_tensor_from_tensor_list([torch.rand(3, 96, 128)]))
    enc_logits, enc_boxes = out["enc_outputs"]["pred_logits"], out["enc_outputs"]["pred_boxes"]
    chosen = select_distinct(enc_logits.softmax(-1)[..., :-1].max(-1)[0], enc_boxes, 5, 0.1)[0]
    torch.testing.assert_close(out["pred_boxes"][0], enc_boxes[0, chosen])
    iou = box_iou(box_cxcywh_to_xyxy(out["pred_boxes"][0]), box_cxcywh_to_xyxy(out["pred_boxes"][0]))[0]
    assert (iou.triu(1) <= 0.1).all()


def test_criterion_supervises_the_proposals():
    model, criterion, _ = tiny_model("--two_stage", "--num_classes", "4")
    assert {"loss_ce_enc", "loss_bbox_enc", "loss_giou_enc"} <= set(criterion.weight_dict)
    out = model(two_images())
    targets = [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])},
        {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]
    losses = criterion(out, targets)
    # The proposal losses, recomputed by hand for the nearest-token assignment.
    indices = match_to_nearest_anchor(out["enc_outputs"]["anchors"], targets)
    enc_boxes = torch.cat([out["enc_outputs"]["pred_boxes"][i, src] for i, (src, _) in enumerate(indices)])
    tgt_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)])
    torch.testing.assert_close(losses["loss_bbox_enc"], (enc_boxes - tgt_boxes).abs().sum() / 3)
    target_classes = torch.full((2, 12), 4)
    for i, ((src, tgt), t) in enumerate(zip(indices, targets)):
        target_classes[i, src] = t["labels"][tgt]
    expected_ce = torch.nn.functional.cross_entropy(
        out["enc_outputs"]["pred_logits"].transpose(1, 2), target_classes, criterion.empty_weight
    )
    torch.testing.assert_close(losses["loss_ce_enc"], expected_ce)
    # The proposal loss alone reaches the backbone.
    model.zero_grad()
    losses["loss_giou_enc"].backward()
    assert model.backbone[0].body.layer4[1].conv2.weight.grad.abs().sum() > 0


def test_two_stage_torchscript_equals_eager():
    model, _, _ = tiny_model("--two_stage", "--num_classes", "4")
    script, eager = scripted_and_eager_outputs(model)
    torch.testing.assert_close(script["pred_logits"], eager["pred_logits"], rtol=0, atol=0)
    torch.testing.assert_close(script["pred_boxes"], eager["pred_boxes"], rtol=0, atol=0)


@pytest.mark.parametrize("stride,layers,channels", [(8, 2, 128), (16, 3, 256), (32, 4, 512)])
def test_feature_stride_ends_the_backbone_early(stride, layers, channels):
    backbone = Backbone("resnet18", True, False, False, norm="batch", stride=stride)
    out = backbone(two_images())
    (feature,) = out.values()
    assert feature.tensors.shape == (2, channels, 96 // stride, 128 // stride)
    assert backbone.num_channels == channels
    stages = {name.split(".")[1] for name in backbone.state_dict() if name.startswith("body.layer")}
    assert stages == {f"layer{i}" for i in range(1, layers + 1)}


def test_feature_stride_bad_values_are_clear_errors():
    with pytest.raises(ValueError, match="--feature_stride"):
        Backbone("resnet18", True, False, False, stride=4)
    with pytest.raises(ValueError, match="--dilation"):
        Backbone("resnet50", True, False, True, stride=16)
    with pytest.raises(SystemExit):
        main_py.get_args_parser().parse_args(["--feature_stride", "4"])


def test_mask_head_on_a_stride_8_backbone():
    """With the backbone ending at layer2, the mask head reads layer1 for all three FPN levels and still
    predicts masks at a quarter of the image size."""
    model, criterion, _ = tiny_model(
        "--two_stage", "--feature_stride", "8", "--masks", "--num_classes", "4", *MASK_HEAD_FLAGS
    )  # the mask head's group norms
    assert model.mask_head.adapter1.in_channels == 64 and model.mask_head.adapter3.in_channels == 64
    out = model(two_images())
    assert out["pred_masks"].shape == (2, 5, 24, 32)
    targets = [
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2]]), "masks": torch.zeros(1, 96, 128)}
        for _ in range(2)
    ]
    losses = criterion(out, targets)
    assert torch.isfinite(losses["loss_mask"]) and torch.isfinite(losses["loss_dice"])
    script, eager = scripted_and_eager_outputs(model)
    torch.testing.assert_close(script["pred_masks"], eager["pred_masks"], rtol=0, atol=0)


def test_resuming_with_another_query_scheme_is_refused():
    saved = tiny_args("--two_stage", "--feature_stride", "8")
    differences = architecture_differences(saved, tiny_args())
    assert differences == [
        "--feature_stride: checkpoint 8, this run 32",
        "--two_stage: checkpoint True, this run False",
    ]


def test_main_trains_and_evaluates_a_two_stage_model(synthetic_root, tmp_path):
    from models import build_model
    from util.plot_utils import read_log

    out = tmp_path / "out"
    run_main(tiny_flags(synthetic_root, out, "--epochs", "1", "--two_stage", "--feature_stride", "8"))
    (row,) = read_log(out / "log.txt")
    for name in ("loss_ce_enc", "loss_bbox_enc", "loss_giou_enc"):
        assert row[f"train_{name}"] > 0 and row[f"test_{name}"] > 0
    assert len(row["test_coco_eval_bbox"]) == 12 and all(v >= -1 for v in row["test_coco_eval_bbox"])
    checkpoint = load_checkpoint_safely(out / "checkpoint.pth")
    args = checkpoint["args"]
    assert args.two_stage and args.feature_stride == 8
    model, _, _ = build_model(args)
    model.load_state_dict(checkpoint["model"], strict=True)
    assert not any(k.startswith("backbone.0.body.layer3") for k in checkpoint["model"])


def test_learned_queries_follow_the_proposals():
    """--learned_queries 2 of 5: the first 3 queries are the best proposals, the last 2 learned embeddings that
    start (zero offsets) from a centred box of half the image side and uniform class scores."""
    model, _, _ = tiny_model("--two_stage", "--num_classes", "4", "--learned_queries", "2")
    assert model.state_dict()["query_embed.weight"].shape == (2, model.transformer.d_model)
    model.eval()
    with torch.no_grad():
        out = model(two_images())
    assert out["pred_logits"].shape == (2, 5, 5) and out["pred_boxes"].shape == (2, 5, 4)
    enc_logits, enc_boxes = out["enc_outputs"]["pred_logits"], out["enc_outputs"]["pred_boxes"]
    top = enc_logits[0].softmax(-1)[:, :-1].max(-1)[0].topk(3).indices
    torch.testing.assert_close(out["pred_boxes"][0, :3], enc_boxes[0, top])
    torch.testing.assert_close(out["pred_logits"][0, :3], enc_logits[0, top])
    assert torch.equal(out["pred_boxes"][:, 3:], torch.full((2, 2, 4), 0.5))
    assert torch.equal(out["pred_logits"][:, 3:], torch.zeros(2, 2, 5))
    # Once trained, the learned queries' outputs depend on their embeddings.
    with torch.no_grad():
        model.bbox_embed.layers[-1].weight.normal_()
        before = model(two_images())["pred_boxes"][:, 3:]
        model.query_embed.weight.add_(1.0)
        after = model(two_images())["pred_boxes"][:, 3:]
    assert not torch.allclose(before, after)
    script, eager = scripted_and_eager_outputs(model)
    torch.testing.assert_close(script["pred_boxes"], eager["pred_boxes"], rtol=0, atol=0)
    torch.testing.assert_close(script["pred_logits"], eager["pred_logits"], rtol=0, atol=0)


def test_proposals_learn_only_the_proposal_classes():
    """With learned queries on panoptic data, the proposal losses ignore the stuff targets: they equal those of
    an unrestricted criterion given the thing targets only, while the decoder's losses still see every target."""
    from models import build_model

    args = tiny_args("--two_stage", "--num_classes", "4", "--learned_queries", "2")
    args.thing_classes = [1, 2]
    torch.manual_seed(0)
    model, criterion, _ = build_model(args)
    assert criterion.proposal_classes == [1, 2]
    plain = TwoStageCriterion(4, criterion.matcher, criterion.weight_dict, criterion.eos_coef, criterion.losses)
    out = model(two_images())
    targets = [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.5, 0.8, 1.0, 0.4]])},
        {"labels": torch.tensor([4, 2]), "boxes": torch.tensor([[0.5, 0.2, 1.0, 0.4], [0.5, 0.5, 0.4, 0.4]])},
    ]
    things = [
        {
            "labels": t["labels"][:1] if i == 0 else t["labels"][1:],
            "boxes": t["boxes"][:1] if i == 0 else t["boxes"][1:],
        }
        for i, t in enumerate(targets)
    ]
    restricted, unrestricted, by_hand = criterion(out, targets), plain(out, targets), plain(out, things)
    for name in ("loss_ce_enc", "loss_bbox_enc", "loss_giou_enc"):
        # The box losses are divided by the number of all targets (4), by_hand's by that of the things (2).
        scale = 0.5 if name != "loss_ce_enc" else 1.0
        torch.testing.assert_close(restricted[name], by_hand[name] * scale)
        assert not torch.allclose(restricted[name], unrestricted[name])
    for name in ("loss_ce", "loss_bbox", "loss_giou"):
        torch.testing.assert_close(restricted[name], unrestricted[name])
    # Without learned queries every class is proposed, as before.
    args.learned_queries = 0
    assert build_model(args)[1].proposal_classes is None


def test_learned_queries_bad_values_are_clear_errors():
    for flags, message in (
        (["--learned_queries", "2"], "needs --two_stage"),
        (["--two_stage", "--learned_queries", "5"], r"\[0, --num_queries - 1\] = \[0, 4\]"),
    ):
        with pytest.raises(SystemExit, match=message):
            main_py.check_args(tiny_args(*flags))
    with pytest.raises(ValueError, match="needs --two_stage"):
        tiny_model("--learned_queries", "1")  # build_model refuses it too
    saved = tiny_args("--two_stage", "--learned_queries", "2")
    assert architecture_differences(saved, tiny_args("--two_stage")) == ["--learned_queries: checkpoint 2, this run 0"]


def test_mask_attention_of_proposals_sees_their_states_and_positions():
    """In a two-stage DETRsegm the attention maps are computed from the decoder state plus the query's input (the
    proposal's token state and position; the embedding for a learned query), over the memory plus its positions."""
    flags = [
        "--two_stage",
        "--feature_stride",
        "8",
        "--masks",
        "--num_classes",
        "4",
        *MASK_HEAD_FLAGS,
        "--learned_queries",
        "2",
    ]
    model, _, _ = tiny_model(*flags, "--mask_attention_gain", "50")
    model.eval()
    seen = {}
    hook = model.bbox_attention.register_forward_hook(
        lambda module, inputs, output: seen.update(q=inputs[0], k=inputs[1])
    )
    samples = two_images()
    with torch.no_grad():
        model(samples)
        features, pos = model.detr.backbone(samples)
        src, mask = features[-1].decompose()
        _, hs, memory, queries = model.detr.predict(model.detr.input_proj(src), mask, pos[-1])
    torch.testing.assert_close(seen["q"], hs[-1] + queries)
    torch.testing.assert_close(seen["k"], memory + pos[-1])
    hook.remove()  # TorchScript cannot compile it
    # The learned queries' input is their embedding (no content), the proposals' their token state + position.
    torch.testing.assert_close(queries[:, 3:], model.detr.query_embed.weight.expand(2, -1, -1))
    assert (queries[0, :3] - queries[0, :3].mean(0)).abs().max() > 0.1
    # --mask_attention_gain reaches the mask head.
    torch.manual_seed(0)
    plain, _, _ = tiny_model(*flags)
    ratio = model.mask_head.lay1.weight[:, 128:] / plain.mask_head.lay1.weight[:, 128:]
    torch.testing.assert_close(ratio, torch.full_like(ratio, 50.0))
    assert plain.mask_head.lay1.weight[:, 128:].abs().max() < 1  # gain 1: the original's initialization
    script, eager = scripted_and_eager_outputs(model)
    for key in ("pred_logits", "pred_boxes", "pred_masks"):
        torch.testing.assert_close(script[key], eager[key], rtol=0, atol=0)


def test_panoptic_threshold_reaches_the_post_processor():
    from models import build_model

    args = tiny_args("--masks", *MASK_HEAD_FLAGS, "--num_classes", "4")
    args.thing_classes = [1, 2]
    assert build_model(args)[2]["panoptic"].threshold == 0.85  # the original's
    args.panoptic_threshold = 0.6
    postprocessor = build_model(args)[2]["panoptic"]
    assert postprocessor.threshold == 0.6 and postprocessor.is_thing_map[2] and not postprocessor.is_thing_map[3]
