"""engine.py: one training epoch is the plain weighted-loss / clip / step loop and reports its averages; a
non-finite loss stops before the step; evaluation scores predictions with COCO's metrics."""

import math
import random
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader, SequentialSampler

import main as main_py
import util.misc as utils
from helpers import MASK_HEAD_SIZES, OracleDETR, tiny_detr_and_optimizer, tiny_flags
from datasets import get_coco_api_from_dataset, synthetic
from engine import evaluate, optimizer_step, per_class_table, run_model, train_one_epoch
from models import build_model


@pytest.fixture(scope="module")
def args(synthetic_root):
    args = main_py.parse_args(tiny_flags(synthetic_root))
    args.num_classes = 6
    return args


@pytest.fixture(scope="module")
def batches(args):
    """Two training batches of 2 images each (no augmentation randomness left: drawn once here, from a seeded
    state, so that they do not depend on which tests ran before)."""
    random.seed(0)
    torch.manual_seed(0)
    dataset = synthetic.build("train", args)
    return [utils.collate_fn([dataset[i] for i in range(j, j + 2)]) for j in (0, 2)]


@pytest.fixture(scope="module")
def val_dataset(args):
    return synthetic.build("val", args)


def model_and_optimizer(args):
    model, criterion, _, optimizer = tiny_detr_and_optimizer(args)
    return model, criterion, optimizer


def total_grad_norm(model):
    return torch.norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])).item()


def test_an_epoch_is_the_weighted_loss_clip_step_loop(args, batches):
    model, criterion, optimizer = model_and_optimizer(args)
    stats = train_one_epoch(model, criterion, batches, optimizer, torch.device("cpu"), epoch=0, max_norm=0.1)

    # The same steps written out.
    reference, criterion_ref, optimizer_ref = model_and_optimizer(args)
    reference.train()
    weights = criterion_ref.weight_dict
    losses, terms = [], []
    for samples, targets in batches:
        loss_dict = criterion_ref(reference(samples), targets)
        loss = sum(loss_dict[k] * weights[k] for k in loss_dict if k in weights)
        optimizer_ref.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1)
        optimizer_ref.step()
        losses.append(loss.item())
        terms.append({k: v.item() for k, v in loss_dict.items()})

    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, p_ref), name
    # Every parameter that trains moved, the frozen ones (stem and layer1 of the backbone) did not.
    initial, _, _ = model_and_optimizer(args)
    for (name, p), p0 in zip(model.named_parameters(), initial.parameters()):
        assert torch.equal(p, p0) != p.requires_grad, name

    # Epoch averages of the total, of each weighted term, and of each raw term.
    assert stats["loss"] == pytest.approx(sum(losses) / 2, rel=1e-6)
    assert set(weights) == {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_0", "loss_giou_0"}
    for k in weights:
        assert stats[k] == pytest.approx(sum(t[k] * weights[k] for t in terms) / 2, rel=1e-6), k
    for k in terms[0]:
        assert stats[f"{k}_unscaled"] == pytest.approx(sum(t[k] for t in terms) / 2, rel=1e-6), k
    assert stats["lr"] == args.lr and stats["loss"] > 0
    assert 0 <= stats["class_error"] <= 100


def test_log_step_gets_each_printed_step_with_its_own_values(args, batches):
    model, criterion, optimizer = model_and_optimizer(args)
    calls = []
    steps = batches * 6  # 12 steps: printed at 0, 10 and the last, 11
    stats = train_one_epoch(
        model,
        criterion,
        steps,
        optimizer,
        torch.device("cpu"),
        epoch=0,
        log_step=lambda i, values: calls.append((i, values)),
    )
    assert [i for i, _ in calls] == [0, 10, 11]
    for _, values in calls:
        assert values.keys() == stats.keys()
        assert values["lr"] == optimizer.param_groups[0]["lr"]
        # The total is the weighted sum of the step's own terms (1, 5, 2 for ce, bbox, giou, per decoder layer).
        terms = [k for k in values if k.startswith("loss_") and not k.endswith("_unscaled")]
        assert values["loss"] == pytest.approx(sum(values[k] for k in terms), rel=1e-5)
    # The last step's values, not an average: they differ from the epoch's means.
    assert calls[-1][1]["loss"] != pytest.approx(stats["loss"], rel=1e-6)


# What reads a tensor to the host: on a GPU each such read waits for all the work queued before it.
HOST_READS = ("item", "cpu", "tolist", "__bool__", "__float__", "__int__")


def count_host_reads(monkeypatch, record: list) -> None:
    """Append the name of every host read of a tensor to `record`, by wrapping the Tensor methods that do one."""

    def counting(name, original):
        def counted(self, *args, **kwargs):
            record.append(name)
            return original(self, *args, **kwargs)

        return counted

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))


class MarkedSteps:
    """The batches of an epoch, marking in `record` where each step begins."""

    def __init__(self, batches, record: list):
        self.batches, self.record = batches, record

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            self.record.append("step")
            yield batch


def test_a_training_step_reads_from_the_device_only_where_it_must(args, batches, monkeypatch):
    model, criterion, optimizer = model_and_optimizer(args)
    record = []
    count_host_reads(monkeypatch, record)
    # Three steps: 0 and the last, 2, are printed; 1 is not.
    train_one_epoch(model, criterion, MarkedSteps(batches + batches[:1], record), optimizer, torch.device("cpu"), 0)
    monkeypatch.undo()
    per_step = [Counter(reads.split()) for reads in " ".join(record).split("step")[1:]]

    layers = args.dec_layers  # 2; every layer is matched and supervised (aux_loss)
    # Per step and decoder layer: the cost matrix to the host for scipy's Hungarian solver (one .cpu()), and the
    # check for degenerate boxes of generalized_box_iou, in the matcher and in the GIoU loss (one bool each). Once per
    # step: the total loss's finiteness (one .item()), so that a non-finite loss stops training before its step
    # changes the weights. num_boxes, the logged values and the loss scale stay on the device.
    not_printed = Counter({"cpu": layers, "__bool__": 2 * layers, "item": 1})
    assert per_step[1] == not_printed
    # A printed step adds one read: every logged value in one .tolist(). The last step was printed, so the epoch's
    # averages need no more.
    assert per_step[0] == per_step[2] == not_printed + Counter({"tolist": 1})


def test_the_float16_step_leaves_the_loss_scale_on_the_device(monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    record = []
    count_host_reads(monkeypatch, record)
    taken = optimizer_step(model(torch.ones(4, 3)).sum(), model, optimizer, 0.1, scaler)
    monkeypatch.undo()
    # One read, within GradScaler.step: whether a gradient overflowed, to skip the optimizer's step.
    assert record == ["item"]
    assert isinstance(taken, torch.Tensor) and bool(taken)
    model.weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    assert not bool(optimizer_step(model(torch.ones(4, 3)).sum(), model, optimizer, 0.1, scaler))
    assert scaler.get_scale() == 4.0


def test_max_norm_clips_the_gradient_and_zero_disables_it(args, batches):
    norms = {}
    for max_norm in (0.0, 0.1):
        model, criterion, optimizer = model_and_optimizer(args)
        train_one_epoch(model, criterion, batches[:1], optimizer, torch.device("cpu"), epoch=0, max_norm=max_norm)
        norms[max_norm] = total_grad_norm(model)  # the gradient of the step, as the step saw it
    assert norms[0.0] > 1  # an untrained DETR's gradient is large: clipping has work to do
    assert norms[0.1] == pytest.approx(0.1, rel=1e-4)


def test_a_non_finite_loss_exits_before_the_step(args, batches, capsys):
    model, criterion, optimizer = model_and_optimizer(args)
    # Parameters, not buffers: trainable batch norm updates its running statistics in the forward pass,
    # before any loss exists; what must not happen is the optimizer step.
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    forward = criterion.forward

    def infinite_boxes(outputs, targets):
        losses = forward(outputs, targets)
        losses["loss_bbox_0"] = losses["loss_bbox_0"] + math.inf
        return losses

    criterion.forward = infinite_boxes
    with pytest.raises(SystemExit) as raised:
        train_one_epoch(model, criterion, batches, optimizer, torch.device("cpu"), epoch=0, max_norm=0.1)
    assert raised.value.code == 1
    printed = capsys.readouterr().out
    assert "Loss is inf, stopping training" in printed and "'loss_bbox_0': inf" in printed
    assert "'loss_ce': " in printed
    for k, v in model.named_parameters():
        assert torch.equal(v, before[k]), k
    assert optimizer.state_dict()["state"] == {}


def run_evaluation(model, args, dataset, batch_size=2):
    _, criterion, postprocessors = build_model(args)
    loader = DataLoader(dataset, batch_size, sampler=SequentialSampler(dataset), collate_fn=utils.collate_fn)
    return evaluate(
        model, criterion, postprocessors, loader, get_coco_api_from_dataset(dataset), torch.device("cpu"), output_dir=""
    )


def test_evaluating_the_ground_truth_scores_ap_1(args, val_dataset):
    oracle = OracleDETR(val_dataset, num_classes=6, num_queries=args.num_queries)
    stats, coco_evaluator = run_evaluation(oracle, args, val_dataset)
    assert sorted(coco_evaluator.img_ids) == sorted(val_dataset.ids)
    ap = stats["coco_eval_bbox"]
    assert len(ap) == 12
    assert ap[0] == pytest.approx(1.0) and ap[1] == pytest.approx(1.0) and ap[2] == pytest.approx(1.0)
    assert ap[8] == pytest.approx(1.0)  # AR with 100 detections: every object found
    # Losses of exact boxes with confident classes.
    assert stats["loss_bbox_unscaled"] == pytest.approx(0, abs=1e-5)
    assert stats["loss_giou_unscaled"] == pytest.approx(0, abs=1e-5)
    assert stats["class_error"] == 0 and stats["cardinality_error_unscaled"] == 0
    assert stats["loss"] == pytest.approx(stats["loss_ce"], rel=1e-3)


def test_per_class_results_name_each_category_and_its_ap(args, val_dataset):
    oracle = OracleDETR(val_dataset, num_classes=6, num_queries=args.num_queries, noise=0.08)
    stats, coco_evaluator = run_evaluation(oracle, args, val_dataset)
    rows = coco_evaluator.per_class["bbox"]
    names = {c["id"]: c["name"] for c in val_dataset.coco.dataset["categories"]}
    assert [(r["id"], r["name"]) for r in rows] == sorted(names.items())
    present = {a["category_id"] for a in val_dataset.coco.dataset["annotations"]}
    with_ground_truth = [r for r in rows if r["id"] in present]
    assert all(r["AP"] is None for r in rows if r["id"] not in present)
    assert all(0 <= r["AP"] <= r["AP50"] <= 1 for r in with_ground_truth)
    # COCO's AP is the mean over the categories with ground truth of their own AP.
    assert sum(r["AP"] for r in with_ground_truth) / len(with_ground_truth) == pytest.approx(
        stats["coco_eval_bbox"][0], rel=1e-9
    )
    table = per_class_table(coco_evaluator.per_class).splitlines()
    assert table[0].split() == ["category", "bbox", "AP", "bbox", "AP50", "bbox", "AP75"]
    first = with_ground_truth[0]
    line = next(line for line in table[1:] if line.split()[0] == first["name"])
    assert line.split()[1:] == [f"{100 * first[k]:.1f}" for k in ("AP", "AP50", "AP75")]


def test_evaluating_noisy_boxes_scores_between_0_and_1_whatever_the_batch_size(args, val_dataset):
    oracle = OracleDETR(val_dataset, num_classes=6, num_queries=args.num_queries, noise=0.08)
    stats, _ = run_evaluation(oracle, args, val_dataset, batch_size=2)
    assert 0.05 < stats["coco_eval_bbox"][0] < 0.95
    assert stats["coco_eval_bbox"][1] > stats["coco_eval_bbox"][0]  # AP50 is easier than AP
    assert stats["loss_bbox_unscaled"] > 0.01
    # Batching changes the losses' averaging, never the COCO metrics.
    stats_3, _ = run_evaluation(oracle, args, val_dataset, batch_size=3)
    assert stats_3["coco_eval_bbox"] == stats["coco_eval_bbox"]


def test_amp_runs_the_forward_in_bfloat16_and_returns_float32(args, batches):
    model, _, _ = model_and_optimizer(args)
    model.eval()
    samples, _ = batches[0]
    cpu = torch.device("cpu")
    with torch.no_grad():
        full = run_model(model, samples, cpu)
        half = run_model(model, samples, cpu, amp=True)
    for key in ("pred_logits", "pred_boxes"):
        assert half[key].dtype == torch.float32
        assert half["aux_outputs"][0][key].dtype == torch.float32
        difference = (half[key] - full[key]).abs().max().item()
        # bfloat16 keeps 8 bits of mantissa: close to fp32, but not equal (so autocast did run).
        assert 0 < difference < 0.1, (key, difference)
    assert torch.equal(run_model(model, samples, cpu)["pred_boxes"], full["pred_boxes"])


def same_matching(match, record: list, replay: bool):
    """`match` that appends what it returns to `record`, or with `replay`, returns what `record` holds, in order."""

    def forward(outputs, targets):
        if replay:
            return record.pop(0)
        record.append(match(outputs, targets))
        return record[-1]

    return forward


def test_amp_training_steps_like_fp32_within_bfloat16_precision(args, batches):
    cpu = torch.device("cpu")
    model, criterion, optimizer = model_and_optimizer(args)
    fp32 = train_one_epoch(model, criterion, batches, optimizer, cpu, epoch=0, max_norm=0.1)
    model_amp, criterion_amp, optimizer_amp = model_and_optimizer(args)
    bf16 = train_one_epoch(model_amp, criterion_amp, batches, optimizer_amp, cpu, epoch=0, max_norm=0.1, amp=True)
    assert math.isfinite(bf16["loss"]) and bf16["loss"] != fp32["loss"]
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=0.02)
    # Adam's first steps are nearly sign(gradient), so compare gradients: from the same weights and batch, the
    # bfloat16 forward gives nearly the fp32 gradient. With the same matching: where two queries nearly tie for an
    # object, rounding may pick the other one, a different loss rather than a less precise one.
    samples, targets = batches[0]
    grads, matchings = [], []
    for amp in (False, True):
        model, criterion, _ = model_and_optimizer(args)
        criterion.matcher.forward = same_matching(criterion.matcher.forward, matchings, replay=amp)
        loss_dict = criterion(run_model(model, samples, cpu, amp), targets)
        sum(loss_dict[k] * criterion.weight_dict[k] for k in loss_dict if k in criterion.weight_dict).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert matchings == []  # the bfloat16 pass took every matching of the fp32 one
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0).item() > 0.99
    assert grads[1].norm().item() == pytest.approx(grads[0].norm().item(), rel=0.05)


def test_amp_is_off_by_default_except_for_synthetic_data(synthetic_root):
    assert main_py.parse_args(["--coco_path", "coco"]).amp is False  # COCO keeps the original's fp32
    assert main_py.parse_args(["--coco_path", "coco", "--amp"]).amp is True
    # The synthetic datasets default to it; --no_amp wins, as every flag given does.
    assert main_py.parse_args(["--dataset_file", "synthetic"]).amp is True
    assert main_py.parse_args(tiny_flags(synthetic_root)).amp is False


def test_amp_with_the_mask_head_gives_float32_masks_and_finite_losses(args, batches):
    import copy

    mask_args = copy.copy(args)
    mask_args.masks = True
    # The mask head's group norms need multiples of 8.
    mask_args.hidden_dim, mask_args.nheads = MASK_HEAD_SIZES["hidden_dim"], MASK_HEAD_SIZES["nheads"]
    torch.manual_seed(0)
    model, criterion, _ = build_model(mask_args)
    samples, targets = batches[0]
    targets = [
        dict(t, masks=torch.zeros(len(t["labels"]), *samples.tensors.shape[-2:], dtype=torch.bool)) for t in targets
    ]
    outputs = run_model(model, samples, torch.device("cpu"), amp=True)
    assert outputs["pred_masks"].dtype == torch.float32
    loss_dict = criterion(outputs, targets)
    assert all(math.isfinite(v.item()) for v in loss_dict.values())
    assert "loss_mask" in loss_dict and "loss_dice" in loss_dict
