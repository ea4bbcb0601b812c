"""Training-only supervision for DETR: extra queries and a dense head that exist only in training mode.

DETR learns slowly partly because one-to-one matching gives each object one query to supervise. The methods
here add supervision during training and leave the model that is evaluated, saved and deployed a plain DETR:

  --query_groups K     K - 1 more groups of num_queries learned queries, each matched one-to-one on its own
                       (Group DETR);
  --hybrid_queries M   M more learned queries matched one-to-many: the targets repeated --hybrid_repeats times
                       (H-DETR's hybrid matching);
  --dn_groups G        G groups of noised ground-truth boxes and labels as queries, each trained to give back its
                       source object, with no matching (DN-DETR);
  --dense_aux LAYER    a dense head on a backbone stage or the encoder, every cell near an object's centre
                       learning to propose it (one-to-many, models/two_stage.py's head and assignment), with
                       --dense_queries P of its positive proposals entering the decoder as queries (Co-DETR);
                       --dense_boxes absolute makes its boxes absolute rather than offsets from the cell:
                       DETR's decoder reads an object's position from the content of the encoder memory (its
                       attention values carry no position encoding), so the features must know where they are;
  --position_aux W     every encoder memory cell learns its own position in the image (a linear read-out, L1,
                       weight W): the same reason, for every cell rather than the cells near objects;
  --query_init grid    the learned queries start as the keys' position code on a grid (an initialization only).

Every extra query set sits in the same decoder pass as the main queries, behind a self-attention mask that keeps
each set (each group) to itself: the main queries see only each other, so what they compute in training is
exactly what they compute without the extras, at inference. In eval mode TrainOnlyDETR.predict is DETR.predict.

The original's queries carry no box. A box query (denoising, dense positives) enters the decoder as DETR's
queries do, through the query position: the sine code that the keys use (PositionEmbeddingSine) evaluated at the
box's centre, plus a small MLP (zero at the start) of that code and the same code of the box's width and height.
The centre's code is the one the encoder keys at that spot carry, so the query is a point of the same space as the
keys' positions, where the learned query embeddings also live; the MLP learns to add the size. Its content is the
embedding of its (noised) label.

All training-only weights live under the `train_only` submodule, which state_dict() leaves out: checkpoint['model']
holds exactly DETR's keys. main.py saves them beside it (checkpoint['model_train_only']) for an exact resume.
"""

import argparse
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .detr import DETR, MLP, SetCriterion
from .two_stage import DenseProposals, add_nearby_tokens, dense_losses, match_to_nearest_anchor

DENSE_LAYERS = ("layer2", "layer3", "layer4", "encoder")
PREFIX = "train_only."


def check_train_only_args(args) -> None:
    """Raise ValueError, naming the flags, for a training-only combination that cannot work."""
    if args.query_groups < 1:
        raise ValueError(f"--query_groups must be 1 (off) or more, got {args.query_groups}")
    for flag in ("hybrid_queries", "dn_groups", "dense_queries"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag} must be 0 (off) or more, got {getattr(args, flag)}")
    if args.hybrid_repeats < 1:
        raise ValueError(f"--hybrid_repeats must be 1 or more, got {args.hybrid_repeats}")
    if not 0 <= args.dn_label_noise <= 1 or args.dn_box_noise < 0:
        raise ValueError(
            f"--dn_label_noise must lie in [0, 1] and --dn_box_noise be 0 or more, got "
            f"{args.dn_label_noise} and {args.dn_box_noise}"
        )
    if args.dense_aux not in ("none",) + DENSE_LAYERS:
        raise ValueError(f"--dense_aux must be none or one of {', '.join(DENSE_LAYERS)}, got {args.dense_aux!r}")
    if args.dense_queries and args.dense_aux == "none":
        raise ValueError("--dense_queries takes the dense head's positives: it needs --dense_aux")
    if args.position_aux < 0:
        raise ValueError(f"--position_aux is a loss weight, 0 (off) or more, got {args.position_aux}")
    if args.train_only_epochs < 0:
        raise ValueError(f"--train_only_epochs must be 0 (always on) or more, got {args.train_only_epochs}")
    if not uses_train_only(args):
        return
    if args.two_stage:
        raise ValueError(
            "--query_groups, --hybrid_queries, --dn_groups, --dense_aux and --position_aux train DETR's "
            "learned queries and its encoder: "
            "drop them or --two_stage"
        )
    if args.frozen_weights is not None:
        raise ValueError(
            "--frozen_weights trains the mask head alone; the training-only supervision "
            "(--query_groups, --hybrid_queries, --dn_groups, --dense_aux, --position_aux) trains the box model: "
            "drop one"
        )
    if args.dense_aux.startswith("layer"):
        stage = int(args.dense_aux[-1])
        last = {32: 4, 16: 3, 8: 2}.get(args.feature_stride, 4)
        if stage > last:
            raise ValueError(f"--dense_aux {args.dense_aux}: the backbone ends at layer{last} (--feature_stride)")


def uses_train_only(args) -> bool:
    """Whether any training-only supervision flag is on."""
    return (
        args.query_groups > 1
        or args.hybrid_queries > 0
        or args.dn_groups > 0
        or args.dense_aux != "none"
        or args.position_aux > 0
        or args.query_init != "random"
    )


def sine_box_code(boxes: Tensor, num_pos_feats: int, temperature: int = 10000) -> Tensor:
    """The sine code [..., 4 * num_pos_feats] of boxes [..., 4] (normalized cx, cy, w, h): for each of cy, cx, h, w,
    PositionEmbeddingSine's code of a position (normalize=True, scale 2 pi), so that the (cy, cx) half equals the
    keys' own position code at the box centre."""
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    coords = boxes.float()[..., [1, 0, 3, 2]] * (2 * math.pi)  # (cy, cx, h, w): y before x, as the keys
    angles = coords[..., None] / dim_t  # [..., 4, F]
    code = torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)
    return code.flatten(-2)


class DenseHead(nn.Module, DenseProposals):
    """--dense_aux: models/two_stage.py's proposal heads on a feature map, behind a 1x1 projection to hidden_dim
    where the map is a backbone stage's."""

    def __init__(self, in_channels: int, hidden_dim: int, num_classes: int, anchored: bool = True):
        super().__init__()
        self.input_proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=1) if in_channels != hidden_dim else None
        self.anchored = anchored
        self.build_dense_heads(hidden_dim, num_classes)

    def forward(self, feature_map: Tensor, mask: Tensor) -> Dict[str, Tensor]:
        if self.input_proj is not None:
            feature_map = self.input_proj(feature_map)
        _, logits, boxes, anchors = self.dense_predictions(feature_map, mask, self.anchored)
        return {"pred_logits": logits, "pred_boxes": boxes, "anchors": anchors}


class TrainOnlyDETR(DETR):
    """DETR plus the training-only query sets and dense head of the flags (see the module). In eval mode it is
    DETR; in training mode forward also returns outputs['train_only'], read by TrainOnlyCriterion. The targets of
    the batch reach it through util.misc.training_targets (the denoising and dense queries are built from them)."""

    uses_training_targets = True

    def __init__(
        self,
        backbone: nn.Module,
        transformer: nn.Module,
        num_classes: int,
        num_queries: int,
        aux_loss: bool = False,
        query_groups: int = 1,
        hybrid_queries: int = 0,
        dn_groups: int = 0,
        dn_label_noise: float = 0.2,
        dn_box_noise: float = 0.4,
        dense_aux: str = "none",
        dense_queries: int = 0,
        dense_channels: int = 0,
        query_init: str = "random",
        dense_boxes: str = "anchored",
        position_aux: bool = False,
    ):
        super().__init__(backbone, transformer, num_classes, num_queries, aux_loss)
        d = transformer.d_model
        self.num_classes = num_classes
        self.query_groups = query_groups
        self.hybrid_queries = hybrid_queries
        self.dn_groups = dn_groups
        self.dn_label_noise = dn_label_noise
        self.dn_box_noise = dn_box_noise
        self.dense_aux = dense_aux
        self.dense_queries = dense_queries
        self.position_aux = position_aux
        self.training_targets: Optional[List[Dict[str, Tensor]]] = None
        self._tapped: Dict[str, Tensor] = {}

        self.train_only = nn.Module()
        if query_groups > 1:
            self.train_only.group_embed = nn.Embedding((query_groups - 1) * num_queries, d)
        if hybrid_queries > 0:
            self.train_only.hybrid_embed = nn.Embedding(hybrid_queries, d)
        if dn_groups > 0 or dense_queries > 0:
            # Content: the (noised) label, "no object" for padding; position: the box's sine code, as the keys'.
            self.train_only.label_embed = nn.Embedding(num_classes + 1, d)
            self.train_only.box_embed = MLP(2 * d, d, d, 2)
            # The position starts as the keys' code at the box centre; the MLP learns what to add (the size).
            nn.init.zeros_(self.train_only.box_embed.layers[-1].weight)
            nn.init.zeros_(self.train_only.box_embed.layers[-1].bias)
        if dense_aux != "none":
            anchored = dense_boxes == "anchored"
            self.train_only.dense_head = DenseHead(dense_channels or d, d, num_classes, anchored)
            if dense_aux.startswith("layer"):
                # The stage's output and the batch's padding mask are tapped as the backbone runs (training only).
                body = backbone[0].body
                getattr(body, dense_aux).register_forward_hook(self._tap_feature)
                backbone[0].register_forward_pre_hook(self._tap_mask)
        if position_aux:
            self.train_only.position_head = nn.Conv2d(d, 2, kernel_size=1)
        if query_init == "grid":
            with torch.no_grad():
                self.query_embed.weight.copy_(grid_position_codes(num_queries, d))
                if query_groups > 1:  # each group covers the image, its own points left out
                    codes = [grid_position_codes(num_queries, d, seed=g) for g in range(1, query_groups)]
                    self.train_only.group_embed.weight.copy_(torch.cat(codes))
        # checkpoint['model'] is DETR's: the training-only weights are left out of state_dict() (main.py saves
        # them beside it), and loading a DETR state_dict leaves them as they are.
        self._register_state_dict_hook(_drop_train_only_keys)
        self.register_load_state_dict_post_hook(_ignore_missing_train_only_keys)

    def _tap_feature(self, module: nn.Module, inputs, output: Tensor) -> None:
        if self.training:
            self._tapped["feature"] = output

    def _tap_mask(self, module: nn.Module, inputs) -> None:
        if self.training:
            self._tapped["mask"] = inputs[0].mask

    def train_only_state_dict(self) -> Dict[str, Tensor]:
        """The training-only weights, keys without the train_only. prefix."""
        return self.train_only.state_dict()

    def predict(self, src: Tensor, mask: Tensor, pos: Tensor) -> Tuple[Dict[str, Tensor], Tensor, Tensor, Tensor]:
        """DETR.predict in eval mode; in training mode the main queries' outputs (the same numbers) plus
        outputs['train_only']: each extra query set's outputs and the dense head's."""
        if not self.training:
            return super().predict(src, mask, pos)
        targets = self.training_targets
        if targets is None:
            raise RuntimeError(
                "TrainOnlyDETR in training mode needs the batch's targets: run it inside "
                "util.misc.training_targets(model, targets), as engine.train_one_epoch does"
            )
        bs, c, h, w = src.shape
        src_seq = src.flatten(2).permute(2, 0, 1)
        pos_seq = pos.flatten(2).permute(2, 0, 1)
        mask_seq = mask.flatten(1)
        memory = self.transformer.encoder(src_seq, src_key_padding_mask=mask_seq, pos=pos_seq)
        memory_map = memory.permute(1, 2, 0).reshape(bs, c, h, w)
        extra: Dict = {}

        # The query sets, in decoder order: (name, content [Q, B, d], position [Q, B, d], the number of blocks of
        # equal size it splits into, each attending only within itself: the groups, the denoising groups).
        zeros = torch.zeros(self.num_queries, bs, c, dtype=src.dtype, device=src.device)
        sets: List[Tuple[str, Tensor, Tensor, int]] = []

        def learned(weight: Tensor) -> Tensor:
            return weight.unsqueeze(1).expand(-1, bs, -1)

        sets.append(("main", zeros, learned(self.query_embed.weight), 1))
        if self.query_groups > 1:
            group_pos = learned(self.train_only.group_embed.weight)
            sets.append(("groups", torch.zeros_like(group_pos), group_pos, self.query_groups - 1))
        if self.hybrid_queries > 0:
            hybrid_pos = learned(self.train_only.hybrid_embed.weight)
            sets.append(("hybrid", torch.zeros_like(hybrid_pos), hybrid_pos, 1))
        if self.dense_aux != "none":
            if self.dense_aux == "encoder":
                feature, feature_mask = memory_map, mask
            else:
                feature = self._tapped.pop("feature")
                feature_mask = F.interpolate(self._tapped.pop("mask")[None].float(), size=feature.shape[-2:])
                feature_mask = feature_mask.to(torch.bool)[0]
            extra["dense"] = self.train_only.dense_head(feature, feature_mask)
        if self.position_aux:
            extra["position"] = {
                "pred": self.train_only.position_head(memory_map).float().sigmoid(),
                "target": cell_centres(mask),
                "valid": ~mask,
            }
        if self.dn_groups > 0:
            boxes, labels, known = self._noised_targets(targets)
            content, position = self._box_queries(boxes, labels)
            sets.append(("dn", content, position, self.dn_groups))
            extra["dn_known"] = known
        if self.dense_queries > 0:
            boxes, labels, known = self._dense_positives(extra["dense"], targets)
            content, position = self._box_queries(boxes, labels)
            sets.append(("dense_queries", content, position, 1))
            extra["dense_queries_known"] = known

        tgt = torch.cat([s[1] for s in sets]).to(src.dtype)
        query_pos = torch.cat([s[2] for s in sets]).to(src.dtype)
        attn_mask = block_diagonal_mask([s[1].shape[0] // s[3] for s in sets for _ in range(s[3])], src.device)
        hs = self.transformer.decoder(
            tgt, memory, tgt_mask=attn_mask, memory_key_padding_mask=mask_seq, pos=pos_seq, query_pos=query_pos
        ).transpose(1, 2)  # [layers, B, Q, d]
        outputs_class, box_logits = self.output_heads(hs)
        outputs_coord = box_logits.sigmoid()

        start = 0
        out: Dict = {}
        for name, content, _, _ in sets:
            end = start + content.shape[0]
            outputs = self._outputs(outputs_class[:, :, start:end], outputs_coord[:, :, start:end])
            if name == "main":
                out = outputs
                main_hs = hs[:, :, start:end]
            else:
                extra[name] = outputs
            start = end
        out["train_only"] = extra
        queries = self.query_embed.weight.unsqueeze(0).expand(bs, -1, -1)
        return out, main_hs, memory_map, queries

    def _box_queries(self, boxes: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
        """(content, position) [Q, B, d] of box queries from boxes [B, Q, 4] and labels [B, Q]."""
        content = self.train_only.label_embed(labels)
        code = sine_box_code(boxes, self.transformer.d_model // 2)  # [B, Q, 2d]: centre (as the keys), then size
        position = code[..., : self.transformer.d_model] + self.train_only.box_embed(code)
        return content.transpose(0, 1), position.transpose(0, 1)

    @torch.no_grad()
    def _noised_targets(self, targets: List[Dict[str, Tensor]]) -> Tuple[Tensor, Tensor, List[Tuple[Tensor, Tensor]]]:
        """The denoising queries' boxes [B, G * n, 4] and labels [B, G * n] (n: the most targets of an image, at
        least 1), and per image (query indices, target indices) of the queries that carry a target: group g's
        slot j is target j, its label flipped to a random class with probability dn_label_noise and its box's
        centre and size moved by up to dn_box_noise / 2 of its size (DN-DETR). Padding slots: "no object"."""
        n = max(1, max(len(t["labels"]) for t in targets))
        device = self.query_embed.weight.device
        boxes = torch.zeros(len(targets), self.dn_groups, n, 4, device=device)
        boxes[..., :2] = 0.5
        boxes[..., 2:] = 0.1
        labels = torch.full((len(targets), self.dn_groups, n), self.num_classes, dtype=torch.int64, device=device)
        known = []
        for i, t in enumerate(targets):
            k = len(t["labels"])
            source = t["boxes"].float().unsqueeze(0).expand(self.dn_groups, -1, -1)
            wh = source[..., 2:].repeat(1, 1, 2)
            noise = (torch.rand_like(source) * 2 - 1) * wh * self.dn_box_noise / 2
            boxes[i, :, :k] = (source + noise).clamp(0.0, 1.0)
            flip = torch.rand(self.dn_groups, k, device=device) < self.dn_label_noise
            random_labels = torch.randint(0, self.num_classes, (self.dn_groups, k), device=device)
            labels[i, :, :k] = torch.where(flip, random_labels, t["labels"].unsqueeze(0).expand(self.dn_groups, -1))
            slots = torch.arange(k) + n * torch.arange(self.dn_groups)[:, None]
            known.append((slots.flatten(), torch.arange(k).repeat(self.dn_groups)))
        return boxes.flatten(1, 2), labels.flatten(1, 2), known

    @torch.no_grad()
    def _dense_positives(
        self, dense: Dict[str, Tensor], targets: List[Dict[str, Tensor]]
    ) -> Tuple[Tensor, Tensor, List[Tuple[Tensor, Tensor]]]:
        """Up to dense_queries positive proposals of the dense head per image (the cells its one-to-many
        assignment gives an object, as TrainOnlyCriterion's dense loss assigns them), their predicted boxes and
        classes as queries, each trained towards its cell's object (Co-DETR). Returns boxes [B, P, 4], labels
        [B, P] and per image (query indices, target indices); free slots are padding ("no object")."""
        p = self.dense_queries
        pred_boxes = dense["pred_boxes"].float()
        pred_labels = dense["pred_logits"][..., :-1].argmax(-1)
        indices = add_nearby_tokens(dense["anchors"], targets, match_to_nearest_anchor(dense["anchors"], targets), 1.0)
        boxes = pred_boxes.new_zeros(len(targets), p, 4)
        boxes[..., :2] = 0.5
        boxes[..., 2:] = 0.1
        labels = torch.full((len(targets), p), self.num_classes, dtype=torch.int64, device=pred_boxes.device)
        known = []
        for i, (cells, objects) in enumerate(indices):
            if len(cells) > p:  # a random p of them
                keep = torch.randperm(len(cells))[:p].sort()[0]
                cells, objects = cells[keep], objects[keep]
            cells_d = cells.to(pred_boxes.device)
            boxes[i, : len(cells)] = pred_boxes[i, cells_d]
            labels[i, : len(cells)] = pred_labels[i, cells_d]
            known.append((torch.arange(len(cells)), objects))
        return boxes, labels, known


def grid_position_codes(num: int, d: int, seed: int = 0) -> Tensor:
    """num query positions [num, d]: the keys' sine position code (PositionEmbeddingSine, normalized) at the points
    of the smallest square grid with at least num points, the points left over dropped at random (by `seed`)."""
    side = math.ceil(math.sqrt(num))
    centres = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    points = torch.stack(torch.meshgrid(centres, centres, indexing="xy"), -1).reshape(-1, 2)  # (cx, cy)
    keep = torch.randperm(len(points), generator=torch.Generator().manual_seed(seed))[:num].sort()[0]
    boxes = torch.cat([points[keep], torch.zeros(num, 2)], 1)
    return sine_box_code(boxes, d // 2)[:, :d]


def cell_centres(mask: Tensor) -> Tensor:
    """[B, 2, h, w]: each cell's centre (x, y) in the coordinates of DETR's boxes, which are normalized by the
    image's unpadded size; mask [B, h, w] is True on padding (which lies right and below)."""
    width = (~mask[:, 0, :]).sum(-1).clamp(min=1).float()
    height = (~mask[:, :, 0]).sum(-1).clamp(min=1).float()
    h, w = mask.shape[-2:]
    xs = (torch.arange(w, device=mask.device, dtype=torch.float32) + 0.5)[None, None, :] / width[:, None, None]
    ys = (torch.arange(h, device=mask.device, dtype=torch.float32) + 0.5)[None, :, None] / height[:, None, None]
    return torch.stack([xs.expand(-1, h, -1), ys.expand(-1, -1, w)], dim=1)


def block_diagonal_mask(sizes: List[int], device: torch.device) -> Tensor:
    """A boolean self-attention mask [Q, Q] (True: blocked) that lets each of the consecutive blocks of `sizes`
    queries attend within itself only."""
    block = torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.as_tensor(sizes, device=device))
    return block[:, None] != block[None, :]


def _drop_train_only_keys(module: nn.Module, state_dict: Dict[str, Tensor], prefix: str, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + PREFIX)]:
        del state_dict[key]


def _ignore_missing_train_only_keys(module: nn.Module, incompatible_keys) -> None:
    missing = incompatible_keys.missing_keys
    for key in [k for k in missing if PREFIX in k]:
        missing.remove(key)


def find_train_only_model(model: nn.Module) -> Optional[TrainOnlyDETR]:
    """The TrainOnlyDETR inside `model` (itself, under DETRsegm, DistributedDataParallel...), None if there is none."""
    for module in model.modules():
        if isinstance(module, TrainOnlyDETR):
            return module
    return None


class TrainOnlyCriterion(SetCriterion):
    """SetCriterion's loss of the main queries plus each training-only part's, its terms suffixed: _groups (the
    extra groups, each matched one-to-one on its own, averaged over the groups), _hybrid (one-to-many: the targets
    repeated), _dn and _dense_queries (box queries against their own targets, no matching), _dense (the dense
    head, one-to-many by position), each decoder set's layers with aux_loss as _0, _1...; with --train_only_epochs
    E their weights fade linearly to 0 over the first E epochs (set_epoch)."""

    def __init__(
        self,
        num_classes: int,
        matcher: nn.Module,
        weight_dict: Dict[str, float],
        eos_coef: float,
        losses: List[str],
        num_queries: int,
        hybrid_repeats: int = 6,
        dense_radius: float = 1.0,
        train_only_epochs: int = 0,
    ):
        super().__init__(num_classes, matcher, weight_dict, eos_coef, losses)
        self.num_queries = num_queries
        self.hybrid_repeats = hybrid_repeats
        self.dense_radius = dense_radius
        self.train_only_epochs = train_only_epochs
        self.base_weights = dict(weight_dict)

    def set_epoch(self, epoch: int) -> None:
        """With train_only_epochs E: the training-only terms weigh 1 - epoch / E of their weight (0 from epoch E)."""
        if self.train_only_epochs <= 0:
            return
        scale = max(0.0, 1.0 - epoch / self.train_only_epochs)
        for key, value in self.base_weights.items():
            if is_train_only_term(key):
                self.weight_dict[key] = value * scale

    def forward(self, outputs: Dict, targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        losses = super().forward(outputs, targets)
        extra = outputs.get("train_only")
        if extra is None:  # eval mode: the model is DETR
            return losses
        device = outputs["pred_logits"].device
        num_boxes = self.num_boxes(targets, device)
        if "groups" in extra:
            losses.update(self._group_losses(extra["groups"], targets, num_boxes))
        if "hybrid" in extra:
            k = self.hybrid_repeats
            repeated = [{"labels": t["labels"].repeat(k), "boxes": t["boxes"].repeat(k, 1)} for t in targets]
            losses.update(self._matched_losses(extra["hybrid"], repeated, num_boxes * k, "_hybrid"))
        for name in ("dn", "dense_queries"):
            if name in extra:
                known = extra[name + "_known"]
                count = self.mean_count(sum(len(q) for q, _ in known), device)
                losses.update(self._fixed_losses(extra[name], targets, known, count, "_" + name))
        if "position" in extra:
            position = extra["position"]
            error = (position["pred"] - position["target"]).abs().sum(1)  # [B, h, w]
            valid = position["valid"]
            losses["loss_position"] = (error * valid).sum() / valid.sum().clamp(min=1)
        if "dense" in extra:
            losses.update(dense_losses(self, extra["dense"], targets, self.dense_radius, num_boxes, "_dense")[0])
        return losses

    def _all_layers(self, outputs: Dict) -> List[Tuple[Dict, str]]:
        """(outputs, suffix) of the last decoder layer ('') and, with aux_loss, the others ('_0', '_1', ...)."""
        layers = [(outputs, "")]
        layers += [(aux, f"_{i}") for i, aux in enumerate(outputs.get("aux_outputs", []))]
        return layers

    def _matched_losses(self, outputs: Dict, targets, num_boxes: Tensor, suffix: str) -> Dict[str, Tensor]:
        losses: Dict[str, Tensor] = {}
        for layer, layer_suffix in self._all_layers(outputs):
            indices = self.matcher(layer, targets)
            losses.update(self._intermediate_losses(layer, targets, indices, num_boxes, suffix + layer_suffix))
        return losses

    def _fixed_losses(self, outputs: Dict, targets, indices, num_boxes: Tensor, suffix: str) -> Dict[str, Tensor]:
        losses: Dict[str, Tensor] = {}
        for layer, layer_suffix in self._all_layers(outputs):
            losses.update(self._intermediate_losses(layer, targets, indices, num_boxes, suffix + layer_suffix))
        return losses

    def _group_losses(self, outputs: Dict, targets, num_boxes: Tensor) -> Dict[str, Tensor]:
        """The extra groups' terms: one Hungarian matching per group, all groups' pairs in one loss, divided by
        the number of groups times the boxes (so the terms are the groups' mean)."""
        n = self.num_queries
        losses: Dict[str, Tensor] = {}
        for layer, layer_suffix in self._all_layers(outputs):
            indices = group_matching(self.matcher, layer, targets, n)
            groups = layer["pred_logits"].shape[1] // n
            suffix = "_groups" + layer_suffix
            losses.update(self._intermediate_losses(layer, targets, indices, num_boxes * groups, suffix))
        return losses


def group_matching(
    matcher: nn.Module, outputs: Dict[str, Tensor], targets: List[Dict[str, Tensor]], group_size: int
) -> List[Tuple[Tensor, Tensor]]:
    """Per image, (query indices, target indices) of a Hungarian matching done in each group of group_size queries
    on its own, the query indices offset to the group's place: every target is matched once per group."""
    groups = outputs["pred_logits"].shape[1] // group_size
    slices = [slice(g * group_size, (g + 1) * group_size) for g in range(groups)]
    per_group = [matcher({k: outputs[k][:, s] for k in ("pred_logits", "pred_boxes")}, targets) for s in slices]
    indices = []
    for i in range(len(targets)):
        rows = torch.cat([per_group[g][i][0] + g * group_size for g in range(groups)])
        cols = torch.cat([per_group[g][i][1] for g in range(groups)])
        indices.append((rows, cols))
    return indices


TRAIN_ONLY_SUFFIXES = ("_groups", "_hybrid", "_dn", "_dense_queries", "_dense", "_position")


def is_train_only_term(key: str) -> bool:
    """Whether a loss term's name is a training-only part's (suffixed _groups, _hybrid, _dn, _dense...)."""
    return any(s in key for s in TRAIN_ONLY_SUFFIXES)


def train_only_weight_dict(weight_dict: Dict[str, float], args) -> Dict[str, float]:
    """The weights of the training-only terms: the main terms' (loss_ce, loss_bbox, loss_giou and their _i per
    decoder layer), under each enabled part's suffix; the dense head's as one decoder layer's."""
    base = {k: v for k, v in weight_dict.items() if k in ("loss_ce", "loss_bbox", "loss_giou")}
    parts = []
    if args.query_groups > 1:
        parts.append("_groups")
    if args.hybrid_queries > 0:
        parts.append("_hybrid")
    if args.dn_groups > 0:
        parts.append("_dn")
    if args.dense_queries > 0:
        parts.append("_dense_queries")
    out: Dict[str, float] = {}
    for part in parts:
        for key, value in weight_dict.items():
            term = next((t for t in base if key == t or key.startswith(t + "_")), None)
            if term is not None:  # loss_ce_0 -> loss_ce_hybrid_0
                out[term + part + key[len(term) :]] = value
    if args.dense_aux != "none":
        out.update({k + "_dense": v for k, v in base.items()})
    if args.position_aux > 0:
        out["loss_position"] = args.position_aux
    return out


def add_train_only_args(parser) -> None:
    """The training-only supervision flags, in one argument group; every default leaves the original's training."""
    group = parser.add_argument_group(
        "training-only supervision (off by default; the model evaluated and saved stays DETR: docs/train_only.md)"
    )
    group.add_argument(
        "--query_groups",
        default=1,
        type=int,
        help="K > 1: K - 1 more groups of --num_queries learned queries, "
        "each matched one-to-one on its own, seen only in training (Group DETR)",
    )
    group.add_argument(
        "--hybrid_queries",
        default=0,
        type=int,
        help="M > 0: M more learned queries matched one-to-many to "
        "the targets repeated --hybrid_repeats times, seen only in training (H-DETR)",
    )
    group.add_argument("--hybrid_repeats", default=6, type=int, help="with --hybrid_queries: the targets' repeats")
    group.add_argument(
        "--dn_groups",
        default=0,
        type=int,
        help="G > 0: G groups of noised ground-truth boxes and labels as "
        "queries, each trained to give back its object, with no matching (DN-DETR)",
    )
    group.add_argument("--dn_label_noise", default=0.2, type=float, help="with --dn_groups: labels flipped")
    group.add_argument(
        "--dn_box_noise",
        default=0.4,
        type=float,
        help="with --dn_groups: box centre and size moved by up to this much of its size, in total",
    )
    group.add_argument(
        "--dense_aux",
        default="none",
        help="none, layer2, layer3, layer4 or encoder: a dense head on that "
        "map whose cells near an object's centre learn to propose it (one-to-many)",
    )
    group.add_argument(
        "--dense_radius",
        default=1.0,
        type=float,
        help="with --dense_aux: cells within this many of an object's centre (and inside its box) learn it",
    )
    group.add_argument(
        "--dense_boxes",
        default="anchored",
        choices=("anchored", "absolute"),
        help="with --dense_aux: each cell's box as an offset from an anchor at the cell, or in absolute "
        "coordinates, which teaches the features where they are (DETR's decoder reads positions from them)",
    )
    group.add_argument(
        "--dense_queries",
        default=0,
        type=int,
        help="P > 0, with --dense_aux: up to P of the dense head's "
        "positive proposals per image enter the decoder as queries in training (Co-DETR)",
    )
    group.add_argument(
        "--position_aux",
        default=0.0,
        type=float,
        help="W > 0: every cell of the encoder memory learns its own position in the image through a linear "
        "read-out (L1 loss of weight W), so that the attention values the decoder reads tell where they are",
    )
    group.add_argument(
        "--query_init",
        default="random",
        choices=("random", "grid"),
        help="grid: each learned query (and extra group's) starts as the keys' sine position code at a point of "
        "a grid over the image, so that cross-attention starts out looking near it (random: the original's)",
    )
    group.add_argument(
        "--train_only_epochs",
        default=0,
        type=int,
        help="E > 0: the training-only terms' weights fade "
        "linearly to 0 over the first E epochs (0: full weight throughout)",
    )


def deployed_args(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of args with every training-only flag at its default: the flags of the model a checkpoint deploys,
    a plain DETR (what tools/ and conversions build from a checkpoint's 'args')."""
    parser = argparse.ArgumentParser(add_help=False)
    add_train_only_args(parser)
    return argparse.Namespace(**{**vars(args), **vars(parser.parse_args([]))})
