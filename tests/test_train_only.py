"""models/train_only.py: training-only supervision leaves DETR itself unchanged, and does what each method says."""

import json
import math

import pytest
import torch
from helpers import load_checkpoint_safely, run_main, tiny_args, tiny_flags, tiny_model

import main as main_py
import util.misc as utils
from models import build_model
from models.detr import DETR
from models.train_only import (
    TrainOnlyDETR,
    block_diagonal_mask,
    check_train_only_args,
    deployed_args,
    group_matching,
    cell_centres,
    sine_box_code,
)

# Each method alone, and all of them together (the dense head on a backbone stage and on the encoder).
METHODS = {
    "groups": ["--query_groups", "3"],
    "hybrid": ["--hybrid_queries", "7", "--hybrid_repeats", "3"],
    "denoising": ["--dn_groups", "2"],
    "dense_layer2": ["--dense_aux", "layer2"],
    "dense_encoder_queries": ["--dense_aux", "encoder", "--dense_queries", "6"],
    "position": ["--position_aux", "1"],
    "absolute_hybrid": ["--dense_aux", "encoder", "--dense_boxes", "absolute", "--hybrid_queries", "7",
                        "--hybrid_repeats", "3"],
    "all": ["--query_groups", "2", "--hybrid_queries", "5", "--dn_groups", "2", "--dense_aux", "layer3",
            "--dense_queries", "4", "--position_aux", "0.5"],
}  # fmt: skip
NUM_CLASSES = ["--num_classes", "5"]


def batch(seed: int = 0, empty: bool = False):
    """Two 64x64 images of different sizes (so there is padding) and their targets; `empty`: no boxes at all."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.randn(3, 64, 64, generator=g), torch.randn(3, 56, 64, generator=g)]
    targets = []
    for n in (0, 0) if empty else (3, 1):
        centres = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        sizes = torch.rand(n, 2, generator=g) * 0.2 + 0.1
        targets.append({"labels": torch.randint(0, 5, (n,), generator=g), "boxes": torch.cat([centres, sizes], 1)})
    return images, targets


def train_steps(model, criterion, steps: int = 2, empty: bool = False) -> float:
    """A few AdamW steps on batch(); returns the last total loss."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for step in range(steps):
        images, targets = batch(step, empty)
        with utils.training_targets(model, targets):
            outputs = model(images)
        losses = criterion(outputs, targets)
        total = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    return float(total.detach())


@pytest.mark.parametrize("method", METHODS)
def test_after_training_eval_outputs_and_state_dict_are_a_plain_detrs(method):
    model, criterion, _ = tiny_model(*METHODS[method], *NUM_CLASSES)
    assert isinstance(model, TrainOnlyDETR)
    train_steps(model, criterion)
    plain, _, _ = tiny_model(*NUM_CLASSES, seed=1)
    assert type(plain) is DETR
    state = model.state_dict()
    # The checkpoint's 'model': exactly DETR's keys and shapes, loaded strictly by a DETR built without the flags.
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in plain.state_dict().items()}
    plain.load_state_dict(state, strict=True)
    model.eval()
    plain.eval()
    images, _ = batch(5)
    with torch.no_grad():
        ours, theirs = model(images), plain(images)
    assert ours.keys() == theirs.keys() == {"pred_logits", "pred_boxes", "aux_outputs"}
    assert torch.equal(ours["pred_logits"], theirs["pred_logits"])
    assert torch.equal(ours["pred_boxes"], theirs["pred_boxes"])
    # The training-only weights are there, and trained.
    train_only = model.train_only_state_dict()
    assert train_only and all(k.split(".")[0] in {"group_embed", "hybrid_embed", "label_embed", "box_embed",
                                                  "dense_head", "position_head"} for k in train_only)  # fmt: skip


@pytest.mark.parametrize("method", METHODS)
def test_in_training_the_main_queries_compute_what_they_compute_without_the_extras(method):
    model, criterion, _ = tiny_model(*METHODS[method], *NUM_CLASSES)
    train_steps(model, criterion, steps=1)
    plain, _, _ = tiny_model(*NUM_CLASSES, seed=1)
    plain.load_state_dict(model.state_dict())
    model.train()
    plain.train()  # no dropout in the tiny model: training mode computes what eval mode does, but per query set
    images, targets = batch(3)
    with utils.training_targets(model, targets):
        ours = model(images)
    theirs = plain(images)
    extra = ours["train_only"]
    assert extra, "no training-only outputs in training mode"
    for key in ("pred_logits", "pred_boxes"):
        scale = theirs[key].abs().max()
        # The masked attention runs over more keys (whose weights are exactly 0): the same up to rounding.
        assert (ours[key] - theirs[key]).abs().max() <= 1e-5 * scale + 1e-6
        for a, b in zip(ours["aux_outputs"], theirs["aux_outputs"]):
            assert (a[key] - b[key]).abs().max() <= 1e-5 * b[key].abs().max() + 1e-6
    # And they do differ from the extra queries' outputs: those are other queries.
    for name, outputs in extra.items():
        if isinstance(outputs, dict) and "pred_boxes" in outputs and name != "dense":
            assert outputs["pred_logits"].shape[1] != ours["pred_logits"].shape[1] or not torch.equal(
                outputs["pred_logits"], ours["pred_logits"]
            )


def test_cell_centres_are_in_the_unpadded_images_box_coordinates():
    mask = torch.zeros(2, 2, 4, dtype=torch.bool)
    mask[1, :, 3] = True  # the second image is 3 cells wide, the rest padding
    mask[1, 1, :] = True  # and 1 cell high
    centres = cell_centres(mask)
    assert centres.shape == (2, 2, 2, 4)
    assert torch.allclose(centres[0, 0, 0], torch.tensor([0.125, 0.375, 0.625, 0.875]))
    assert torch.allclose(centres[0, 1, :, 0], torch.tensor([0.25, 0.75]))
    assert torch.allclose(centres[1, 0, 0, :3], torch.tensor([1 / 6, 0.5, 5 / 6]))
    assert torch.allclose(centres[1, 1, 0, 0], torch.tensor(0.5))


def test_the_position_loss_is_the_mean_l1_over_unpadded_cells():
    model, criterion, _ = tiny_model("--position_aux", "2", *NUM_CLASSES)
    assert criterion.weight_dict["loss_position"] == 2.0
    model.train()
    _, targets = batch(4)
    images = [torch.randn(3, 64, 64), torch.randn(3, 64, 24)]  # the narrow one's second column is padding
    with utils.training_targets(model, targets):
        outputs = model(images)
    position = outputs["train_only"]["position"]
    valid = position["valid"]
    assert valid[0].all() and valid[1, :, 0].all() and not valid[1, :, 1].any()
    errors = (position["pred"] - position["target"]).abs().sum(1)[valid]
    losses = criterion(outputs, targets)
    assert torch.allclose(losses["loss_position"], errors.mean())
    # Its gradient reaches the encoder (the memory the decoder reads), not only the read-out.
    losses["loss_position"].backward()
    encoder_grad = model.transformer.encoder.layers[0].linear1.weight.grad
    assert encoder_grad is not None and encoder_grad.abs().sum() > 0


def test_the_attention_mask_keeps_each_block_to_itself():
    mask = block_diagonal_mask([2, 3, 1], torch.device("cpu"))
    allowed = ~mask
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[:2, :2] = True
    expected[2:5, 2:5] = True
    expected[5, 5] = True
    assert torch.equal(allowed, expected)


def test_a_change_in_the_extra_queries_does_not_reach_the_main_ones():
    model, criterion, _ = tiny_model(*METHODS["all"], *NUM_CLASSES)
    model.train()
    images, targets = batch(2)
    with utils.training_targets(model, targets):
        before = model(images)
    with torch.no_grad():
        model.train_only.group_embed.weight.add_(1.0)
        model.train_only.hybrid_embed.weight.mul_(-3.0)
        model.train_only.label_embed.weight.add_(0.5)
    torch.manual_seed(0)  # the denoising noise differs anyway; the main queries must not see it
    with utils.training_targets(model, targets):
        after = model(images)
    assert torch.equal(before["pred_logits"], after["pred_logits"])
    assert torch.equal(before["pred_boxes"], after["pred_boxes"])
    assert not torch.equal(before["train_only"]["groups"]["pred_logits"], after["train_only"]["groups"]["pred_logits"])


def test_matching_runs_per_group_each_target_once_in_each():
    model, criterion, _ = tiny_model("--query_groups", "4", *NUM_CLASSES)
    n = model.num_queries
    calls = []
    matcher = criterion.matcher

    def recording(outputs, targets):
        calls.append(outputs["pred_logits"].shape[1])
        return matcher(outputs, targets)

    outputs = {"pred_logits": torch.randn(2, 3 * n, 6), "pred_boxes": torch.rand(2, 3 * n, 4)}
    _, targets = batch(0)
    indices = group_matching(recording, outputs, targets, n)
    assert calls == [n, n, n]  # three extra groups, each matched on its own
    for (rows, cols), t in zip(indices, targets):
        k = len(t["labels"])
        assert len(rows) == 3 * k
        for g in range(3):
            in_group = (rows >= g * n) & (rows < (g + 1) * n)
            assert sorted(cols[in_group].tolist()) == list(range(k))  # every target once in each group
        assert len(set(rows.tolist())) == len(rows)


def test_denoising_targets_need_no_matching_and_are_the_noised_queries_sources():
    model, criterion, _ = tiny_model("--dn_groups", "3", "--dn_label_noise", "0", "--dn_box_noise", "0",
                                     "--no_aux_loss", *NUM_CLASSES)  # fmt: skip
    _, targets = batch(1)
    boxes, labels, known = model._noised_targets(targets)
    for i, ((slots, objects), t) in enumerate(zip(known, targets)):
        assert len(slots) == 3 * len(t["labels"])
        # Without noise, each slot's query box and label are its target's own.
        assert torch.allclose(boxes[i, slots], t["boxes"][objects])
        assert torch.equal(labels[i, slots], t["labels"][objects])
    # The criterion matches the main queries only: the matcher is called once (no aux layers), not for dn.
    calls = []
    criterion.matcher.register_forward_pre_hook(lambda module, inputs: calls.append(inputs[0]["pred_logits"].shape[1]))
    model.train()
    images, targets = batch(1)
    with utils.training_targets(model, targets):
        outputs = model(images)
    losses = criterion(outputs, targets)
    assert calls == [model.num_queries]
    assert {"loss_ce_dn", "loss_bbox_dn", "loss_giou_dn"} <= losses.keys()


def test_noised_boxes_move_by_at_most_the_noise_times_their_size():
    model, _, _ = tiny_model("--dn_groups", "4", "--dn_box_noise", "0.4", *NUM_CLASSES)
    _, targets = batch(4)
    boxes, _, known = model._noised_targets(targets)
    for i, (slots, objects) in enumerate(known):
        source = targets[i]["boxes"][objects]
        moved = (boxes[i, slots] - source).abs()
        limit = 0.2 * source[:, 2:].repeat(1, 2) + 1e-6
        assert (moved <= limit).all() and (moved > 0).any()


@pytest.mark.parametrize("method", ["groups", "denoising", "absolute_hybrid", "all"])
def test_images_with_no_boxes_train(method):
    model, criterion, _ = tiny_model(*METHODS[method], *NUM_CLASSES)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    total = train_steps(model, criterion, steps=2, empty=True)
    assert torch.isfinite(torch.tensor(total))
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # "no object" was learned


def test_the_sine_box_code_is_the_keys_position_code_at_the_box_centre():
    from models.position_encoding import PositionEmbeddingSine
    from util.misc import NestedTensor

    encoding = PositionEmbeddingSine(16, normalize=True)
    h, w = 4, 8
    keys = encoding(NestedTensor(torch.zeros(1, 1, h, w), torch.zeros(1, h, w, dtype=torch.bool)))[0]  # [32, h, w]
    # PositionEmbeddingSine puts cell (y, x) at ((y + 1) / h, (x + 1) / w) (up to its eps).
    box = torch.tensor([[(5 + 1) / w, (2 + 1) / h, 0.3, 0.2]])
    code = sine_box_code(box, 16)[0]
    assert code.shape == (64,)
    assert torch.allclose(code[:32], keys[:, 2, 5], atol=1e-4)


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--query_groups", "2", "--two_stage"], "--two_stage"),
        (["--dense_queries", "4"], "--dense_aux"),
        (["--dense_aux", "layer9"], "--dense_aux"),
        (["--query_groups", "0"], "--query_groups"),
        (["--dn_groups", "1", "--dn_label_noise", "2"], "--dn_label_noise"),
        (["--dense_aux", "layer4", "--feature_stride", "16"], "--feature_stride"),
        (["--hybrid_queries", "4", "--masks", "--frozen_weights", "x.pth"], "--frozen_weights"),
        (["--position_aux", "-1"], "--position_aux"),
        (["--position_aux", "1", "--two_stage"], "--two_stage"),
    ],
)
def test_a_combination_that_cannot_work_stops_before_training_naming_the_flags(flags, named):
    with pytest.raises(ValueError, match=named):
        check_train_only_args(tiny_args(*flags))
    with pytest.raises(SystemExit, match=named):
        main_py.check_args(tiny_args(*flags))


def test_with_masks_the_box_stage_trains_and_the_mask_head_sees_the_main_queries_only():
    from helpers import MASK_HEAD_FLAGS

    model, criterion, _ = tiny_model(*METHODS["all"], "--masks", *MASK_HEAD_FLAGS, *NUM_CLASSES)
    model.train()
    images, targets = batch(0)
    for t in targets:
        t["masks"] = torch.zeros(len(t["labels"]), 64, 64, dtype=torch.bool)
    with utils.training_targets(model, targets):
        outputs = model(images)
    assert outputs["pred_masks"].shape[1] == model.detr.num_queries
    losses = criterion(outputs, targets)
    total = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
    total.backward()
    assert torch.isfinite(total) and "loss_mask" in losses and "loss_ce_dn" in losses


def test_the_training_only_weight_fades_over_train_only_epochs():
    _, criterion, _ = tiny_model("--query_groups", "2", "--train_only_epochs", "4", *NUM_CLASSES)
    criterion.set_epoch(1)
    assert criterion.weight_dict["loss_bbox_groups"] == pytest.approx(5 * 0.75)
    assert criterion.weight_dict["loss_bbox"] == 5
    criterion.set_epoch(6)
    assert criterion.weight_dict["loss_giou_groups_0"] == 0 and criterion.weight_dict["loss_giou_0"] == 2


def test_training_mode_without_the_targets_says_how_to_give_them():
    model, _, _ = tiny_model("--dn_groups", "1", *NUM_CLASSES)
    model.train()
    with pytest.raises(RuntimeError, match="training_targets"):
        model(batch(0)[0])


RESUME_METHODS = {
    "groups_denoising_dense_queries": ("--query_groups", "2", "--dn_groups", "1", "--dense_aux", "layer2",
                                       "--dense_queries", "4"),
    # the combination docs/train_only.md recommends
    "absolute_hybrid": ("--dense_aux", "encoder", "--dense_boxes", "absolute", "--hybrid_queries", "5",
                        "--hybrid_repeats", "3"),
}  # fmt: skip
RUN_FLAGS = ("--no_plots", "--no_tensorboard", "--lr_drop", "5")


@pytest.mark.slow
@pytest.mark.parametrize("method", RESUME_METHODS)
def test_a_run_resumed_with_auto_resume_ends_as_one_never_interrupted(synthetic_root, tmp_path, method):
    flags = (*RESUME_METHODS[method], *RUN_FLAGS)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run_main(tiny_flags(synthetic_root, whole, *flags, "--epochs", "2"))
    run_main(tiny_flags(synthetic_root, parts, *flags, "--epochs", "1"))
    run_main(tiny_flags(synthetic_root, parts, *flags, "--epochs", "2", "--auto_resume"))
    assert (whole / "log.txt").read_text() == (parts / "log.txt").read_text()
    a, b = load_checkpoint_safely(whole / "checkpoint.pth"), load_checkpoint_safely(parts / "checkpoint.pth")
    for part in ("model", "model_train_only"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    # checkpoint['model'] is a plain DETR's, for the flags without the training-only ones.
    plain, _, _ = build_model(deployed_args(a["args"]))
    assert type(plain) is DETR
    plain.load_state_dict(a["model"], strict=True)
    assert a["model_train_only"] and not any("train_only" in k for k in a["model"])
    embed = "group_embed.weight" if method == "groups_denoising_dense_queries" else "hybrid_embed.weight"
    assert embed in a["model_train_only"]


@pytest.mark.slow
def test_every_method_trains_on_the_fast_path_under_bfloat16_autocast(synthetic_root, tmp_path):
    flags = [*METHODS["all"], "--fast", "--amp", "--amp_dtype", "bfloat16", "--epochs", "1", "--no_plots",
             "--no_tensorboard"]  # fmt: skip
    run_main(tiny_flags(synthetic_root, tmp_path, *flags))
    log = (tmp_path / "log.txt").read_text().splitlines()
    assert len(log) == 1
    row = json.loads(log[0])
    for term in ("loss_bbox_groups", "loss_bbox_hybrid", "loss_bbox_dn", "loss_bbox_dense", "loss_bbox_dense_queries"):
        assert math.isfinite(row[f"train_{term}_unscaled"]), term
    assert "test_loss_bbox_dn" not in row  # evaluation runs DETR alone
    checkpoint = load_checkpoint_safely(tmp_path / "checkpoint.pth")
    assert not any("train_only" in k for k in checkpoint["model"]) and checkpoint["model_train_only"]


def test_absolute_dense_boxes_leave_the_anchors_out():
    from models.train_only import DenseHead

    torch.manual_seed(0)
    feature, mask = torch.randn(2, 16, 4, 4), torch.zeros(2, 4, 4, dtype=torch.bool)
    anchored, absolute = DenseHead(16, 16, 5, anchored=True), DenseHead(16, 16, 5, anchored=False)
    absolute.load_state_dict(anchored.state_dict())
    a, b = anchored(feature, mask), absolute(feature, mask)
    assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["anchors"], b["anchors"])
    offsets = torch.logit(b["pred_boxes"].double()) - torch.logit(a["pred_boxes"].double())
    # The anchored boxes are the absolute ones moved by each cell's anchor (in inverse-sigmoid space).
    anchors = a["anchors"].double()
    assert torch.allclose(offsets, -torch.log(anchors / (1 - anchors)), atol=1e-3)


def test_the_tools_read_a_checkpoint_trained_with_every_method_as_a_plain_detr(synthetic_root, tmp_path):
    from PIL import Image
    from tool_checkpoints import tiny_checkpoint

    from tools import convert_hf
    from tools.detector import load_detector

    flags = [*METHODS["all"], "--dense_aux", "layer2"]
    path = tiny_checkpoint(tmp_path / "checkpoint.pth", synthetic_root, *flags, seed=3)
    checkpoint = load_checkpoint_safely(path)
    assert checkpoint["args"].query_groups == 2 and not any("train_only" in k for k in checkpoint["model"])
    detector = load_detector(resume=str(path))
    assert type(detector.model) is DETR  # tools build the model the checkpoint deploys
    trained, _, _ = build_model(checkpoint["args"])
    assert isinstance(trained, TrainOnlyDETR)
    trained.load_state_dict(checkpoint["model"])
    images, _ = batch(7)
    with torch.no_grad():
        ours, theirs = detector.model(images), trained.eval()(images)
    assert torch.equal(ours["pred_boxes"], theirs["pred_boxes"])
    image = tmp_path / "image.png"
    Image.fromarray((torch.rand(64, 64, 3) * 255).byte().numpy()).save(image)
    differences = convert_hf.main([str(path), str(tmp_path / "hf"), "--check", str(image), "--size", "64"])
    assert differences and all(value <= 1e-4 for value in differences.values())
