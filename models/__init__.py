"""DETR models: build_model(args) -> (model, criterion, postprocessors)."""

import torch

from util.misc import original_is_thing_map, original_num_classes

from .backbone import build_backbone
from .detr import DETR, PostProcess, SetCriterion
from .matcher import build_matcher
from .segmentation import DETRsegm, PostProcessPanoptic, PostProcessSegm
from .transformer import build_transformer
from .train_only import TrainOnlyCriterion, TrainOnlyDETR, train_only_weight_dict, uses_train_only
from .two_stage import TwoStageCriterion, TwoStageDETR, check_learned_queries


def build_model(args):
    """The model, its loss and its post-processors, from the parsed main.py flags (a full namespace of
    main.get_args_parser()). main.py sets num_classes and, for panoptic data, thing_classes from the dataset
    (datasets.num_classes, datasets.thing_classes); a namespace without them gets the original DETR's choice."""
    check_learned_queries(args.learned_queries, args.num_queries, args.two_stage)
    num_classes = args.num_classes or original_num_classes(args.dataset_file)
    device = torch.device(args.device)

    backbone = build_backbone(args)
    transformer = build_transformer(args)
    matcher = build_matcher(args)
    weight_dict = {"loss_ce": 1, "loss_bbox": args.bbox_loss_coef, "loss_giou": args.giou_loss_coef}
    if args.masks:
        weight_dict["loss_mask"] = args.mask_loss_coef
        weight_dict["loss_dice"] = args.dice_loss_coef
    if args.aux_loss:
        aux_weight_dict = {}
        for i in range(args.dec_layers - 1):
            aux_weight_dict.update({f"{k}_{i}": v for k, v in weight_dict.items()})
        weight_dict.update(aux_weight_dict)
    losses = ["labels", "boxes", "cardinality"]
    if args.masks:
        losses += ["masks"]
    thing_classes = args.thing_classes  # set by main.py from panoptic data; None elsewhere

    # The one place the --two_stage extension (models/two_stage.py) plugs in: its model and its loss.
    if args.two_stage:
        model = TwoStageDETR(
            backbone,
            transformer,
            num_classes=num_classes,
            num_queries=args.num_queries,
            aux_loss=args.aux_loss,
            query_nms=args.query_nms,
            learned_queries=args.learned_queries,
            # With --proposal_radius, neighbouring tokens learn to propose the same object: without the NMS in
            # training, the decoder would train on clusters of duplicates and meet distinct queries at evaluation.
            query_nms_in_training=args.proposal_radius > 0,
        )
        weight_dict.update(
            {"loss_ce_enc": 1, "loss_bbox_enc": args.bbox_loss_coef, "loss_giou_enc": args.giou_loss_coef}
        )
        # Beside learned queries, the proposals learn the thing classes of panoptic data only.
        criterion = TwoStageCriterion(
            num_classes,
            matcher=matcher,
            weight_dict=weight_dict,
            eos_coef=args.eos_coef,
            losses=losses,
            proposal_classes=thing_classes if args.learned_queries else None,
            proposal_radius=args.proposal_radius,
        )
    elif uses_train_only(args):
        # The one place the training-only supervision (models/train_only.py) plugs in: in eval mode the model is
        # DETR, and its state_dict DETR's.
        body = backbone[0]
        model = TrainOnlyDETR(
            backbone,
            transformer,
            num_classes=num_classes,
            num_queries=args.num_queries,
            aux_loss=args.aux_loss,
            query_groups=args.query_groups,
            hybrid_queries=args.hybrid_queries,
            dn_groups=args.dn_groups,
            dn_label_noise=args.dn_label_noise,
            dn_box_noise=args.dn_box_noise,
            dense_aux=args.dense_aux,
            dense_queries=args.dense_queries,
            query_init=args.query_init,
            dense_boxes=args.dense_boxes,
            position_aux=args.position_aux > 0,
            # A stage's channels: each stage doubles them, up to the body's last.
            dense_channels=body.num_channels >> (body.last_layer - int(args.dense_aux[-1]))
            if args.dense_aux.startswith("layer")
            else 0,
        )
        weight_dict.update(train_only_weight_dict(weight_dict, args))
        criterion = TrainOnlyCriterion(
            num_classes,
            matcher=matcher,
            weight_dict=weight_dict,
            eos_coef=args.eos_coef,
            losses=losses,
            num_queries=args.num_queries,
            hybrid_repeats=args.hybrid_repeats,
            dense_radius=args.dense_radius,
            train_only_epochs=args.train_only_epochs,
        )
    else:
        model = DETR(
            backbone, transformer, num_classes=num_classes, num_queries=args.num_queries, aux_loss=args.aux_loss
        )
        criterion = SetCriterion(
            num_classes, matcher=matcher, weight_dict=weight_dict, eos_coef=args.eos_coef, losses=losses
        )
    criterion.to(device)
    if args.masks:
        model = DETRsegm(model, freeze_detr=(args.frozen_weights is not None), attention_gain=args.mask_attention_gain)

    postprocessors = {"bbox": PostProcess()}
    if args.masks:
        postprocessors["segm"] = PostProcessSegm()
        if thing_classes is not None:
            things = set(thing_classes)
            is_thing_map = {i: i in things for i in range(num_classes + 1)}
        else:
            is_thing_map = original_is_thing_map(args.dataset_file)
        if is_thing_map is not None:
            postprocessors["panoptic"] = PostProcessPanoptic(is_thing_map, threshold=args.panoptic_threshold)
    return model, criterion, postprocessors
