"""DETR on one page: start reading here.

DETR (Carion et al., 2020) detects objects by predicting a *set* of boxes at once, with no anchors and no
non-maximum suppression. This file holds the whole detector and nothing else, in plain PyTorch:

  1. a ResNet-50 turns the image into a grid of features (1/32 of the image's size, 2048 channels), which a
     1x1 convolution narrows to the transformer's width;
  2. each cell of the grid is told where it is: a learned embedding of its row and one of its column;
  3. a standard nn.Transformer encodes the grid, and its decoder answers a fixed number of learned
     "object queries", each of which becomes one prediction;
  4. two heads read each answer: class logits (the last class means "no object") and a box (centre x,
     centre y, width, height, as fractions of the image).

Training matches the predictions to the ground-truth objects one-to-one (Hungarian matching) and applies a
classification and a box loss to the pairs; that, and everything a real run needs, is in the rest of the code
base: models/backbone.py (frozen batch norm, masks for batches of different sizes), models/position_encoding.py
(the paper's sine encoding), models/transformer.py (positions added at every attention layer),
models/detr.py (the model, the set loss SetCriterion, PostProcess), models/matcher.py (HungarianMatcher),
main.py and engine.py (training). The shortcuts taken here: one image size per batch (no padding masks),
positions added once at the input rather than at every layer, no auxiliary decoder losses.

    python docs/detr_minimal.py IMAGE                     # random weights: the plumbing, not real detections
    python docs/detr_minimal.py IMAGE --weights W.pth     # a state_dict of MinimalDETR
    python docs/detr_minimal.py IMAGE --imagenet_backbone # ImageNet ResNet-50 weights (torchvision download)
"""

import argparse

import torch
import torchvision
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms import functional as TF


class MinimalDETR(nn.Module):
    """A complete DETR forward pass: images [B, 3, H, W] (ImageNet-normalized) -> pred_logits [B, Q,
    num_classes + 1] and pred_boxes [B, Q, 4] (cx, cy, w, h in [0, 1])."""

    def __init__(
        self,
        num_classes: int = 91,
        hidden_dim: int = 256,
        nheads: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        num_queries: int = 100,
        imagenet_backbone: bool = False,
    ):
        super().__init__()
        weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V1 if imagenet_backbone else None
        resnet = torchvision.models.resnet50(weights=weights)
        # Everything but the global pooling and the ImageNet classifier: a feature map of stride 32.
        self.backbone = nn.Sequential(*list(resnet.children())[:-2])
        self.input_proj = nn.Conv2d(2048, hidden_dim, kernel_size=1)
        self.transformer = nn.Transformer(
            hidden_dim,
            nheads,
            num_encoder_layers,
            num_decoder_layers,
            dim_feedforward=2048,
            dropout=0.1,
            batch_first=True,
        )
        # Half of each position vector says the row, half the column; 50 of each covers images up to 1600 px.
        self.row_embed = nn.Parameter(torch.rand(50, hidden_dim // 2))
        self.col_embed = nn.Parameter(torch.rand(50, hidden_dim // 2))
        # One learned query per prediction slot: the decoder turns each into "what is in my slot".
        self.query_embed = nn.Parameter(torch.rand(num_queries, hidden_dim))
        self.class_head = nn.Linear(hidden_dim, num_classes + 1)  # + 1: "no object"
        self.box_head = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, 4),
        )

    def positions(self, h: int, w: int) -> Tensor:
        """[h * w, hidden_dim]: for the cell in row i and column j, column embedding j then row embedding i."""
        if h > len(self.row_embed) or w > len(self.col_embed):
            raise ValueError(
                f"a {h}x{w} feature map needs more than the {len(self.row_embed)} learned rows and "
                "columns: use images of at most 1600 pixels a side"
            )
        cols = self.col_embed[:w].unsqueeze(0).expand(h, w, -1)
        rows = self.row_embed[:h].unsqueeze(1).expand(h, w, -1)
        return torch.cat([cols, rows], dim=-1).flatten(0, 1)

    def forward(self, images: Tensor) -> dict:
        features = self.input_proj(self.backbone(images))  # [B, d, h, w]
        batch, _, h, w = features.shape
        # The grid as a sequence of h * w tokens, each knowing its place.
        tokens = features.flatten(2).transpose(1, 2) + self.positions(h, w)  # [B, h * w, d]
        queries = self.query_embed.unsqueeze(0).expand(batch, -1, -1)  # [B, Q, d]
        answers = self.transformer(tokens, queries)  # [B, Q, d]
        return {"pred_logits": self.class_head(answers), "pred_boxes": self.box_head(answers).sigmoid()}


# ----------------------------------------------------------------------------------------------------------
# Running it on an image

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def load_image(path: str, size: int) -> tuple:
    """(the RGB image, its tensor [1, 3, H', W'] with shorter side `size`, ImageNet-normalized)."""
    image = Image.open(path).convert("RGB")
    tensor = TF.normalize(TF.to_tensor(TF.resize(image, size)), IMAGENET_MEAN, IMAGENET_STD)
    return image, tensor.unsqueeze(0)


def top_predictions(outputs: dict, width: int, height: int, k: int = 5) -> list:
    """The k most confident queries of the first image: (score, class, (x0, y0, x1, y1) in pixels)."""
    probabilities = outputs["pred_logits"][0].softmax(-1)[:, :-1]  # drop "no object"
    scores, classes = probabilities.max(-1)
    best = scores.topk(min(k, len(scores))).indices
    cx, cy, w, h = outputs["pred_boxes"][0, best].unbind(-1)
    boxes = torch.stack([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height], -1)
    return [(scores[q].item(), classes[q].item(), tuple(box.tolist())) for q, box in zip(best, boxes)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser("docs/detr_minimal.py", description="Run the one-page DETR on an image.")
    parser.add_argument("image")
    parser.add_argument("--weights", help="a state_dict of MinimalDETR (default: random weights)")
    parser.add_argument("--imagenet_backbone", action="store_true", help="start from ImageNet ResNet-50 weights")
    parser.add_argument("--num_classes", default=91, type=int, help="91: COCO's category ids 0..90")
    parser.add_argument("--size", default=800, type=int, help="shorter side of the image fed to the model")
    parser.add_argument("--top", default=5, type=int, help="how many predictions to print")
    args = parser.parse_args(argv)

    model = MinimalDETR(num_classes=args.num_classes, imagenet_backbone=args.imagenet_backbone)
    if args.weights:
        state = torch.load(args.weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("model", state))
    else:
        print("random weights (give --weights): the predictions below show the output format only")
    model.eval()  # dropout off: the same image always gives the same predictions
    image, tensor = load_image(args.image, args.size)
    with torch.no_grad():
        outputs = model(tensor)
    print(f"{args.image}: {image.width}x{image.height}, {outputs['pred_logits'].shape[1]} queries; the top {args.top}:")
    for score, label, (x0, y0, x1, y1) in top_predictions(outputs, image.width, image.height, args.top):
        print(f"  score {score:.3f}  class {label:3d}  box ({x0:.0f}, {y0:.0f}) - ({x1:.0f}, {y1:.0f})")


if __name__ == "__main__":
    main()
