"""Tests of models/segmentation.py: mask losses, attention maps, mask head, DETRsegm and post-processors."""

import argparse
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import MASK_HEAD_SIZES, SPEC_DIR, TINY_SIZES
from models.backbone import Backbone, Joiner
from models.detr import DETR
from models.position_encoding import PositionEmbeddingSine
from models.segmentation import (
    DETRsegm,
    MaskHeadSmallConv,
    MHAttentionMap,
    PostProcessPanoptic,
    PostProcessSegm,
    dice_loss,
    rgb2id,
    sigmoid_focal_loss,
)
from models.transformer import Transformer
from util.checkpoint import safe_globals
from util.misc import nested_tensor_from_tensor_list

LN3 = math.log(3.0)  # sigmoid(LN3) = 0.75


def make_detr(
    backbone="resnet18",
    hidden_dim=MASK_HEAD_SIZES["hidden_dim"],
    nheads=MASK_HEAD_SIZES["nheads"],
    enc=TINY_SIZES["enc_layers"],
    dec=TINY_SIZES["dec_layers"],
    ffn=TINY_SIZES["dim_feedforward"],
    num_queries=5,
    num_classes=7,
    aux_loss=False,
):
    """The tiny DETR (helpers.TINY_SIZES, 5 queries as helpers.TINY_FLAGS) at the mask head's width and heads."""
    position = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
    # return_interm_layers=True: the mask head reads layer1-3
    joiner = Joiner(Backbone(backbone, True, True, False, weights="none"), position)
    joiner.num_channels = joiner[0].num_channels
    transformer = Transformer(
        d_model=hidden_dim,
        nhead=nheads,
        num_encoder_layers=enc,
        num_decoder_layers=dec,
        dim_feedforward=ffn,
        dropout=0.0,
        return_intermediate_dec=True,
    )
    return DETR(joiner, transformer, num_classes=num_classes, num_queries=num_queries, aux_loss=aux_loss)


# ---------------------------------------------------------------------------------------------- losses


def test_dice_loss_hand_computed():
    inputs = torch.tensor([[0.0, 0.0, 0.0, 0.0], [LN3, LN3, -LN3, -LN3]])
    targets = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    # row 0: p = 0.5 everywhere: 1 - (2*1 + 1) / (2 + 2 + 1) = 0.4
    # row 1: p = .75 .75 .25 .25: sum(p t) = .75, sum p = 2, sum t = 1: 1 - (1.5 + 1) / (3 + 1) = 0.375
    assert dice_loss(inputs, targets, 2) == pytest.approx((0.4 + 0.375) / 2, abs=1e-6)
    # masks given as [N, H, W] are flattened per row
    assert dice_loss(inputs.view(2, 2, 2), targets.view(2, 2, 2), 1.0) == pytest.approx(0.775, abs=1e-6)


def test_dice_loss_empty_prediction_of_empty_mask_is_zero():
    assert dice_loss(torch.full((1, 9), -100.0), torch.zeros(1, 9), 1) == pytest.approx(0.0, abs=1e-6)


def test_sigmoid_focal_loss_hand_computed():
    inputs = torch.tensor([[0.0, 0.0], [LN3, LN3]])
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # row 0: p = .5, ce = ln 2, (1 - p_t)^2 = 1/4, alpha_t = .25 / .75: mean = ln2 * (1/4) * (1/2)
    row0 = math.log(2) / 8
    # row 1: t=1: ce = ln(4/3), 1-p_t = .25 -> /16, alpha .25;  t=0: ce = ln 4, 1-p_t = .75 -> 9/16, alpha .75
    row1 = (math.log(4 / 3) / 16 * 0.25 + math.log(4) * 9 / 16 * 0.75) / 2
    assert sigmoid_focal_loss(inputs, targets, 4) == pytest.approx((row0 + row1) / 4, abs=1e-6)
    # alpha < 0 switches the class balance off; gamma 0 gives plain BCE
    no_alpha = math.log(2) / 4 + (math.log(4 / 3) / 16 + math.log(4) * 9 / 16) / 2
    assert sigmoid_focal_loss(inputs, targets, 1, alpha=-1) == pytest.approx(no_alpha, abs=1e-6)
    bce = math.log(2) + (math.log(4 / 3) + math.log(4)) / 2
    assert sigmoid_focal_loss(inputs, targets, 1, alpha=-1, gamma=0) == pytest.approx(bce, abs=1e-6)


# ---------------------------------------------------------------------------------------------- attention map


def test_mh_attention_map_equals_per_head_loop():
    torch.manual_seed(0)
    B, Q, C, n, H, W = 2, 3, 16, 4, 3, 5
    attn = MHAttentionMap(C, C, n).eval()
    assert torch.count_nonzero(attn.q_linear.bias) == 0 and torch.count_nonzero(attn.k_linear.bias) == 0
    torch.nn.init.normal_(attn.q_linear.bias)
    torch.nn.init.normal_(attn.k_linear.bias)
    q, k = torch.randn(B, Q, C), torch.randn(B, C, H, W)
    mask = torch.zeros(B, H, W, dtype=torch.bool)
    mask[1, :, 3:] = True  # padding on the right of the second image
    out = attn(q, k, mask=mask)
    assert out.shape == (B, Q, n, H, W)

    c = C // n
    expected = torch.zeros(B, Q, n, H, W)
    for b in range(B):
        for i in range(Q):
            qi = attn.q_linear(q[b, i])
            scores = torch.empty(n, H, W)
            for h in range(n):
                for y in range(H):
                    for x in range(W):
                        kyx = attn.k_linear(k[b, :, y, x])
                        s = (qi[h * c : (h + 1) * c] * kyx[h * c : (h + 1) * c]).sum() / math.sqrt(c)
                        scores[h, y, x] = float("-inf") if mask[b, y, x] else s
            expected[b, i] = scores.flatten().softmax(0).view(n, H, W)  # one softmax over heads and positions
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert out[1, :, :, :, 3:].abs().max() == 0
    torch.testing.assert_close(out.flatten(2).sum(-1), torch.ones(B, Q))


# ---------------------------------------------------------------------------------------------- mask head


def test_mask_head_shapes_and_per_query_independence():
    torch.manual_seed(0)
    hidden, nheads, B, Q = 128, 8, 2, 3
    head = MaskHeadSmallConv(hidden + nheads, [64, 32, 16], hidden).eval()
    x = torch.randn(B, hidden, 2, 3)
    bbox_mask = torch.rand(B, Q, nheads, 2, 3)
    fpns = [torch.randn(B, 64, 4, 5), torch.randn(B, 32, 7, 10), torch.randn(B, 16, 14, 19)]
    out = head(x, bbox_mask, fpns)
    assert out.shape == (B * Q, 1, 14, 19)
    # rows are batch-major: row b * Q + q is image b with query q, whatever the rest of the batch holds
    for b in range(B):
        for q in range(Q):
            alone = head(x[b : b + 1], bbox_mask[b : b + 1, q : q + 1], [f[b : b + 1] for f in fpns])
            torch.testing.assert_close(out[b * Q + q], alone[0], atol=1e-5, rtol=1e-5)
    # fpn features already repeated per query give the same result
    torch.testing.assert_close(head(x, bbox_mask, [f.repeat_interleave(Q, 0) for f in fpns]), out)


def test_mask_head_init_and_bad_width():
    head = MaskHeadSmallConv(264, [1024, 512, 256], 256)
    for name, m in head.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            assert torch.count_nonzero(m.bias) == 0, name
            bound = math.sqrt(6 / ((1 + 1) * m.weight[0].numel()))  # kaiming_uniform_(a=1)
            assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.9 * bound, name
    with pytest.raises(ValueError, match="hidden_dim"):
        MaskHeadSmallConv(64 + 4, [256, 128, 64], 64)


def test_mask_head_attention_gain_scales_only_the_attention_weights():
    torch.manual_seed(0)
    plain = MaskHeadSmallConv(136, [64, 64, 64], 128)
    torch.manual_seed(0)
    scaled = MaskHeadSmallConv(136, [64, 64, 64], 128, attention_gain=100.0)
    # lay1's inputs are the 128 feature channels, then the 8 attention maps.
    torch.testing.assert_close(scaled.lay1.weight[:, 128:], plain.lay1.weight[:, 128:] * 100, rtol=0, atol=0)
    assert torch.equal(scaled.lay1.weight[:, :128], plain.lay1.weight[:, :128])
    for (name, a), (_, b) in zip(plain.state_dict().items(), scaled.state_dict().items()):
        assert name == "lay1.weight" or torch.equal(a, b), name


# ---------------------------------------------------------------------------------------------- DETRsegm


@pytest.fixture(scope="module")
def small_segm():
    torch.manual_seed(0)
    return DETRsegm(make_detr(aux_loss=True)).eval()


def test_detrsegm_outputs_match_wrapped_detr(small_segm):
    images = [torch.randn(3, 64, 80), torch.randn(3, 72, 64)]
    with torch.no_grad():
        out = small_segm(images)
        det = small_segm.detr(images)
    assert out["pred_logits"].shape == (2, 5, 8) and out["pred_boxes"].shape == (2, 5, 4)
    # masks at the resolution of layer1 (1/4 of the padded batch)
    assert out["pred_masks"].shape == (2, 5, 18, 20)
    torch.testing.assert_close(out["pred_logits"], det["pred_logits"])
    torch.testing.assert_close(out["pred_boxes"], det["pred_boxes"])
    assert len(out["aux_outputs"]) == 1
    torch.testing.assert_close(out["aux_outputs"][0]["pred_logits"], det["aux_outputs"][0]["pred_logits"])
    # the same batch given as a NestedTensor
    with torch.no_grad():
        again = small_segm(nested_tensor_from_tensor_list(images))
    torch.testing.assert_close(again["pred_masks"], out["pred_masks"])


def test_detrsegm_freeze_detr():
    torch.manual_seed(0)
    model = DETRsegm(make_detr(), freeze_detr=True)
    assert not any(p.requires_grad for p in model.detr.parameters())
    assert all(p.requires_grad for p in model.bbox_attention.parameters())
    assert all(p.requires_grad for p in model.mask_head.parameters())
    # fpn widths follow the backbone: ResNet-18 has 256, 128, 64 channels in layer3, 2, 1
    assert model.mask_head.adapter1.in_channels == 256 and model.mask_head.adapter3.in_channels == 64


def test_detrsegm_torchscript_equals_eager():
    torch.manual_seed(0)
    model = DETRsegm(make_detr(aux_loss=False)).eval()
    scripted = torch.jit.script(model)
    x = nested_tensor_from_tensor_list([torch.randn(3, 64, 80), torch.randn(3, 72, 64)])
    with torch.no_grad():
        out, out_script = model(x), scripted(x)
    for key in ("pred_logits", "pred_boxes", "pred_masks"):
        torch.testing.assert_close(out_script[key], out[key], atol=1e-5, rtol=1e-5)


def _read_tsv(path):
    rows = [line.rstrip("\n").split("\t") for line in open(path)][1:]
    return [(k, [int(s) for s in shape.strip("[]").split(",") if s.strip()], dtype) for k, shape, dtype in rows]


@pytest.fixture(scope="module")
def r50_panoptic():
    torch.manual_seed(0)
    return DETRsegm(
        make_detr(
            "resnet50",
            hidden_dim=256,
            nheads=8,
            enc=6,
            dec=6,
            ffn=2048,
            num_queries=100,
            num_classes=250,
            aux_loss=True,
        )
    )


def test_state_dict_equals_published_layout(r50_panoptic):
    path = SPEC_DIR / "state_dict_detr_resnet50_panoptic.tsv"
    expected = _read_tsv(path)
    got = [(k, list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in r50_panoptic.state_dict().items()]
    assert sorted(got) == sorted(expected)
    assert [k for k, _, _ in got] == [k for k, _, _ in expected]


def test_published_checkpoint_round_trip(r50_panoptic, tmp_path):
    path = tmp_path / "detr-r50-panoptic.pth"
    sd = r50_panoptic.state_dict()
    args = argparse.Namespace(masks=True, dataset_file="coco_panoptic", backbone="resnet50", lr=1e-4)
    torch.save({"model": sd, "args": args}, path)
    with safe_globals([argparse.Namespace]):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["args"] == args
    torch.manual_seed(1)
    fresh = DETRsegm(
        make_detr("resnet50", hidden_dim=256, nheads=8, enc=6, dec=6, ffn=2048, num_queries=100, num_classes=250)
    )
    assert not torch.equal(fresh.mask_head.lay1.weight, sd["mask_head.lay1.weight"])
    result = fresh.load_state_dict(ckpt["model"], strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k


# ---------------------------------------------------------------------------------------------- PostProcessSegm


def test_post_process_segm():
    # query 0 positive on the top half, query 1 on the bottom half of a 2x2 map (a padded 4x4 batch)
    top = torch.tensor([[5.0, 5.0], [-5.0, -5.0]])
    pred_masks = torch.stack([top, -top])[None].repeat(2, 1, 1, 1)  # [B=2, Q=2, 2, 2]
    max_target_sizes = torch.tensor([[4, 4], [2, 4]])  # image 1 is the top half of the padded batch
    orig_target_sizes = torch.tensor([[8, 6], [3, 5]])
    results = PostProcessSegm()([{}, {}], {"pred_masks": pred_masks}, orig_target_sizes, max_target_sizes)

    m0, m1 = results[0]["masks"], results[1]["masks"]
    assert m0.dtype == torch.uint8 and m0.shape == (2, 1, 8, 6) and m1.shape == (2, 1, 3, 5)
    expected0 = torch.zeros(8, 6, dtype=torch.uint8)
    expected0[:4] = 1  # bilinear 2->4: rows 0, 1 positive, rows 2, 3 negative; then nearest to 8 rows
    assert torch.equal(m0[0, 0], expected0) and torch.equal(m0[1, 0], 1 - expected0)
    assert m1[0].all() and not m1[1].any()

    # [B, Q, 1, H, W] masks are accepted too; a higher threshold empties the borderline rows
    strict = PostProcessSegm(threshold=0.99)(
        [{}], {"pred_masks": pred_masks[:1, :, None]}, orig_target_sizes[:1], max_target_sizes[:1]
    )
    assert strict[0]["masks"][0, 0].sum() == 6 * 2  # sigmoid(2.5) < 0.99: only the first of 4 rows, x2 x6


# ---------------------------------------------------------------------------------------------- PostProcessPanoptic

NUM_CLASSES = 5  # classes 0..4, index 5 is no-object; 0-2 things, 3-4 stuff
IS_THING = {i: i <= 2 for i in range(NUM_CLASSES + 1)}


def logits_for(classes):
    """Per-query logits: a confident class, 'none' for no-object, or ('weak', c) below the threshold."""
    rows = []
    for c in classes:
        row = torch.zeros(NUM_CLASSES + 1)
        if c == "none":
            row[NUM_CLASSES] = 10.0
        elif isinstance(c, tuple):
            row[c[1]] = 1.0
        else:
            row[c] = 10.0
        rows.append(row)
    return torch.stack(rows)[None]


def decode(png):
    return rgb2id(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))


def test_post_process_panoptic_two_halves():
    h, w = 4, 6
    left = torch.full((h, w), -5.0)
    left[:, :3] = 5.0
    masks = torch.stack([left, -left, left, -left])[None]  # queries 2 and 3 are dropped by their class
    outputs = {
        "pred_logits": logits_for([1, 3, "none", ("weak", 2)]),
        "pred_masks": masks,
        "pred_boxes": torch.rand(1, 4, 4),
    }
    post = PostProcessPanoptic(IS_THING)
    res = post(outputs, torch.tensor([[h, w]]), torch.tensor([[2 * h, 2 * w]]))
    assert len(res) == 1
    ids = decode(res[0]["png_string"])
    expected = np.ones((2 * h, 2 * w), dtype=np.int64)
    expected[:, :6] = 0
    np.testing.assert_array_equal(ids, expected)
    assert res[0]["segments_info"] == [
        {"id": 0, "isthing": True, "category_id": 1, "area": 48},
        {"id": 1, "isthing": False, "category_id": 3, "area": 48},
    ]
    # target_sizes defaults to processed_sizes
    res = post(outputs, [(h, w)])
    assert decode(res[0]["png_string"]).shape == (h, w)
    assert [s["area"] for s in res[0]["segments_info"]] == [12, 12]
    # the threshold applies to the winning class's probability
    assert PostProcessPanoptic(IS_THING, threshold=0.99999)(outputs, [(h, w)])[0]["segments_info"] == []


def test_post_process_panoptic_merges_stuff_of_one_class():
    h, w = 4, 6
    thirds = torch.full((3, h, w), -5.0)
    thirds[0, :, :2] = 5.0  # query 0 (stuff 3): left third
    thirds[1, :, 2:4] = 5.0  # query 1 (stuff 3): middle third
    thirds[0, :, 2:4] = 1.0  # ... where query 0 is second best, ahead of query 2
    thirds[2, :, 4:] = 5.0  # query 2 (thing 1): right third
    outputs = {"pred_logits": logits_for([3, 3, 1]), "pred_masks": thirds[None]}
    res = PostProcessPanoptic(IS_THING)(outputs, [(h, w)])[0]
    # query 1's pixels go to query 0 (same stuff class), query 1 is then empty and removed, ids re-numbered
    expected = np.zeros((h, w), dtype=np.int64)
    expected[:, 4:] = 1
    np.testing.assert_array_equal(decode(res["png_string"]), expected)
    assert res["segments_info"] == [
        {"id": 0, "isthing": False, "category_id": 3, "area": 16},
        {"id": 1, "isthing": True, "category_id": 1, "area": 8},
    ]


def test_post_process_panoptic_things_of_one_class_stay_apart():
    h, w = 4, 6
    left = torch.full((h, w), -5.0)
    left[:, :3] = 5.0
    outputs = {"pred_logits": logits_for([2, 2]), "pred_masks": torch.stack([left, -left])[None]}
    res = PostProcessPanoptic(IS_THING)(outputs, [(h, w)])[0]
    assert [(s["id"], s["category_id"], s["area"]) for s in res["segments_info"]] == [(0, 2, 12), (1, 2, 12)]


def test_post_process_panoptic_drops_small_segments():
    h, w = 4, 6
    masks = torch.full((3, h, w), -5.0)
    masks[0] = 5.0  # query 0 (thing 0) everywhere but where the others win
    masks[1, 0, :2] = 9.0  # query 1 (thing 1): 2 pixels -> too small
    masks[2, 3, :] = 9.0  # query 2 (stuff 4): one row of 6 pixels -> kept
    outputs = {"pred_logits": logits_for([0, 1, 4]), "pred_masks": masks[None]}
    res = PostProcessPanoptic(IS_THING)(outputs, [(h, w)])[0]
    expected = np.zeros((h, w), dtype=np.int64)
    expected[3] = 1
    np.testing.assert_array_equal(decode(res["png_string"]), expected)
    assert res["segments_info"] == [
        {"id": 0, "isthing": True, "category_id": 0, "area": 18},
        {"id": 1, "isthing": False, "category_id": 4, "area": 6},
    ]


def test_post_process_panoptic_nothing_kept():
    outputs = {"pred_logits": logits_for(["none", ("weak", 1)]), "pred_masks": torch.randn(1, 2, 3, 5)}
    res = PostProcessPanoptic(IS_THING)(outputs, [(3, 5)], [(6, 10)])[0]
    assert res["segments_info"] == []
    ids = decode(res["png_string"])
    assert ids.shape == (6, 10) and not ids.any()


def test_post_process_panoptic_batch_and_mask_resizing():
    # masks predicted at 1/4 resolution are resized (bilinear) to each processed size, then to the target size
    low = torch.full((2, 3), -5.0)
    low[:, 0] = 5.0
    outputs = {
        "pred_logits": torch.cat([logits_for([1, 4]), logits_for([4, "none"])]),
        "pred_masks": torch.stack([torch.stack([low, -low]), torch.stack([low, low])]),
    }
    res = PostProcessPanoptic(IS_THING)(outputs, torch.tensor([[8, 12], [8, 12]]), torch.tensor([[8, 12], [4, 4]]))
    ids0 = decode(res[0]["png_string"])
    # bilinear 3 -> 12 columns: query 0 wins output columns 0-3, query 1 from column 4 on
    expected0 = (
        torch.nn.functional.interpolate(
            torch.stack([low, -low])[None], size=(8, 12), mode="bilinear", align_corners=False
        )[0]
        .argmax(0)
        .numpy()
    )
    np.testing.assert_array_equal(ids0, expected0)
    assert expected0[:, :4].max() == 0 and expected0[:, 8:].min() == 1
    assert res[1]["segments_info"] == [{"id": 0, "isthing": False, "category_id": 4, "area": 16}]
