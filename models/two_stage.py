"""--two_stage: DETR whose decoder queries are the encoder's best proposals, and its loss.

TwoStageDETR replaces one step of DETR, the one that produces the decoder's queries (`predict`): every encoder
output token proposes a class and a box, the best proposals become the queries, and the decoder refines their
logits and boxes. TwoStageCriterion adds the proposals' own loss (the `_enc` terms) to SetCriterion's. The
flags: --two_stage, --learned_queries (some queries stay learned embeddings, as in the original) and
--query_nms (at inference, pass over proposals that overlap a better one). build_model picks both classes
when --two_stage is given; everything else (backbone, transformer, heads, mask head) is DETR's.
"""

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from util import box_ops
from util.amp import autocast_enabled
from util.flags import add_switch, defines_the_network, network_flags

from .detr import DETR, MLP, SetCriterion


def add_two_stage_args(parser) -> None:
    """The --two_stage flags, in one argument group; the default is the original's learned queries."""
    group = parser.add_argument_group("Two-stage queries (models/two_stage.py)")
    two_stage = add_switch(
        group,
        "two_stage",
        "queries from the encoder: its best class-and-box proposals (loss terms _enc) seed the decoder (docs/flags.md)",
        "the original's learned queries",
    )
    defines_the_network(two_stage)
    network_flags(group)(
        "--learned_queries",
        default=0,
        type=int,
        help="with --two_stage: this many queries are learned embeddings, the others proposals (on "
        "panoptic data: the stuff regions' queries)",
    )
    group.add_argument(
        "--query_nms",
        default=1.0,
        type=float,
        help="with --two_stage, at evaluation (and in training with --proposal_radius): skip proposals that "
        "overlap a better one by more than this IoU (1.0: never)",
    )
    group.add_argument(
        "--proposal_radius",
        default=0.0,
        type=float,
        help="with --two_stage: the tokens within this many cells of an object's centre (and inside its box) "
        "learn to propose it (0: the nearest only); --query_nms then applies in training too",
    )


class DenseProposals:
    """The dense proposal heads, mixed into a module: every cell of a feature map proposes a class and a box.
    TwoStageDETR's queries come from them; models/train_only.py's --dense_aux head is them alone. The names
    (enc_output, a 3x3 convolution so that each cell also sees its neighbours, enc_output_norm, enc_class_embed,
    enc_bbox_embed) are the --two_stage checkpoints' own."""

    def build_dense_heads(self, hidden_dim: int, num_classes: int) -> None:
        self.enc_output = nn.Conv2d(hidden_dim, hidden_dim, kernel_size=3, padding=1)
        self.enc_output_norm = nn.LayerNorm(hidden_dim)
        self.enc_class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.enc_bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)

    def dense_predictions(
        self, feature_map: Tensor, mask: Tensor, anchored: bool = True
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Every cell of feature_map [B, d, H, W] (padding mask [B, H, W]) proposes a class and a box, the box as an
        offset (in inverse-sigmoid space) from the cell's anchor (token_anchors), or with anchored=False as
        absolute coordinates, which the cell's features must then know.
        Returns (tokens [B, HW, d], logits [B, HW, C + 1], boxes [B, HW, 4], anchors [B, HW, 4])."""
        tokens = self.enc_output_norm(self.enc_output(feature_map).flatten(2).transpose(1, 2))
        logits, offsets = self.dense_output_heads(tokens)
        anchors = token_anchors(mask)
        boxes = (offsets + inverse_sigmoid(anchors) if anchored else offsets).sigmoid()
        return tokens, logits, boxes, anchors

    def dense_output_heads(self, tokens: Tensor) -> Tuple[Tensor, Tensor]:
        """(class logits, box offsets) of every token [..., d]; in float32 under autocast, as DETR's output heads."""
        if not torch.jit.is_scripting() and autocast_enabled(tokens.device.type):
            return self._dense_output_heads_in_float32(tokens)
        return self.enc_class_embed(tokens), self.enc_bbox_embed(tokens)

    @torch.jit.unused
    def _dense_output_heads_in_float32(self, tokens: Tensor) -> Tuple[Tensor, Tensor]:
        # The proposals' boxes are the decoder's references: bfloat16 rounding would reach its boxes too.
        with torch.autocast(tokens.device.type, enabled=False):
            return self.dense_output_heads(tokens.float())


class TwoStageDETR(DETR, DenseProposals):
    """DETR with queries from the encoder: forward returns DETR's outputs plus
    enc_outputs: the encoder's proposals, pred_logits [B, HW, num_classes + 1], pred_boxes [B, HW, 4] and
    the tokens' anchors [B, HW, 4].

    The last `learned_queries` of the num_queries queries can be learned embeddings, as in the original, beside
    the proposals: they find what no single position proposes, such as a stuff region. The state_dict is
    DETR's without query_embed (or with learned_queries rows of it) plus the proposal heads enc_*.
    """

    query_nms: torch.jit.Final[float]  # constants for TorchScript, which then compiles only the branches in use
    query_nms_in_training: torch.jit.Final[bool]
    num_learned_queries: torch.jit.Final[int]
    has_learned_queries: torch.jit.Final[bool]

    def __init__(
        self,
        backbone: nn.Module,
        transformer: nn.Module,
        num_classes: int,
        num_queries: int,
        aux_loss: bool = False,
        query_nms: float = 1.0,
        learned_queries: int = 0,
        query_nms_in_training: bool = False,
    ):
        """query_nms: in eval mode, pass over proposals that overlap a better one by more than this IoU when
        picking the queries (1.0: never); in training mode too with query_nms_in_training, so that the decoder
        trains on queries like those it will see (needed where several tokens learn to propose one object)."""
        check_learned_queries(learned_queries, num_queries, two_stage=True)
        # Read by _build_queries, which DETR.__init__ calls; plain numbers may be set before nn.Module.__init__.
        self.query_nms = query_nms
        self.query_nms_in_training = query_nms_in_training
        self.num_learned_queries = learned_queries
        self.has_learned_queries = learned_queries > 0
        super().__init__(backbone, transformer, num_classes, num_queries, aux_loss)

    def _build_queries(self, hidden_dim: int, num_classes: int) -> None:
        # Every encoder token proposes a box and class (see forward_queries_from_encoder); these heads replace
        # the learned query embedding.
        self.build_dense_heads(hidden_dim, num_classes)
        # The decoder refines the proposals it starts from: its class logits and boxes are offsets from
        # theirs, zero at initialization, so that training starts from the proposals' own detections.
        for layer in (self.class_embed, self.bbox_embed.layers[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if self.has_learned_queries:
            self.query_embed = nn.Embedding(self.num_learned_queries, hidden_dim)

    def predict(self, src: Tensor, mask: Tensor, pos: Tensor) -> Tuple[Dict[str, Tensor], Tensor, Tensor, Tensor]:
        """As DETR.predict, with the proposals as queries and the decoder's logits and boxes as offsets from
        theirs; the output dict also holds enc_outputs (unless scripted)."""
        hs, memory, top, enc_logits, enc_boxes, anchors, queries = self.forward_queries_from_encoder(src, mask, pos)
        # Offsets from the selected proposals (which are not back-propagated through); the learned queries'
        # start from the image centre and uniform class scores.
        reference = inverse_sigmoid(enc_boxes.detach().gather(1, top.unsqueeze(-1).expand(-1, -1, 4)))
        reference_logits = enc_logits.detach().gather(1, top.unsqueeze(-1).expand(-1, -1, enc_logits.shape[-1]))
        if self.has_learned_queries:
            reference = F.pad(reference, (0, 0, 0, self.num_learned_queries))
            reference_logits = F.pad(reference_logits, (0, 0, 0, self.num_learned_queries))
        logits, box_offsets = self.output_heads(hs)
        outputs_coord = (box_offsets + reference).sigmoid()
        outputs_class = logits + reference_logits
        out = self._outputs(outputs_class, outputs_coord)
        if not torch.jit.is_scripting():
            out["enc_outputs"] = {"pred_logits": enc_logits, "pred_boxes": enc_boxes, "anchors": anchors}
        return out, hs, memory, queries

    def forward_queries_from_encoder(
        self, src: Tensor, mask: Tensor, pos: Tensor
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The transformer pass. Each encoder output token proposes a class and a box from its own
        state and its 8 neighbours' (a 3x3 convolution over the memory map), the box as an offset (in
        inverse-sigmoid space) from an anchor of a quarter of the image centred on the token.
        The num_queries best-scoring proposals (num_queries - num_learned_queries of them when some queries are
        learned) become the decoder's queries: the token's state as content and its position encoding as query
        position; the learned queries follow them, as in the original (zero content, the embedding as query
        position). predict() then refines their logits and boxes. The proposals
        are supervised on their own (TwoStageCriterion), which gives the backbone and encoder a dense
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
        tokens, enc_logits, enc_boxes, anchors = self.dense_predictions(memory_map, mask)

        # Best object score per token (padding never proposes), then the top num_queries tokens.
        scores = enc_logits.softmax(-1)[..., :-1].max(-1)[0].masked_fill(mask_seq, -1.0)
        k = min(self.num_queries - self.num_learned_queries, h * w)
        if self.query_nms < 1.0 and (self.query_nms_in_training or not self.training):
            top = select_distinct(scores, enc_boxes, k, self.query_nms)
        else:
            top = scores.topk(k, dim=1)[1]  # [B, Q]
        tgt = tokens.gather(1, top.unsqueeze(-1).expand(-1, -1, c)).transpose(0, 1)  # [Q, B, d]
        query_pos = pos_seq.transpose(0, 1).gather(1, top.unsqueeze(-1).expand(-1, -1, c)).transpose(0, 1)
        if self.has_learned_queries:
            learned_pos = self.query_embed.weight.unsqueeze(1).expand(-1, bs, -1).to(query_pos.dtype)
            tgt = torch.cat([tgt, torch.zeros_like(learned_pos)])
            query_pos = torch.cat([query_pos, learned_pos])
        hs = self.transformer.decoder(tgt, memory, memory_key_padding_mask=mask_seq, pos=pos_seq, query_pos=query_pos)
        queries = (tgt + query_pos).transpose(0, 1)
        return hs.transpose(1, 2), memory_map, top, enc_logits, enc_boxes, anchors, queries

    def mask_attention_inputs(self, hs: Tensor, memory: Tensor, queries: Tensor, pos: Tensor) -> Tuple[Tensor, Tensor]:
        """A proposal's decoder state need not say what and where it is (its class and box are offsets from the
        proposal's, and the decoder can leave them unchanged): the mask head's attention adds the query's own
        input (the proposal's state and position) to it, and the positions to the memory."""
        return hs[-1] + queries, memory + pos.to(memory.dtype)


class TwoStageCriterion(SetCriterion):
    """SetCriterion plus the loss of the encoder's dense proposals (enc_outputs), its terms suffixed _enc:
    supervised like a decoder layer, but assigned by position, which does not change as they learn: each
    object to the token nearest its centre."""

    def __init__(
        self,
        num_classes: int,
        matcher: nn.Module,
        weight_dict: Dict[str, float],
        eos_coef: float,
        losses: List[str],
        proposal_classes: Optional[List[int]] = None,
        proposal_radius: float = 0.0,
    ):
        """proposal_classes: the classes the proposals learn (None: all). The targets of other classes are left
        to the learned queries (--learned_queries), e.g. the stuff of panoptic data, which every token of a
        region would otherwise propose, crowding the objects out of the top proposals.
        proposal_radius: besides the nearest token, every token whose centre lies inside the object's box and
        within this many cells of its centre (both axes) learns to propose it (0: the nearest token only)."""
        super().__init__(num_classes, matcher, weight_dict, eos_coef, losses)
        self.proposal_classes = None if proposal_classes is None else sorted(set(int(c) for c in proposal_classes))
        if proposal_radius < 0:
            raise ValueError(f"--proposal_radius must be 0 or more, got {proposal_radius}")
        self.proposal_radius = proposal_radius

    def forward(self, outputs: Dict, targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """SetCriterion's losses of the decoder's outputs, then the _enc terms of the proposals (divided by the
        same number of boxes, all classes')."""
        losses = super().forward(outputs, targets)
        enc_outputs = outputs["enc_outputs"]
        enc_targets = (
            targets if self.proposal_classes is None else [only_classes(t, self.proposal_classes) for t in targets]
        )
        # All classes' targets count in the number of boxes, as for the decoder's terms.
        num_boxes = self.num_boxes(targets, enc_outputs["pred_logits"].device)
        losses.update(dense_losses(self, enc_outputs, enc_targets, self.proposal_radius, num_boxes, "_enc")[0])
        return losses


def dense_losses(
    criterion: SetCriterion,
    outputs: Dict[str, Tensor],
    targets: List[Dict[str, Tensor]],
    radius: float,
    num_boxes: Tensor,
    suffix: str,
) -> Tuple[Dict[str, Tensor], List[Tuple[Tensor, Tensor]]]:
    """The loss terms (names suffixed) of dense proposals (pred_logits, pred_boxes, anchors of dense_predictions)
    and the assignment they used: each target to the token nearest its centre, plus with `radius` > 0 the tokens
    within that many cells (one-to-many). num_boxes divides the box terms with the nearest token only; with a
    radius they become means over the (token, object) pairs, so that they weigh in the total as without it."""
    indices = match_to_nearest_anchor(outputs["anchors"], targets)
    if radius > 0:
        indices = add_nearby_tokens(outputs["anchors"], targets, indices, radius)
        num_boxes = criterion.mean_count(sum(len(i) for i, _ in indices), outputs["pred_logits"].device)
    return criterion._intermediate_losses(outputs, targets, indices, num_boxes, suffix), indices


def check_learned_queries(learned_queries: int, num_queries: int, two_stage: bool) -> None:
    """Raise ValueError, naming the flags, unless learned_queries fits: 0 without two_stage, and fewer than
    num_queries so that at least one query is a proposal."""
    if learned_queries and not two_stage:
        raise ValueError("--learned_queries needs --two_stage (without it every query is learned)")
    if not 0 <= learned_queries < num_queries:
        raise ValueError(
            f"--learned_queries must lie in [0, --num_queries - 1] = [0, {num_queries - 1}], got {learned_queries}"
        )


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


def only_classes(target: Dict[str, Tensor], classes: List[int]) -> Dict[str, Tensor]:
    """The target's 'labels' and 'boxes' restricted to the objects whose label is in classes."""
    keep = torch.isin(target["labels"], torch.as_tensor(classes, device=target["labels"].device))
    return {"labels": target["labels"][keep], "boxes": target["boxes"][keep]}


@torch.no_grad()
def match_to_nearest_anchor(anchors: Tensor, targets: List[Dict[str, Tensor]]) -> List[Tuple[Tensor, Tensor]]:
    """Per image, (token indices, target indices): every target gets the token whose anchor centre is nearest
    to its box centre (L1), one token per target, so that two objects centred in one cell get two tokens."""
    # Imported here so that torch.hub, which installs only torch and torchvision, can build the models.
    from scipy.optimize import linear_sum_assignment

    # Every image's tokens against all the batch's targets, read to the host in one copy (each copy from a GPU
    # waits for it), then cut into each image's own block.
    centres = torch.cat([t["boxes"][:, :2] for t in targets]).float()
    costs = torch.cdist(anchors[..., :2].float(), centres.expand(len(anchors), -1, -1), p=1).cpu()
    indices = []
    for i, cost in enumerate(costs.split([len(t["boxes"]) for t in targets], -1)):
        rows, cols = linear_sum_assignment(cost[i].numpy())
        indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
    return indices


@torch.no_grad()
def add_nearby_tokens(
    anchors: Tensor, targets: List[Dict[str, Tensor]], indices: List[Tuple[Tensor, Tensor]], radius: float
) -> List[Tuple[Tensor, Tensor]]:
    """indices (from match_to_nearest_anchor) plus, per target, every token whose anchor centre lies inside its
    box and within `radius` cells of its centre on both axes. A token near two objects goes to the one whose
    centre is nearer (in cells); the tokens of the first assignment keep their object."""
    # Each image's nearest object per token is found on the device; all images' answers then come to the host in
    # one copy, rather than a few per image (each copy from a GPU waits for it).
    nearest = []
    for image_anchors, t, (rows, _) in zip(anchors, targets, indices):
        centres = image_anchors[:, :2].float()  # [N, 2]
        if len(t["boxes"]) == 0:
            nearest.append(torch.full((2, len(centres)), -1, dtype=torch.int64, device=centres.device))
            continue
        # The cell size along each axis: the step between neighbouring anchor centres.
        step = torch.stack([_grid_step(centres[:, 0]), _grid_step(centres[:, 1])])
        boxes = t["boxes"].float().to(centres.device)  # [K, 4] cxcywh
        offset = (centres[:, None, :] - boxes[None, :, :2]).abs()  # [N, K, 2]
        near = (offset <= radius * step + 1e-6).all(-1) & (offset <= boxes[None, :, 2:] / 2).all(-1)
        distance = (offset / step).sum(-1).masked_fill(~near, float("inf"))  # [N, K], in cells
        # The first assignment's tokens stay as they are (the indices go to the device without waiting for it).
        distance[rows.to(centres.device, non_blocking=True)] = float("inf")
        best_distance, best = distance.min(1)
        nearest.append(torch.stack([best_distance.isfinite().long(), best]))
    nearest = torch.stack(nearest).cpu() if nearest else torch.zeros(0, 2, 0, dtype=torch.int64)  # [B, 2, N]
    out = []
    for (rows, cols), (found, best) in zip(indices, nearest):
        extra = torch.nonzero(found > 0).squeeze(1)
        tokens = torch.cat([rows, extra])
        objects = torch.cat([cols, best[extra]])
        order = tokens.argsort()
        out.append((tokens[order], objects[order]))
    return out


def _grid_step(coordinates: Tensor) -> Tensor:
    """The smallest gap between distinct values of coordinates (1 if there is only one), computed where they are:
    the gaps between neighbours in sorted order, those of equal values left out."""
    ordered = coordinates.sort().values
    gaps = ordered[1:] - ordered[:-1]
    smallest = gaps.masked_fill(gaps <= 0, float("inf")).min() if len(gaps) else coordinates.new_tensor(float("inf"))
    return torch.where(smallest.isfinite(), smallest, torch.ones_like(smallest))
