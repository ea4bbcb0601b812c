"""DETR as a detectron2 meta-architecture: this project's models/ behind detectron2's model interface.

Detr takes detectron2's batched inputs (a list of dicts with "image" [3, H, W] in 0-255 and, in training,
"instances"), runs this project's DETR (or DETRsegm with MODEL.MASK_ON) on a detectron2 ResNet, and returns the
weighted SetCriterion losses in training and per-image Instances at the original image size in inference.
"""

from argparse import Namespace
from typing import Dict, List

import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import BitMasks, Boxes, ImageList, Instances, PolygonMasks
from torch import Tensor, nn

from models.backbone import Joiner
from models.detr import DETR, PostProcess, SetCriterion
from models.matcher import HungarianMatcher
from models.position_encoding import build_position_encoding
from models.segmentation import DETRsegm, PostProcessSegm
from models.transformer import Transformer
from util.box_ops import box_xyxy_to_cxcywh
from util.checkpoint import load_checkpoint, load_state_dict_checked, model_state_from
from util.config import complete_args
from util.misc import NestedTensor


class MaskedBackbone(nn.Module):
    """A detectron2 backbone (cfg.MODEL.BACKBONE, a ResNet here) that takes and returns NestedTensors, as
    models/backbone.py's Backbone does: each returned stage carries the padding mask resized to its size.

    It returns the stages of MODEL.RESNETS.OUT_FEATURES in order, the last one being what the transformer
    reads; DETRsegm's mask head reads the finer ones before it (res2-res4)."""

    def __init__(self, cfg):
        super().__init__()
        self.backbone = build_backbone(cfg, ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN)))
        shapes = self.backbone.output_shape()
        self.feature_names = list(cfg.MODEL.RESNETS.OUT_FEATURES)
        self.num_channels = shapes[self.feature_names[-1]].channels
        # Stage number of the last feature (res5 -> 4, as in torchvision's layer4), which DETRsegm reads to size
        # its FPN inputs.
        self.last_layer = int(self.feature_names[-1][-1]) - 1

    def forward(self, tensor_list: NestedTensor) -> Dict[str, NestedTensor]:
        features = self.backbone(tensor_list.tensors)
        mask = tensor_list.mask
        assert mask is not None
        out: Dict[str, NestedTensor] = {}
        for name in self.feature_names:
            x = features[name]
            # Nearest resizing, as models/backbone.py does: a cell is padding when the pixel it samples is.
            out[name] = NestedTensor(x, F.interpolate(mask[None].float(), size=x.shape[-2:]).to(torch.bool)[0])
        return out


def build_detr(cfg) -> nn.Module:
    """This project's DETR (DETRsegm with MODEL.MASK_ON) from the MODEL.DETR keys, on a MaskedBackbone."""
    c = cfg.MODEL.DETR
    backbone = MaskedBackbone(cfg)
    # The encoding's flags from the config, the others of its builder at main.py's defaults.
    position = build_position_encoding(
        complete_args(Namespace(hidden_dim=c.HIDDEN_DIM, position_embedding=c.POSITION_EMBEDDING))
    )
    joiner = Joiner(backbone, position)
    joiner.num_channels = backbone.num_channels
    # The decoder always returns every layer (as main.py builds it); only the loss decides whether to use them.
    transformer = Transformer(
        d_model=c.HIDDEN_DIM,
        nhead=c.NHEADS,
        num_encoder_layers=c.ENC_LAYERS,
        num_decoder_layers=c.DEC_LAYERS,
        dim_feedforward=c.DIM_FEEDFORWARD,
        dropout=c.DROPOUT,
        normalize_before=c.PRE_NORM,
        return_intermediate_dec=True,
    )
    detr = DETR(
        joiner, transformer, num_classes=c.NUM_CLASSES, num_queries=c.NUM_OBJECT_QUERIES, aux_loss=c.DEEP_SUPERVISION
    )
    if not cfg.MODEL.MASK_ON:
        return detr
    if c.FROZEN_WEIGHTS:
        # The segmentation recipe's second stage: the trained detector is loaded, then frozen by DETRsegm.
        state = model_state_from(load_checkpoint(c.FROZEN_WEIGHTS), f"MODEL.DETR.FROZEN_WEIGHTS {c.FROZEN_WEIGHTS}")
        state = {k[len("detr.") :]: v for k, v in state.items() if k.startswith("detr.")}
        load_state_dict_checked(detr, state, f"MODEL.DETR.FROZEN_WEIGHTS {c.FROZEN_WEIGHTS}")
    return DETRsegm(detr, freeze_detr=bool(c.FROZEN_WEIGHTS))


def build_criterion(cfg) -> SetCriterion:
    """SetCriterion with the MODEL.DETR loss weights, for every decoder layer with DEEP_SUPERVISION."""
    c = cfg.MODEL.DETR
    bbox_weight = c.BBOX_WEIGHT if c.L1_WEIGHT is None else c.L1_WEIGHT
    matcher = HungarianMatcher(cost_class=c.CLASS_WEIGHT, cost_bbox=bbox_weight, cost_giou=c.GIOU_WEIGHT)
    weight_dict = {"loss_ce": c.CLASS_WEIGHT, "loss_bbox": bbox_weight, "loss_giou": c.GIOU_WEIGHT}
    losses = ["labels", "boxes", "cardinality"]
    if cfg.MODEL.MASK_ON:
        weight_dict.update(loss_mask=c.MASK_WEIGHT, loss_dice=c.DICE_WEIGHT)
        losses.append("masks")
    if c.DEEP_SUPERVISION:
        weight_dict.update({f"{k}_{i}": v for i in range(c.DEC_LAYERS - 1) for k, v in list(weight_dict.items())})
    return SetCriterion(
        c.NUM_CLASSES, matcher=matcher, weight_dict=weight_dict, eos_coef=c.NO_OBJECT_WEIGHT, losses=losses
    )


@META_ARCH_REGISTRY.register()
class Detr(nn.Module):
    """DETR in detectron2: MODEL.META_ARCHITECTURE "Detr". Its state_dict is that of this project's DETR (or
    DETRsegm) under "detr.", the backbone under detectron2's ResNet names (see d2/converter.py)."""

    def __init__(self, cfg):
        super().__init__()
        self.num_classes = cfg.MODEL.DETR.NUM_CLASSES
        self.mask_on = cfg.MODEL.MASK_ON
        self.detr = build_detr(cfg)
        # Kept out of the module tree (no nn.Module attribute): its one buffer, the no-object weight, follows
        # from the config, so that checkpoints hold the model's weights only, exactly main.py's keys.
        self.__dict__["criterion"] = build_criterion(cfg).to(cfg.MODEL.DEVICE)
        self.postprocess = PostProcess()
        self.postprocess_masks = PostProcessSegm()
        # Not saved either: detectron2's default checkpoints store them, main.py's do not.
        self.register_buffer("pixel_mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1), persistent=False)
        if cfg.INPUT.FORMAT != "RGB":
            # This project's backbones (and the published checkpoints) were trained on RGB.
            raise ValueError(f"INPUT.FORMAT must be RGB for Detr, got {cfg.INPUT.FORMAT!r}")

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: List[Dict]) -> NestedTensor:
        """Normalize and pad the images into one batch, with DETR's padding mask (True on padding)."""
        images = [(x["image"].to(self.device).float() - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        # Padded with zeros to the largest image, as util.misc.nested_tensor_from_tensor_list pads main.py's.
        images = ImageList.from_tensors(images)
        mask = torch.ones(images.tensor.shape[:1] + images.tensor.shape[2:], dtype=torch.bool, device=self.device)
        for m, (h, w) in zip(mask, images.image_sizes):
            m[:h, :w] = False
        return NestedTensor(images.tensor, mask)

    def forward(self, batched_inputs: List[Dict]):
        """Training: a dict of weighted losses. Inference: [{"instances": Instances}] at each input's "height"
        and "width" (the original size), with pred_boxes, scores, pred_classes (and pred_masks)."""
        samples = self.preprocess_image(batched_inputs)
        outputs = self.detr(samples)
        if self.training:
            targets = self.prepare_targets(batched_inputs)
            loss_dict = self.criterion(outputs, targets)
            weights = self.criterion.weight_dict
            # The unweighted terms (class_error, cardinality_error) are for logging in main.py; detectron2 sums
            # every entry it gets, so only the weighted losses are returned.
            return {k: v * weights[k] for k, v in loss_dict.items() if k in weights}
        return self.inference(outputs, batched_inputs, samples)

    def prepare_targets(self, batched_inputs: List[Dict]) -> List[Dict[str, Tensor]]:
        """Instances (boxes in absolute xyxy of the augmented image) -> SetCriterion's targets: labels, boxes
        as (cx, cy, w, h) normalized by the image's own size, masks [n, h, w] with MODEL.MASK_ON."""
        targets = []
        for x in batched_inputs:
            instances = x["instances"].to(self.device)
            h, w = instances.image_size
            scale = torch.as_tensor([w, h, w, h], dtype=torch.float32, device=self.device)
            target = {"labels": instances.gt_classes, "boxes": box_xyxy_to_cxcywh(instances.gt_boxes.tensor) / scale}
            if self.mask_on:
                target["masks"] = self.target_masks(instances, h, w)
            targets.append(target)
        return targets

    def target_masks(self, instances: Instances, h: int, w: int) -> Tensor:
        """Bit masks [n, h, w] of the instances (detectron2 gives none for an image without objects)."""
        if not instances.has("gt_masks"):
            return torch.zeros((len(instances), h, w), dtype=torch.bool, device=self.device)
        masks = instances.gt_masks
        if isinstance(masks, PolygonMasks):
            masks = BitMasks.from_polygon_masks(masks, h, w)
        return masks.tensor.to(self.device)

    @torch.no_grad()
    def inference(
        self, outputs: Dict[str, Tensor], batched_inputs: List[Dict], samples: NestedTensor
    ) -> List[Dict[str, Instances]]:
        """main.py's post-processors: per query its best class, boxes scaled from normalized straight to the
        original size (no clipping, as main.py's evaluation), masks upsampled from the padded batch."""
        not_padding = ~samples.mask
        input_sizes = torch.stack([not_padding[:, :, 0].sum(1), not_padding[:, 0, :].sum(1)], 1)
        original_sizes = torch.as_tensor(
            [[x.get("height", int(s[0])), x.get("width", int(s[1]))] for x, s in zip(batched_inputs, input_sizes)],
            device=self.device,
        )
        results = self.postprocess(outputs, original_sizes)
        if self.mask_on:
            results = self.postprocess_masks(results, outputs, original_sizes, input_sizes)
        processed = []
        for r, (h, w) in zip(results, original_sizes.tolist()):
            instances = Instances((h, w))
            instances.pred_boxes = Boxes(r["boxes"])
            instances.scores = r["scores"]
            instances.pred_classes = r["labels"]
            if self.mask_on:
                instances.pred_masks = r["masks"][:, 0].bool()
            processed.append({"instances": instances})
        return processed
