"""The segmentation head of DETR (paper section 4.4) and its losses and post-processors.

DETRsegm wraps a trained (or training) DETR: for every object query it computes attention maps over the
encoder memory (MHAttentionMap) and turns them into a mask logit map with a small FPN-style conv net
(MaskHeadSmallConv) that reuses the backbone's layer1-3 features. Mask losses are the sigmoid focal
loss and the DICE loss. PostProcessSegm gives per-query binary masks for COCO evaluation;
PostProcessPanoptic merges the queries into one panoptic id map in the COCO panoptic PNG format.
"""

import io
from collections import defaultdict
from typing import Dict, List, Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from util.amp import autocast_enabled
from util.misc import NestedTensor, to_nested_tensor
from util.panoptic import id2rgb, rgb2id  # noqa: F401 (rgb2id is re-exported for users)


class DETRsegm(nn.Module):
    """DETR plus a mask head: adds `pred_masks` [B, num_queries, H/4, W/4] (logits) to DETR's outputs.

    With `freeze_detr`, the wrapped DETR gets no gradients and only the new heads train (the paper's
    two-stage recipe: train boxes first, then masks for 25 epochs).
    """

    def __init__(self, detr: nn.Module, freeze_detr: bool = False, attention_gain: float = 1.0):
        """attention_gain: the attention maps sum to 1 over heads and positions, so each value is about
        1 / (heads x positions), far smaller than the features beside them; the mask head's first convolution
        starts with its weights on them multiplied by this, so that it tells the queries apart from the first
        step instead of after thousands (1: the original's initialization)."""
        super().__init__()
        self.detr = detr
        self.freeze_detr = freeze_detr
        if freeze_detr:
            # Freeze before the heads exist, so that only DETR's parameters are affected.
            for p in self.detr.parameters():
                p.requires_grad_(False)
        hidden_dim, nheads = detr.transformer.d_model, detr.transformer.nhead
        self.bbox_attention = MHAttentionMap(hidden_dim, hidden_dim, nheads, dropout=0.0)
        # The FPN inputs are the backbone's layer3, layer2, layer1 outputs; in a ResNet each stage has half
        # the channels of the next one, so they follow from layer4's width (what input_proj reads):
        # [1024, 512, 256] for ResNet-50/101, [256, 128, 64] for ResNet-18/34. A backbone that ends early
        # (--feature_stride 16 or 8) has fewer finer stages; its finest one fills the missing levels.
        last_channels = detr.input_proj.in_channels
        finer_stages = getattr(detr.backbone[0], "last_layer", 4) - 1
        fpn_dims = [last_channels >> min(i + 1, finer_stages) for i in range(3)]
        self.mask_head = MaskHeadSmallConv(hidden_dim + nheads, fpn_dims, hidden_dim, attention_gain=attention_gain)

    def train(self, mode: bool = True):
        """As nn.Module.train, but a frozen detector's batch norms (--backbone_norm batch) stay in eval mode:
        their running statistics are part of the detector and must not drift while the mask head trains."""
        super().train(mode)
        if self.freeze_detr:
            for m in self.detr.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, samples: NestedTensor):
        """samples: a NestedTensor, a list of [3, H_i, W_i] images, or a [B, 3, H, W] batch."""
        if not isinstance(samples, NestedTensor):
            samples = to_nested_tensor(samples)
        features, pos = self.detr.backbone(samples)

        bs = features[-1].tensors.shape[0]
        src, mask = features[-1].decompose()
        assert mask is not None
        src_proj = self.detr.input_proj(src)
        out, hs, memory, queries = self.detr.predict(src_proj, mask, pos[-1])

        # Attention of the last decoder layer's queries over the encoder memory: one map per head.
        attention_queries, attention_keys = self.detr.mask_attention_inputs(hs, memory, queries, pos[-1])
        bbox_mask = self.bbox_attention(attention_queries, attention_keys, mask=mask)
        seg_masks = self.mask_head(src_proj, bbox_mask, fpn_inputs(features))
        out["pred_masks"] = seg_masks.view(bs, hs.shape[2], seg_masks.shape[-2], seg_masks.shape[-1])
        return out


def fpn_inputs(features: List[NestedTensor]) -> List[Tensor]:
    """The mask head's three FPN inputs, coarse to fine: the backbone stages before the last one (layer3,
    layer2, layer1 in the original), the finest repeated when the backbone has fewer than three of them."""
    finer = [features[i].tensors for i in range(len(features) - 2, -1, -1)]
    while len(finer) < 3:
        finer.append(finer[-1])
    return finer


def _expand(tensor: Tensor, length: int) -> Tensor:
    """[B, C, H, W] -> [B * length, C, H, W], each image repeated once per query (batch-major)."""
    return tensor.unsqueeze(1).repeat(1, int(length), 1, 1, 1).flatten(0, 1)


def _merge_fpn(cur_fpn: Tensor, x: Tensor) -> Tensor:
    """Add the upsampled coarser map x [B * Q, C, h, w] to the finer backbone features cur_fpn
    ([B, C, H, W], repeated per query here) — the top-down path of an FPN."""
    if cur_fpn.size(0) != x.size(0):
        cur_fpn = _expand(cur_fpn, x.size(0) // cur_fpn.size(0))
    return cur_fpn + F.interpolate(x, size=cur_fpn.shape[-2:], mode="nearest")


class MaskHeadSmallConv(nn.Module):
    """FPN-style conv head: from the (projected) encoder features concatenated with each query's
    attention maps at 1/32 scale, up to 1/4 scale through the backbone's layer3, layer2, layer1 features.
    Group norm because the effective batch (images x queries) varies and can be large."""

    def __init__(self, dim: int, fpn_dims: List[int], context_dim: int, attention_gain: float = 1.0):
        """dim: input channels, the features' (context_dim) plus one attention map per head. attention_gain
        multiplies lay1's initial weights on the attention maps (see DETRsegm)."""
        super().__init__()
        inter_dims = [dim, context_dim // 2, context_dim // 4, context_dim // 8, context_dim // 16, context_dim // 64]
        if any(d == 0 or d % 8 for d in inter_dims[:5]):
            raise ValueError(
                f"the mask head's group norms (8 groups) need hidden_dim + nheads ({dim}) and "
                f"hidden_dim // 2, 4, 8, 16 ({inter_dims[1:5]}) to be positive multiples of 8; "
                "use e.g. --hidden_dim 256 --nheads 8 (the default) or --hidden_dim 128 --nheads 8"
            )
        self.lay1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.gn1 = nn.GroupNorm(8, dim)
        self.lay2 = nn.Conv2d(dim, inter_dims[1], 3, padding=1)
        self.gn2 = nn.GroupNorm(8, inter_dims[1])
        self.lay3 = nn.Conv2d(inter_dims[1], inter_dims[2], 3, padding=1)
        self.gn3 = nn.GroupNorm(8, inter_dims[2])
        self.lay4 = nn.Conv2d(inter_dims[2], inter_dims[3], 3, padding=1)
        self.gn4 = nn.GroupNorm(8, inter_dims[3])
        self.lay5 = nn.Conv2d(inter_dims[3], inter_dims[4], 3, padding=1)
        self.gn5 = nn.GroupNorm(8, inter_dims[4])
        self.out_lay = nn.Conv2d(inter_dims[4], 1, 3, padding=1)

        self.dim = dim
        self.adapter1 = nn.Conv2d(fpn_dims[0], inter_dims[1], 1)
        self.adapter2 = nn.Conv2d(fpn_dims[1], inter_dims[2], 1)
        self.adapter3 = nn.Conv2d(fpn_dims[2], inter_dims[3], 1)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.constant_(m.bias, 0)
        if attention_gain != 1.0:
            with torch.no_grad():
                self.lay1.weight[:, context_dim:] *= attention_gain

    def forward(self, x: Tensor, bbox_mask: Tensor, fpns: List[Tensor]) -> Tensor:
        """x [B, C, H, W], bbox_mask [B, Q, nheads, H, W], fpns: 3 feature maps, coarse to fine.
        Returns mask logits [B * Q, 1, H_fpn3, W_fpn3]."""
        x = torch.cat([_expand(x, bbox_mask.shape[1]), bbox_mask.flatten(0, 1)], 1)

        x = F.relu(self.gn1(self.lay1(x)))
        x = F.relu(self.gn2(self.lay2(x)))

        x = _merge_fpn(self.adapter1(fpns[0]), x)
        x = F.relu(self.gn3(self.lay3(x)))

        x = _merge_fpn(self.adapter2(fpns[1]), x)
        x = F.relu(self.gn4(self.lay4(x)))

        x = _merge_fpn(self.adapter3(fpns[2]), x)
        x = F.relu(self.gn5(self.lay5(x)))
        return self.mask_logits(x)

    def mask_logits(self, x: Tensor) -> Tensor:
        """The last convolution: in float32 under autocast, as DETR's output heads (one output channel: cheap)."""
        if not torch.jit.is_scripting() and autocast_enabled(x.device.type):
            return self._mask_logits_in_float32(x)
        return self.out_lay(x)

    @torch.jit.unused
    def _mask_logits_in_float32(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.mask_logits(x.float())


class MHAttentionMap(nn.Module):
    """Multi-head attention weights (no values) of each query over every position of a feature map:
    returns [B, Q, num_heads, H, W], normalized jointly over heads and positions."""

    def __init__(self, query_dim: int, hidden_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.dropout = nn.Dropout(dropout)

        self.q_linear = nn.Linear(query_dim, hidden_dim, bias=bias)
        self.k_linear = nn.Linear(query_dim, hidden_dim, bias=bias)

        nn.init.zeros_(self.k_linear.bias)
        nn.init.zeros_(self.q_linear.bias)
        nn.init.xavier_uniform_(self.k_linear.weight)
        nn.init.xavier_uniform_(self.q_linear.weight)
        self.normalize_fact = float(hidden_dim / self.num_heads) ** -0.5

    def forward(self, q: Tensor, k: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """q [B, Q, C] queries, k [B, C, H, W] feature map, mask [B, H, W] True on padding."""
        q = self.q_linear(q)
        # k_linear applied at every position: a 1x1 convolution with the same weights.
        k = F.conv2d(k, self.k_linear.weight.unsqueeze(-1).unsqueeze(-1), self.k_linear.bias)
        head_dim = self.hidden_dim // self.num_heads
        qh = q.view(q.shape[0], q.shape[1], self.num_heads, head_dim)
        kh = k.view(k.shape[0], self.num_heads, head_dim, k.shape[-2], k.shape[-1])
        weights = torch.einsum("bqnc,bnchw->bqnhw", qh * self.normalize_fact, kh)

        if mask is not None:
            weights = weights.masked_fill(mask.unsqueeze(1).unsqueeze(1), float("-inf"))
        weights = F.softmax(weights.flatten(2), dim=-1).view(weights.size())
        weights = self.dropout(weights)
        return weights


def dice_loss(inputs: Tensor, targets: Tensor, num_boxes: Union[float, Tensor]) -> Tensor:
    """DICE loss (a soft IoU) of mask logits `inputs` against binary `targets` of the same numel per row.

    The +1 in numerator and denominator keeps empty masks at zero loss instead of 0/0.
    Returns the sum over masks divided by num_boxes.
    """
    inputs = inputs.sigmoid().flatten(1)
    targets = targets.flatten(1)
    numerator = 2 * (inputs * targets).sum(1)
    denominator = inputs.sum(-1) + targets.sum(-1)
    loss = 1 - (numerator + 1) / (denominator + 1)
    return loss.sum() / num_boxes


def sigmoid_focal_loss(
    inputs: Tensor, targets: Tensor, num_boxes: Union[float, Tensor], alpha: float = 0.25, gamma: float = 2
) -> Tensor:
    """Focal loss (Lin et al. 2017, RetinaNet) on logits `inputs` [N, P] against binary `targets` [N, P].

    (1 - p_t) ** gamma down-weights the easy pixels; alpha (ignored when negative) balances positives
    against negatives. Mean over pixels, sum over masks, divided by num_boxes.
    """
    prob = inputs.sigmoid()
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)

    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss

    return loss.mean(1).sum() / num_boxes


class PostProcessSegm(nn.Module):
    """Binary masks for COCO evaluation: results[i]['masks'] [Q, 1, H_orig, W_orig] uint8, added to the
    box post-processor's results."""

    def __init__(self, threshold: float = 0.5):
        super().__init__()
        self.threshold = threshold

    @torch.no_grad()
    def forward(
        self,
        results: List[Dict[str, Tensor]],
        outputs: Dict[str, Tensor],
        orig_target_sizes: Tensor,
        max_target_sizes: Tensor,
    ) -> List[Dict[str, Tensor]]:
        """orig_target_sizes [B, 2]: (h, w) of the original images; max_target_sizes [B, 2]: (h, w) of the
        images as fed to the model (before padding)."""
        assert len(orig_target_sizes) == len(max_target_sizes)
        max_h, max_w = max_target_sizes.max(0)[0].tolist()
        masks = outputs["pred_masks"]
        if masks.dim() == 5:
            masks = masks.squeeze(2)
        # The padded batch was max_h x max_w; masks are predicted at 1/4 of that, so bring them back first.
        masks = F.interpolate(masks, size=(max_h, max_w), mode="bilinear", align_corners=False)
        masks = (masks.sigmoid() > self.threshold).cpu()

        for i, (cur_mask, t, tt) in enumerate(zip(masks, max_target_sizes, orig_target_sizes)):
            img_h, img_w = int(t[0]), int(t[1])
            cur = cur_mask[:, :img_h, :img_w].unsqueeze(1)
            results[i]["masks"] = F.interpolate(cur.float(), size=tuple(tt.tolist()), mode="nearest").byte()
        return results


class PostProcessPanoptic(nn.Module):
    """Panoptic predictions in the COCO panoptic format: per image, a PNG-encoded id map `png_string` and
    `segments_info` [{'id', 'isthing', 'category_id', 'area'}].

    Queries are kept when their most likely class is not no-object and scores above `threshold`; every
    pixel goes to the kept query with the highest mask logit; queries predicting the same stuff class are
    merged, and segments of 4 pixels or fewer are dropped.
    """

    def __init__(self, is_thing_map, threshold: float = 0.85):
        """is_thing_map: class id -> whether it is a thing (a dict, or a list indexed by class id)."""
        super().__init__()
        self.threshold = threshold
        self.is_thing_map = is_thing_map

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], processed_sizes, target_sizes=None) -> List[Dict]:
        """processed_sizes: (h, w) of each image as fed to the model (without padding); target_sizes: (h, w)
        to produce, defaults to processed_sizes. Both a [B, 2] tensor or a list of pairs."""
        if target_sizes is None:
            target_sizes = processed_sizes
        assert len(processed_sizes) == len(target_sizes)
        out_logits, raw_masks = outputs["pred_logits"], outputs["pred_masks"]
        assert len(out_logits) == len(raw_masks) == len(target_sizes)
        no_object = out_logits.shape[-1] - 1
        preds = []
        for cur_logits, cur_masks, size, target_size in zip(out_logits, raw_masks, processed_sizes, target_sizes):
            scores, labels = cur_logits.softmax(-1).max(-1)
            keep = labels.ne(no_object) & (scores > self.threshold)
            cur_scores = scores[keep]
            cur_classes = labels[keep]
            cur_masks = cur_masks[keep]
            h, w = _to_tuple(size)
            cur_masks = F.interpolate(cur_masks[:, None], size=(h, w), mode="bilinear", align_corners=False)
            cur_masks = cur_masks.squeeze(1).flatten(1)
            final_size = _to_tuple(target_size)

            # Several queries may predict the same stuff class; stuff is one segment per class.
            stuff_equiv_classes: Dict[int, List[int]] = defaultdict(list)
            for k, label in enumerate(cur_classes.tolist()):
                if not self.is_thing_map[label]:
                    stuff_equiv_classes[label].append(k)

            area, seg_img = self._ids_and_area(
                cur_masks, len(cur_scores), (h, w), final_size, list(stuff_equiv_classes.values())
            )
            if cur_classes.numel() > 0:
                # Drop tiny segments and re-assign their pixels among the remaining queries, until none is left.
                while True:
                    small = torch.as_tensor([a <= 4 for a in area], dtype=torch.bool, device=cur_classes.device)
                    if not small.any().item():
                        break
                    cur_scores = cur_scores[~small]
                    cur_classes = cur_classes[~small]
                    cur_masks = cur_masks[~small]
                    area, seg_img = self._ids_and_area(cur_masks, len(cur_scores), (h, w), final_size, [])
            else:
                # No query kept: the original fills in a single class so that the (empty) segments_info
                # loop below has a tensor to index; kept for identical outputs.
                cur_classes = torch.ones(1, dtype=torch.long, device=cur_classes.device)

            segments_info = []
            for i, a in enumerate(area):
                cat = cur_classes[i].item()
                segments_info.append({"id": i, "isthing": self.is_thing_map[cat], "category_id": cat, "area": a})

            with io.BytesIO() as buf:
                seg_img.save(buf, format="PNG")
                preds.append({"png_string": buf.getvalue(), "segments_info": segments_info})
        return preds

    @staticmethod
    def _ids_and_area(masks: Tensor, num_segments: int, size, final_size, equiv_groups: List[List[int]]):
        """Per-pixel winning query id at `size`, merged within each group of `equiv_groups`, resized
        (nearest) to `final_size` through the RGB id image; returns (areas per query id, PIL RGB image)."""
        h, w = size
        if masks.shape[0] == 0:
            m_id = torch.zeros((h, w), dtype=torch.long, device=masks.device)
        else:
            # softmax over the queries per pixel, then the most likely query
            m_id = masks.transpose(0, 1).softmax(-1).argmax(-1).view(h, w)
        for equiv in equiv_groups:
            if len(equiv) > 1:
                for eq_id in equiv:
                    m_id = m_id.masked_fill(m_id.eq(eq_id), equiv[0])

        final_h, final_w = final_size
        seg_img = Image.fromarray(id2rgb(m_id.cpu().numpy()))
        seg_img = seg_img.resize(size=(final_w, final_h), resample=Image.NEAREST)
        m_id = torch.from_numpy(np.asarray(rgb2id(np.asarray(seg_img))))
        area = [int(m_id.eq(i).sum().item()) for i in range(num_segments)]
        return area, seg_img


def _to_tuple(size):
    """(h, w) as python ints from a tuple, list or tensor."""
    if isinstance(size, torch.Tensor):
        size = size.tolist()
    return tuple(int(s) for s in size)
