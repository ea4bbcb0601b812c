"""DETR: the detector, its set-prediction loss (SetCriterion) and the box post-processor."""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from util import box_ops
from util.misc import (NestedTensor, accuracy, get_world_size, interpolate, is_dist_avail_and_initialized,
                       nested_tensor_from_tensor_list)

from .backbone import build_backbone
from .matcher import build_matcher
from .transformer import build_transformer


class DETR(nn.Module):
    """Backbone -> 1x1 projection -> transformer -> per-query class logits and boxes.

    forward takes a NestedTensor (padded batch + mask), a 4-D batch [B, 3, H, W], or a list of [3, H, W]
    images of any sizes, and returns a dict with
      pred_logits [B, num_queries, num_classes + 1] (the last class is "no object"),
      pred_boxes  [B, num_queries, 4]: (cx, cy, w, h) normalized by each image's own (unpadded) size,
      aux_outputs (with aux_loss): the same two entries for every decoder layer but the last,
      enc_outputs (with two_stage): the encoder's proposals, pred_logits [B, HW, num_classes + 1], pred_boxes.
    """

    two_stage: torch.jit.Final[bool]  # a constant for TorchScript, which then compiles only the branch in use
    query_nms: torch.jit.Final[float]
    num_learned_queries: torch.jit.Final[int]
    has_learned_queries: torch.jit.Final[bool]

    def __init__(self, backbone: nn.Module, transformer: nn.Module, num_classes: int, num_queries: int,
                 aux_loss: bool = False, two_stage: bool = False, query_nms: float = 1.0,
                 learned_queries: int = 0):
        super().__init__()
        check_learned_queries(learned_queries, num_queries, two_stage)
        self.num_queries = num_queries
        self.transformer = transformer
        hidden_dim = transformer.d_model
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.two_stage = two_stage
        # With two_stage, in eval mode: pass over proposals that overlap a better one by more than this IoU
        # when picking the queries (1.0: never).
        self.query_nms = query_nms
        if two_stage:
            # Queries from the encoder (see forward_queries_from_encoder): every encoder token proposes a box and
            # class; these heads replace the learned query embedding.
            # A 3x3 convolution: each token's proposal also sees its neighbours.
            self.enc_output = nn.Conv2d(hidden_dim, hidden_dim, kernel_size=3, padding=1)
            self.enc_output_norm = nn.LayerNorm(hidden_dim)
            self.enc_class_embed = nn.Linear(hidden_dim, num_classes + 1)
            self.enc_bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
            # The decoder refines the proposals it starts from: its class logits and boxes are offsets from
            # theirs, zero at initialization, so that training starts from the proposals' own detections.
            for layer in (self.class_embed, self.bbox_embed.layers[-1]):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        # With two_stage, the last `learned_queries` of the num_queries queries can be learned embeddings, as in
        # the original, beside the proposals: they find what no single position proposes, such as a stuff region.
        self.num_learned_queries = learned_queries if two_stage else num_queries
        self.has_learned_queries = self.num_learned_queries > 0
        if self.has_learned_queries:
            self.query_embed = nn.Embedding(self.num_learned_queries, hidden_dim)
        self.input_proj = nn.Conv2d(backbone.num_channels, hidden_dim, kernel_size=1)
        self.backbone = backbone
        self.aux_loss = aux_loss

    def forward(self, samples: NestedTensor):
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
        if self.two_stage:
            hs, memory, top, enc_logits, enc_boxes, anchors, queries = self.forward_queries_from_encoder(
                src, mask, pos)
            # Offsets from the selected proposals (which are not back-propagated through); the learned queries'
            # start from the image centre and uniform class scores.
            reference = inverse_sigmoid(enc_boxes.detach().gather(1, top.unsqueeze(-1).expand(-1, -1, 4)))
            reference_logits = enc_logits.detach().gather(1, top.unsqueeze(-1).expand(-1, -1, enc_logits.shape[-1]))
            if self.has_learned_queries:
                reference = F.pad(reference, (0, 0, 0, self.num_learned_queries))
                reference_logits = F.pad(reference_logits, (0, 0, 0, self.num_learned_queries))
            outputs_coord = (self.bbox_embed(hs) + reference).sigmoid()
            outputs_class = self.class_embed(hs) + reference_logits
        else:
            hs, memory = self.transformer(src, mask, self.query_embed.weight, pos)
            queries = self.query_embed.weight.unsqueeze(0).expand(hs.shape[1], -1, -1)  # zero content
            outputs_coord = self.bbox_embed(hs).sigmoid()
            outputs_class = self.class_embed(hs)
            enc_logits, enc_boxes, anchors = hs.new_empty(0), hs.new_empty(0), hs.new_empty(0)
        out = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        # TorchScript cannot type a dict mixing tensors and lists or dicts: scripted models (export, inference)
        # return the final layer only.
        if not torch.jit.is_scripting():
            if self.aux_loss:
                out["aux_outputs"] = self._set_aux_loss(outputs_class, outputs_coord)
            if self.two_stage:
                out["enc_outputs"] = {"pred_logits": enc_logits, "pred_boxes": enc_boxes, "anchors": anchors}
        return out, hs, memory, queries

    def forward_queries_from_encoder(self, src: Tensor, mask: Tensor, pos: Tensor):
        """The --two_stage transformer pass. Each encoder output token proposes a class and a box from its own
        state and its 8 neighbours' (a 3x3 convolution over the memory map), the box as an offset (in
        inverse-sigmoid space) from an anchor of a quarter of the image centred on the token.
        The num_queries best-scoring proposals (num_queries - num_learned_queries of them when some queries are
        learned) become the decoder's queries: the token's state as content and its position encoding as query
        position; the learned queries follow them, as in the original (zero content, the embedding as query
        position). predict() then refines their logits and boxes. The proposals
        are supervised on their own (the criterion's enc_outputs), which gives the backbone and encoder a dense
        training signal from the first step.

        Returns (hs [layers, B, Q, d], memory [B, d, H, W], the selected token indices [B, Q], proposal logits
        [B, HW, C + 1], proposal boxes [B, HW, 4], the tokens' anchors [B, HW, 4], the decoder's input queries:
        content plus position embedding [B, Q, d])."""
        bs, c, h, w = src.shape
        src_seq = src.flatten(2).permute(2, 0, 1)
        pos_seq = pos.flatten(2).permute(2, 0, 1)
        mask_seq = mask.flatten(1)
        memory = self.transformer.encoder(src_seq, src_key_padding_mask=mask_seq, pos=pos_seq)  # [HW, B, d]

        memory_map = memory.permute(1, 2, 0).reshape(bs, c, h, w)
        tokens = self.enc_output_norm(self.enc_output(memory_map).flatten(2).transpose(1, 2))  # [B, HW, d]
        enc_logits = self.enc_class_embed(tokens)
        anchors = token_anchors(mask)
        enc_boxes = (self.enc_bbox_embed(tokens) + inverse_sigmoid(anchors)).sigmoid()

        # Best object score per token (padding never proposes), then the top num_queries tokens.
        scores = enc_logits.softmax(-1)[..., :-1].max(-1)[0].masked_fill(mask_seq, -1.0)
        k = min(self.num_queries - self.num_learned_queries, h * w)
        if self.query_nms < 1.0 and not self.training:
            top = select_distinct(scores, enc_boxes, k, self.query_nms)
        else:
            top = scores.topk(k, dim=1)[1]  # [B, Q]
        tgt = tokens.gather(1, top.unsqueeze(-1).expand(-1, -1, c)).transpose(0, 1)  # [Q, B, d]
        query_pos = pos_seq.transpose(0, 1).gather(1, top.unsqueeze(-1).expand(-1, -1, c)).transpose(0, 1)
        if self.has_learned_queries:
            learned_pos = self.query_embed.weight.unsqueeze(1).expand(-1, bs, -1).to(query_pos.dtype)
            tgt = torch.cat([tgt, torch.zeros_like(learned_pos)])
            query_pos = torch.cat([query_pos, learned_pos])
        hs = self.transformer.decoder(tgt, memory, memory_key_padding_mask=mask_seq, pos=pos_seq,
                                      query_pos=query_pos)
        queries = (tgt + query_pos).transpose(0, 1)
        return hs.transpose(1, 2), memory_map, top, enc_logits, enc_boxes, anchors, queries

    @torch.jit.unused
    def _set_aux_loss(self, outputs_class: Tensor, outputs_coord: Tensor):
        # A list of dicts is not a TorchScript Dict[str, Tensor] value, so scripting leaves this out (use
        # aux_loss=False for a scripted model, as the hub models do).
        return [{"pred_logits": a, "pred_boxes": b} for a, b in zip(outputs_class[:-1], outputs_coord[:-1])]


def check_learned_queries(learned_queries: int, num_queries: int, two_stage: bool) -> None:
    """Raise ValueError, naming the flags, unless learned_queries fits: 0 without two_stage, and fewer than
    num_queries so that at least one query is a proposal."""
    if learned_queries and not two_stage:
        raise ValueError("--learned_queries needs --two_stage (without it every query is learned)")
    if not 0 <= learned_queries < num_queries:
        raise ValueError(f"--learned_queries must lie in [0, --num_queries - 1] = [0, {num_queries - 1}], "
                         f"got {learned_queries}")


def select_distinct(scores: Tensor, boxes: Tensor, k: int, iou_threshold: float) -> Tensor:
    """The indices [B, k] of the k best of scores [B, N], passing over any box of boxes [B, N, 4] (cx, cy, w, h)
    that overlaps a better one by more than iou_threshold (those come last, best first, if fewer than k are
    left). Only the 4k best are considered, and passing over is decided in one step: a box overlapping a better
    one is passed over even if that one is passed over itself. So there is no loop, and it exports to ONNX."""
    m = min(4 * k, scores.shape[1])
    best_scores, best = scores.topk(m, dim=1)  # best first
    xyxy = box_ops.box_cxcywh_to_xyxy(boxes.gather(1, best.unsqueeze(-1).expand(-1, -1, 4)))
    iou = box_ops.box_iou(xyxy, xyxy)[0]  # [B, m, m]
    # Entry [i, j] above the diagonal: box j's overlap with the better box i.
    passed_over = iou.triu(1).max(1)[0] > iou_threshold
    order = (best_scores - 3.0 * passed_over.to(best_scores.dtype)).topk(k, dim=1)[1]  # scores lie in [-1, 1]
    return best.gather(1, order)


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """log(x / (1 - x)), with x clamped into [eps, 1 - eps] so that 0 and 1 stay finite."""
    x = x.clamp(min=eps, max=1 - eps)
    return torch.log(x / (1 - x))


def token_anchors(mask: Tensor, size: float = 0.25) -> Tensor:
    """Anchor boxes [B, H * W, 4] (cx, cy, w, h) for the cells of a feature map with padding mask [B, H, W]:
    each cell's centre and a `size` x `size` box, normalized by the image's unpadded extent (as the predicted
    boxes are). Padding cells get centres past 1."""
    valid = ~mask
    valid_h = valid[:, :, 0].sum(1).clamp(min=1).to(torch.float32)  # [B]
    valid_w = valid[:, 0, :].sum(1).clamp(min=1).to(torch.float32)
    h, w = mask.shape[-2:]
    ys = torch.arange(h, dtype=torch.float32, device=mask.device) + 0.5
    xs = torch.arange(w, dtype=torch.float32, device=mask.device) + 0.5
    cy = (ys[None, :, None] / valid_h[:, None, None]).expand(-1, h, w)
    cx = (xs[None, None, :] / valid_w[:, None, None]).expand(-1, h, w)
    wh = torch.full_like(cx, size)
    return torch.stack([cx, cy, wh, wh], -1).flatten(1, 2)


@torch.jit.unused
def to_nested_tensor(samples) -> NestedTensor:
    """A NestedTensor from a 4-D batch (no padding) or a list of 3-D images (padded to the largest)."""
    if isinstance(samples, Tensor):
        if samples.dim() == 3:
            samples = samples.unsqueeze(0)
        if samples.dim() != 4:
            raise ValueError(f"DETR expects images [B, 3, H, W] or [3, H, W], got a tensor of shape "
                             f"{list(samples.shape)}")
        _check_channels(samples.shape[1])
        # A batch of equal-sized images has no padding: an all-False mask, built without a per-image loop.
        mask = torch.zeros((samples.shape[0], samples.shape[2], samples.shape[3]), dtype=torch.bool,
                           device=samples.device)
        return NestedTensor(samples, mask)
    if isinstance(samples, (list, tuple)):
        for img in samples:
            if not isinstance(img, Tensor) or img.dim() != 3:
                raise ValueError("DETR expects a list of images [3, H, W]; got an element of shape "
                                 f"{list(img.shape) if isinstance(img, Tensor) else type(img).__name__}")
            _check_channels(img.shape[0])
        return nested_tensor_from_tensor_list(list(samples))
    raise TypeError(f"DETR expects a NestedTensor, a tensor or a list of tensors, got {type(samples).__name__}")


def _check_channels(c: int) -> None:
    if c != 3:
        raise ValueError(f"DETR expects RGB images with 3 channels, got {c} channels")


class SetCriterion(nn.Module):
    """The DETR loss: match predictions to targets (Hungarian), then supervise each matched pair.

    losses is a subset of 'labels', 'boxes', 'cardinality', 'masks'. With aux_outputs present, every
    decoder layer is matched and supervised on its own, its terms suffixed _0, _1, ...
    """

    def __init__(self, num_classes: int, matcher: nn.Module, weight_dict: Dict[str, float], eos_coef: float,
                 losses: List[str], proposal_classes: Optional[List[int]] = None):
        super().__init__()
        # With two_stage: the classes the encoder's proposals learn (None: all). The targets of other classes
        # are left to the learned queries (DETR's learned_queries), e.g. the stuff of panoptic data, which
        # every token of a region would otherwise propose, crowding the objects out of the top proposals.
        self.proposal_classes = None if proposal_classes is None else sorted(set(int(c) for c in proposal_classes))
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
        target_classes = torch.full(src_logits.shape[:2], self.num_classes, dtype=torch.int64,
                                    device=src_logits.device)
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
        loss_giou = 1 - torch.diag(box_ops.generalized_box_iou(box_ops.box_cxcywh_to_xyxy(src_boxes),
                                                               box_ops.box_cxcywh_to_xyxy(target_boxes)))
        return {"loss_bbox": loss_bbox.sum() / num_boxes, "loss_giou": loss_giou.sum() / num_boxes}

    def loss_masks(self, outputs, targets, indices, num_boxes) -> Dict[str, Tensor]:
        """Focal and dice losses between matched predicted masks (upsampled) and the target masks."""
        from .segmentation import dice_loss, sigmoid_focal_loss

        src_idx = _get_src_permutation_idx(indices)
        tgt_idx = _get_tgt_permutation_idx(indices)
        src_masks = outputs["pred_masks"][src_idx]
        target_masks, _ = nested_tensor_from_tensor_list([t["masks"] for t in targets]).decompose()
        target_masks = target_masks.to(src_masks)[tgt_idx]
        # Predictions are at 1/4 of the feature resolution; compare at the (padded) image resolution.
        src_masks = interpolate(src_masks[:, None], size=target_masks.shape[-2:], mode="bilinear",
                                align_corners=False)
        src_masks = src_masks[:, 0].flatten(1)
        target_masks = target_masks.flatten(1).view(src_masks.shape)
        return {"loss_mask": sigmoid_focal_loss(src_masks, target_masks, num_boxes),
                "loss_dice": dice_loss(src_masks, target_masks, num_boxes)}

    def get_loss(self, loss: str, outputs, targets, indices, num_boxes, **kwargs) -> Dict[str, Tensor]:
        loss_map = {"labels": self.loss_labels, "cardinality": self.loss_cardinality,
                    "boxes": self.loss_boxes, "masks": self.loss_masks}
        if loss not in loss_map:
            raise ValueError(f"unknown loss {loss!r}; expected one of {sorted(loss_map)}")
        return loss_map[loss](outputs, targets, indices, num_boxes, **kwargs)

    def _intermediate_losses(self, outputs, targets, indices, num_boxes, suffix: str) -> Dict[str, Tensor]:
        """The losses of an intermediate prediction (a decoder layer but the last, or the --two_stage proposals),
        their names suffixed: no masks (too costly) and no logged class error."""
        losses: Dict[str, Tensor] = {}
        for loss in self.losses:
            if loss == "masks":
                continue
            kwargs = {"log": False} if loss == "labels" else {}
            l_dict = self.get_loss(loss, outputs, targets, indices, num_boxes, **kwargs)
            losses.update({k + suffix: v for k, v in l_dict.items()})
        return losses

    def forward(self, outputs: Dict, targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """outputs: the model's dict; targets: per image, 'labels' [n] and 'boxes' [n, 4] normalized cxcywh
        (and 'masks' [n, H, W] for the mask loss). Returns every loss term, weighted by nothing."""
        outputs_without_aux = {k: v for k, v in outputs.items() if k not in ("aux_outputs", "enc_outputs")}
        indices = self.matcher(outputs_without_aux, targets)

        # The box losses are averaged over the targets of the whole (distributed) batch, so every process
        # divides by the same number.
        num_boxes = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))],
                                    device=outputs["pred_logits"].device)
        if is_dist_avail_and_initialized():
            torch.distributed.all_reduce(num_boxes)
        num_boxes = torch.clamp(num_boxes / get_world_size(), min=1).item()

        losses: Dict[str, Tensor] = {}
        for loss in self.losses:
            losses.update(self.get_loss(loss, outputs, targets, indices, num_boxes))

        for i, aux_outputs in enumerate(outputs.get("aux_outputs", [])):
            indices = self.matcher(aux_outputs, targets)
            losses.update(self._intermediate_losses(aux_outputs, targets, indices, num_boxes, f"_{i}"))

        if "enc_outputs" in outputs:
            # --two_stage: the encoder's dense proposals are supervised like a decoder layer, but assigned by
            # position, which does not change as they learn: each object to the token nearest its centre.
            enc_outputs = outputs["enc_outputs"]
            enc_targets = targets if self.proposal_classes is None else [
                only_classes(t, self.proposal_classes) for t in targets]
            indices = match_to_nearest_anchor(enc_outputs["anchors"], enc_targets)
            losses.update(self._intermediate_losses(enc_outputs, enc_targets, indices, num_boxes, "_enc"))
        return losses


def only_classes(target: Dict[str, Tensor], classes: List[int]) -> Dict[str, Tensor]:
    """The target's 'labels' and 'boxes' restricted to the objects whose label is in classes."""
    keep = torch.isin(target["labels"], torch.as_tensor(classes, device=target["labels"].device))
    return {"labels": target["labels"][keep], "boxes": target["boxes"][keep]}


@torch.no_grad()
def match_to_nearest_anchor(anchors: Tensor, targets: List[Dict[str, Tensor]]) -> List[Tuple[Tensor, Tensor]]:
    """Per image, (token indices, target indices): every target gets the token whose anchor centre is nearest
    to its box centre (L1), one token per target, so that two objects centred in one cell get two tokens."""
    from scipy.optimize import linear_sum_assignment

    indices = []
    for image_anchors, t in zip(anchors, targets):
        cost = torch.cdist(image_anchors[:, :2].float(), t["boxes"][:, :2].float(), p=1).cpu()
        rows, cols = linear_sum_assignment(cost.numpy())
        indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
    return indices


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
            raise ValueError(f"target_sizes must be [batch, 2] = [{len(out_logits)}, 2], "
                             f"got {list(target_sizes.shape)}")
        prob = F.softmax(out_logits, -1)
        scores, labels = prob[..., :-1].max(-1)
        boxes = box_ops.box_cxcywh_to_xyxy(out_bbox)
        img_h, img_w = target_sizes.unbind(1)
        scale = torch.stack([img_w, img_h, img_w, img_h], dim=1).to(boxes.dtype)
        boxes = boxes * scale[:, None, :]
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]


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


def default_num_classes(dataset_file: str) -> int:
    """The class-head size the original used: 91 for COCO (max category id + 1), 250 for COCO panoptic."""
    return {"coco": 91, "coco_panoptic": 250}.get(dataset_file, 20)


def build(args):
    """(model, criterion, postprocessors) from the parsed main.py flags."""
    num_classes = getattr(args, "num_classes", None) or default_num_classes(args.dataset_file)
    device = torch.device(args.device)

    backbone = build_backbone(args)
    transformer = build_transformer(args)
    learned_queries = getattr(args, "learned_queries", 0) or 0
    model = DETR(backbone, transformer, num_classes=num_classes, num_queries=args.num_queries,
                 aux_loss=args.aux_loss, two_stage=getattr(args, "two_stage", False),
                 query_nms=getattr(args, "query_nms", 1.0), learned_queries=learned_queries)
    if args.masks:
        from .segmentation import DETRsegm
        model = DETRsegm(model, freeze_detr=(args.frozen_weights is not None),
                         attention_gain=getattr(args, "mask_attention_gain", 1.0))
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
    if getattr(args, "two_stage", False):
        weight_dict.update({"loss_ce_enc": 1, "loss_bbox_enc": args.bbox_loss_coef,
                            "loss_giou_enc": args.giou_loss_coef})

    losses = ["labels", "boxes", "cardinality"]
    if args.masks:
        losses += ["masks"]
    # Beside learned queries, the proposals learn the thing classes of panoptic data only.
    proposal_classes = getattr(args, "thing_classes", None) if learned_queries else None
    criterion = SetCriterion(num_classes, matcher=matcher, weight_dict=weight_dict, eos_coef=args.eos_coef,
                             losses=losses, proposal_classes=proposal_classes)
    criterion.to(device)

    postprocessors = {"bbox": PostProcess()}
    if args.masks:
        from .segmentation import PostProcessPanoptic, PostProcessSegm
        postprocessors["segm"] = PostProcessSegm()
        panoptic_threshold = getattr(args, "panoptic_threshold", 0.85)
        if args.dataset_file == "coco_panoptic":
            is_thing_map = {i: i <= 90 for i in range(201)}
            postprocessors["panoptic"] = PostProcessPanoptic(is_thing_map, threshold=panoptic_threshold)
        elif getattr(args, "thing_classes", None) is not None:
            # Datasets of the project's own (the synthetic panoptic one) name their thing classes.
            things = set(args.thing_classes)
            postprocessors["panoptic"] = PostProcessPanoptic({i: i in things for i in range(num_classes + 1)},
                                                             threshold=panoptic_threshold)
    return model, criterion, postprocessors
