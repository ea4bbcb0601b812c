"""The config keys of the detectron2 wrapper: MODEL.DETR.*, the optimizer choice and the crop's first resize."""

from detectron2.config import CfgNode as CN


def add_detr_config(cfg: CN) -> None:
    """Add the wrapper's keys, with main.py's defaults, to a detectron2 config (get_cfg()) in place."""
    cfg.MODEL.DETR = CN()
    # Classes of the dataset as detectron2 numbers them (0..NUM_CLASSES-1, contiguous); the class head has one
    # more output, "no object". 80 for COCO, where main.py's head has 91 (the largest COCO category id + 1).
    cfg.MODEL.DETR.NUM_CLASSES = 80
    # A detector checkpoint (the wrapper's format) to load and freeze before the mask head is added:
    # the second stage of the segmentation recipe (MODEL.MASK_ON). Empty: nothing is frozen.
    cfg.MODEL.DETR.FROZEN_WEIGHTS = ""

    # Loss weights; the Hungarian matcher weighs its costs the same way (main.py's --set_cost_* defaults
    # equal its --*_loss_coef defaults).
    cfg.MODEL.DETR.CLASS_WEIGHT = 1.0
    cfg.MODEL.DETR.BBOX_WEIGHT = 5.0
    # The original wrapper's name for BBOX_WEIGHT, so that its configs load; when set, it is the one used.
    cfg.MODEL.DETR.L1_WEIGHT = None
    cfg.MODEL.DETR.GIOU_WEIGHT = 2.0
    cfg.MODEL.DETR.MASK_WEIGHT = 1.0
    cfg.MODEL.DETR.DICE_WEIGHT = 1.0
    # Weight of the no-object class in the classification loss (main.py's --eos_coef).
    cfg.MODEL.DETR.NO_OBJECT_WEIGHT = 0.1
    # A loss on every decoder layer's predictions, not only the last (main.py's aux loss; --no_aux_loss off).
    cfg.MODEL.DETR.DEEP_SUPERVISION = True

    # The transformer (main.py's --hidden_dim, --nheads, --enc_layers, --dec_layers, --dim_feedforward,
    # --dropout, --pre_norm, --num_queries, --position_embedding).
    cfg.MODEL.DETR.HIDDEN_DIM = 256
    cfg.MODEL.DETR.NHEADS = 8
    cfg.MODEL.DETR.ENC_LAYERS = 6
    cfg.MODEL.DETR.DEC_LAYERS = 6
    cfg.MODEL.DETR.DIM_FEEDFORWARD = 2048
    cfg.MODEL.DETR.DROPOUT = 0.1
    cfg.MODEL.DETR.PRE_NORM = False
    cfg.MODEL.DETR.NUM_OBJECT_QUERIES = 100
    cfg.MODEL.DETR.POSITION_EMBEDDING = "sine"

    # "ADAMW" (DETR's optimizer) or "SGD" (detectron2's default).
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    # The backbone's learning rate is BASE_LR times this (main.py: --lr_backbone 1e-5 = 0.1 x --lr 1e-4).
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1

    # The crop branch of DETR's training augmentation first resizes the shorter side to one of these, then
    # crops (INPUT.CROP.SIZE, "absolute_range"), then resizes as the other branch does (INPUT.MIN_SIZE_TRAIN).
    cfg.INPUT.CROP.RESIZE_BEFORE = (400, 500, 600)
