"""DETR: the detector, its set-prediction loss (SetCriterion) and the box post-processor."""

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from util import box_ops
from util.amp import autocast_enabled
from util.misc import (
    NestedTensor,
    accuracy,
    get_world_size,
    interpolate,
    is_dist_avail_and_initialized,
    nested_tensor_from_tensor_list,
    to_nested_tensor,
)

from .segmentation import dice_loss, sigmoid_focal_loss


class DETR(nn.Module):
    """Backbone -> 1x1 projection -> transformer -> per-query class logits and boxes.

    forward takes a NestedTensor (padded batch + mask), a 4-D batch [B, 3, H, W], or a list of [3, H, W]
    images of any sizes, and returns a dict with
      pred_logits [B, num_queries, num_classes + 1] (the last class is "no object"),
      pred_boxes  [B, num_queries, 4]: (cx, cy, w, h) normalized by each image's own (unpadded) size,
      aux_outputs (with aux_loss): the same two entries for every decoder layer but the last.
    An extension that produces the decoder's queries otherwise (models/two_stage.py) subclasses it and
    overrides _build_queries, predict and mask_attention_inputs.
    """

    def __init__(
        self, backbone: nn.Module, transformer: nn.Module, num_classes: int, num_queries: int, aux_loss: bool = False
    ):
        super().__init__()
        self.num_queries = num_queries
        self.transformer = transformer
        hidden_dim = transformer.d_model
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self._build_queries(hidden_dim, num_classes)
        self.input_proj = nn.Conv2d(backbone.num_channels, hidden_dim, kernel_size=1)
        self.backbone = backbone
        self.aux_loss = aux_loss

    def _build_queries(self, hidden_dim: int, num_classes: int) -> None:
        # The object queries: num_queries learned position embeddings, one per detection slot.
        self.query_embed = nn.Embedding(self.num_queries, hidden_dim)

    def forward(self, samples: NestedTensor):
        """samples: a NestedTensor, a list of [3, H_i, W_i] images, or a [B, 3, H, W] batch; see the class."""
        if not isinstance(samples, NestedTensor):
            samples = to_nested_tensor(samples)
        features, pos = self.backbone(samples)
        src, mask = features[-1].decompose()
        assert mask is not None
        out, _, _, _ = self.predict(self.input_proj(src), mask, pos[-1])
        return out

    def predict(self, src: Tensor, mask: Tensor, pos: Tensor) -> Tuple[Dict[str, Tensor], Tensor, Tensor, Tensor]:
        """From the projected features src [B, d, H, W] with their padding mask and position encoding:
        (the output dict of forward, the decoder states [layers, B, Q, d], the encoder memory [B, d, H, W], the
        decoder's input queries, content plus position embedding [B, Q, d])."""
        hs, memory = self.transformer(src, mask, self.query_embed.weight, pos)
        queries = self.query_embed.weight.unsqueeze(0).expand(hs.shape[1], -1, -1)  # zero content
        outputs_class, box_logits = self.output_heads(hs)
        return self._outputs(outputs_class, box_logits.sigmoid()), hs, memory, queries

    def output_heads(self, hs: Tensor) -> Tuple[Tensor, Tensor]:
        """(class logits, boxes before the sigmoid) from decoder states hs [..., d]; in float32 under autocast."""
        if not torch.jit.is_scripting() and autocast_enabled(hs.device.type):
            return self._output_heads_in_float32(hs)
        return self.class_embed(hs), self.bbox_embed(hs)

    @torch.jit.unused
    def _output_heads_in_float32(self, hs: Tensor) -> Tuple[Tensor, Tensor]:
        # A box computed in bfloat16 lies on its grid, up to 1/512 of the image side off (2 px at 1066 px),
        # which moves the matching, the box losses and AP75. The heads take the states as the decoder left them
        # and cost little next to the transformer, so they run in float32.
        with torch.autocast(hs.device.type, enabled=False):
            return self.output_heads(hs.float())

    def mask_attention_inputs(self, hs: Tensor, memory: Tensor, queries: Tensor, pos: Tensor) -> Tuple[Tensor, Tensor]:
        """What the mask head's attention (DETRsegm) compares: the last decoder layer's states with the encoder
        memory. queries and pos (the position encoding) are there for extensions (models/two_stage.py)."""
        return hs[-1], memory

    def _outputs(self, outputs_class: Tensor, outputs_coord: Tensor) -> Dict[str, Tensor]:
        """The output dict from every decoder layer's logits and boxes [layers, B, Q, ...]."""
        out = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        # TorchScript cannot type a dict mixing tensors and lists or dicts: scripted models (export, inference)
        # return the final layer only.
        if not torch.jit.is_scripting():
            if self.aux_loss:
                out["aux_outputs"] = self._set_aux_loss(outputs_class, outputs_coord)
        return out

    @torch.jit.unused
    def _set_aux_loss(self, outputs_class: Tensor, outputs_coord: Tensor):
        # A list of dicts is not a TorchScript Dict[str, Tensor] value, so scripting leaves this out (use
        # aux_loss=False for a scripted model, as the hub models do).
        return [{"pred_logits": a, "pred_boxes": b} for a, b in zip(outputs_class[:-1], outputs_coord[:-1])]


class SetCriterion(nn.Module):
    """The DETR loss: match predictions to targets (Hungarian), then supervise each matched pair.

    losses is a subset of 'labels', 'boxes', 'cardinality', 'masks'. With aux_outputs present, every
    decoder layer is matched and supervised on its own, its terms suffixed _0, _1, ...
    """

    def __init__(
        self, num_classes: int, matcher: nn.Module, weight_dict: Dict[str, float], eos_coef: float, losses: List[str]
    ):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.losses = losses
        # Most queries match nothing; down-weighting the "no object" class keeps it from swamping the
        # classification loss (the paper's factor 10).
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def loss_labels(self, outputs, targets, indices, num_boxes, log: bool = True) -> Dict[str, Tensor]:
        """Cross-entropy over all queries; unmatched ones target the no-object class."""
        src_logits = outputs["pred_logits"]
        idx = _get_src_permutation_idx(indices)
        target_classes_o = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        target_classes = torch.full(src_logits.shape[:2], self.num_classes, dtype=torch.int64, device=src_logits.device)
        target_classes[idx] = target_classes_o
        losses = {"loss_ce": F.cross_entropy(src_logits.transpose(1, 2), target_classes, self.empty_weight)}
        if log:
            # Logged only: the error rate of the matched queries' classes.
            losses["class_error"] = 100 - accuracy(src_logits[idx], target_classes_o)[0]
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs, targets, indices, num_boxes) -> Dict[str, Tensor]:
        """Logged only: |number of queries not predicting no-object - number of targets|, averaged."""
        pred_logits = outputs["pred_logits"]
        tgt_lengths = torch.as_tensor([len(t["labels"]) for t in targets], device=pred_logits.device)
        card_pred = (pred_logits.argmax(-1) != pred_logits.shape[-1] - 1).sum(1)
        return {"cardinality_error": F.l1_loss(card_pred.float(), tgt_lengths.float())}

    def loss_boxes(self, outputs, targets, indices, num_boxes) -> Dict[str, Tensor]:
        """L1 and GIoU between matched boxes, both normalized cxcywh, summed and divided by num_boxes."""
        idx = _get_src_permutation_idx(indices)
        src_boxes = outputs["pred_boxes"][idx]
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)], dim=0)
        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none")
        loss_giou = 1 - torch.diag(
            box_ops.generalized_box_iou(box_ops.box_cxcywh_to_xyxy(src_boxes), box_ops.box_cxcywh_to_xyxy(target_boxes))
        )
        return {"loss_bbox": loss_bbox.sum() / num_boxes, "loss_giou": loss_giou.sum() / num_boxes}

    def loss_masks(self, outputs, targets, indices, num_boxes) -> Dict[str, Tensor]:
        """Focal and dice losses between matched predicted masks (upsampled) and the target masks."""
        src_idx = _get_src_permutation_idx(indices)
        tgt_idx = _get_tgt_permutation_idx(indices)
        src_masks = outputs["pred_masks"][src_idx]
        target_masks, _ = nested_tensor_from_tensor_list([t["masks"] for t in targets]).decompose()
        target_masks = target_masks.to(src_masks)[tgt_idx]
        # Predictions are at 1/4 of the feature resolution; compare at the (padded) image resolution.
        src_masks = interpolate(src_masks[:, None], size=target_masks.shape[-2:], mode="bilinear", align_corners=False)
        src_masks = src_masks[:, 0].flatten(1)
        target_masks = target_masks.flatten(1).view(src_masks.shape)
        return {
            "loss_mask": sigmoid_focal_loss(src_masks, target_masks, num_boxes),
            "loss_dice": dice_loss(src_masks, target_masks, num_boxes),
        }

    def get_loss(self, loss: str, outputs, targets, indices, num_boxes, **kwargs) -> Dict[str, Tensor]:
        loss_map = {
            "labels": self.loss_labels,
            "cardinality": self.loss_cardinality,
            "boxes": self.loss_boxes,
            "masks": self.loss_masks,
        }
        if loss not in loss_map:
            raise ValueError(f"unknown loss {loss!r}; expected one of {sorted(loss_map)}")
        return loss_map[loss](outputs, targets, indices, num_boxes, **kwargs)

    def _intermediate_losses(self, outputs, targets, indices, num_boxes, suffix: str) -> Dict[str, Tensor]:
        """The losses of an intermediate prediction (a decoder layer but the last, or an extension's proposals),
        their names suffixed: no masks (too costly) and no logged class error."""
        losses: Dict[str, Tensor] = {}
        for loss in self.losses:
            if loss == "masks":
                continue
            kwargs = {"log": False} if loss == "labels" else {}
            l_dict = self.get_loss(loss, outputs, targets, indices, num_boxes, **kwargs)
            losses.update({k + suffix: v for k, v in l_dict.items()})
        return losses

    def num_boxes(self, targets: List[Dict[str, Tensor]], device: torch.device) -> Tensor:
        """The number of target boxes per process, at least 1: the box losses are averaged over the targets of
        the whole (distributed) batch, so every process divides by the same number."""
        return self.mean_count(sum(len(t["labels"]) for t in targets), device)

    @staticmethod
    def mean_count(count: int, device: torch.device) -> Tensor:
        """count averaged over the processes of a distributed run (count itself in a single process), at least 1:
        a float32 scalar on `device`. It stays there, since reading it to the host would wait for the GPU; the
        losses divided by it are bit for bit those divided by its value as a Python float, on the CPU."""
        total = torch.full((), float(count), dtype=torch.float32, device=device)  # filled there: no copy
        if is_dist_avail_and_initialized():
            torch.distributed.all_reduce(total)
        return torch.clamp(total / get_world_size(), min=1)

    def forward(self, outputs: Dict, targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """outputs: the model's dict; targets: per image, 'labels' [n] and 'boxes' [n, 4] normalized cxcywh
        (and 'masks' [n, H, W] for the mask loss). Returns every loss term, weighted by nothing."""
        outputs_without_aux = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        indices = self.matcher(outputs_without_aux, targets)
        num_boxes = self.num_boxes(targets, outputs["pred_logits"].device)

        losses: Dict[str, Tensor] = {}
        for loss in self.losses:
            losses.update(self.get_loss(loss, outputs, targets, indices, num_boxes))

        for i, aux_outputs in enumerate(outputs.get("aux_outputs", [])):
            indices = self.matcher(aux_outputs, targets)
            losses.update(self._intermediate_losses(aux_outputs, targets, indices, num_boxes, f"_{i}"))
        return losses


def _get_src_permutation_idx(indices: List[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src_idx = torch.cat([src for (src, _) in indices])
    return batch_idx, src_idx


def _get_tgt_permutation_idx(indices: List[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
    batch_idx = torch.cat([torch.full_like(tgt, i) for i, (_, tgt) in enumerate(indices)])
    tgt_idx = torch.cat([tgt for (_, tgt) in indices])
    return batch_idx, tgt_idx


class PostProcess(nn.Module):
    """Model outputs -> per image {'scores', 'labels', 'boxes'} with boxes in absolute xyxy pixels."""

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], target_sizes: Tensor) -> List[Dict[str, Tensor]]:
        """target_sizes [B, 2]: each image's (height, width), usually its original size."""
        out_logits, out_bbox = outputs["pred_logits"], outputs["pred_boxes"]
        if len(out_logits) != len(target_sizes) or target_sizes.shape[1] != 2:
            raise ValueError(
                f"target_sizes must be [batch, 2] = [{len(out_logits)}, 2], got {list(target_sizes.shape)}"
            )
        prob = F.softmax(out_logits, -1)
        scores, labels = prob[..., :-1].max(-1)
        boxes = box_ops.box_cxcywh_to_xyxy(out_bbox)
        img_h, img_w = target_sizes.unbind(1)
        scale = torch.stack([img_w, img_h, img_w, img_h], dim=1).to(boxes.dtype)
        boxes = boxes * scale[:, None, :]
        return [{"scores": s, "labels": c, "boxes": b} for s, c, b in zip(scores, labels, boxes)]


class MLP(nn.Module):
    """A plain multi-layer perceptron with ReLU between layers (the box head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        self.num_layers = num_layers
        dims = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + dims, dims + [output_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return x
