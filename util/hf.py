"""Hugging Face `transformers` DETR model folders (config.json + model.safetensors) in and out, without
`transformers`: the weights are renamed, the attention projections split or joined, and the configuration
rebuilt from a checkpoint's args (and back).

    checkpoint = read_hf_folder("detr-resnet-50")         # {'model': state_dict, 'args': Namespace, ...}
    write_hf_folder(checkpoint, "my-detr-hf")              # DetrForObjectDetection.from_pretrained loads it

Both backbone layouts of the hub are read: timm's ResNet names (`model.backbone.conv_encoder.model.layer1...`,
as facebook/detr-resnet-50's main revision holds) and transformers' own ResNet
(`...conv_encoder.model.encoder.stages.0.layers.0.layer.0.convolution`). The names are those of the files on the
hub, which save_pretrained still writes (`out_proj`, `fc1`, `mask_head.lay1`), not the in-memory names of
transformers 5. Nothing in a folder runs: safetensors files are read with `safetensors`, a `.bin` with
torch.load(weights_only=True), and config.json is checked key by key.
"""

import argparse
import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torchvision
from torch import Tensor

from util.config import architecture_flags, complete_args, parser_defaults

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
PREPROCESSOR_NAME = "preprocessor_config.json"

# What pipeline("object-detection") resizes and normalizes images with: by default DETR's COCO evaluation (shorter
# side 800, longer at most 1333, ImageNet statistics), as the hub's facebook/detr-resnet-50 has it; write_hf_folder's
# `resize` replaces the sizes.
PREPROCESSOR_CONFIG = {
    "image_processor_type": "DetrImageProcessor",
    "format": "coco_detection",
    "do_resize": True,
    "size": {"shortest_edge": 800, "longest_edge": 1333},
    "resample": 2,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "do_pad": True,
}

# torchvision ResNets by (block type, blocks per stage), the form of transformers' ResNetConfig.
RESNET_DEPTHS = {
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet34": ("basic", [3, 4, 6, 3]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]),
    "resnet101": ("bottleneck", [3, 4, 23, 3]),
    "resnet152": ("bottleneck", [3, 8, 36, 3]),
}

# main.py flags <-> DetrConfig keys that mean the same number (the matcher's costs and the loss weights).
LOSS_KEYS = {
    "set_cost_class": "class_cost",
    "set_cost_bbox": "bbox_cost",
    "set_cost_giou": "giou_cost",
    "bbox_loss_coef": "bbox_loss_coefficient",
    "giou_loss_coef": "giou_loss_coefficient",
    "mask_loss_coef": "mask_loss_coefficient",
    "dice_loss_coef": "dice_loss_coefficient",
    "eos_coef": "eos_coefficient",
}


class HFFolderError(RuntimeError):
    """A Hugging Face model folder, or a checkpoint bound for one, that cannot be converted."""


def is_hf_folder(path) -> bool:
    """Whether `path` is a folder (an HF model folder is one; a checkpoint is a file)."""
    return not str(path).startswith(("http://", "https://")) and os.path.isdir(path)


# The configuration --------------------------------------------------------------------------------------------


def _get(config: dict, key: str, kind, source: str, default=None, required: bool = True):
    """config[key] checked to be of `kind`; a missing required key or a value of another type raises, naming both."""
    if key not in config or config[key] is None:
        if required and default is None:
            raise HFFolderError(f"{source}: the key {key!r} is missing")
        return default
    value = config[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise HFFolderError(f"{source}: the key {key!r} must be {names}, got {value!r}")
    return value


def _positive(config: dict, key: str, source: str, default=None) -> int:
    value = _get(config, key, int, source, default)
    if value < 1:
        raise HFFolderError(f"{source}: the key {key!r} must be a positive integer, got {value!r}")
    return value


def _resnet_from_depths(backbone_config: dict, source: str) -> str:
    layer_type = _get(backbone_config, "layer_type", str, source, "bottleneck")
    depths = _get(backbone_config, "depths", list, source, [3, 4, 6, 3])
    for name, (kind, blocks) in RESNET_DEPTHS.items():
        if kind == layer_type and blocks == depths:
            return name
    raise HFFolderError(
        f"{source}: backbone_config 'layer_type' {layer_type!r} with 'depths' {depths} is no "
        f"torchvision ResNet ({', '.join(RESNET_DEPTHS)})"
    )


def args_from_config(config: dict, source: str) -> Tuple[argparse.Namespace, str, Dict[int, str]]:
    """(main.py's args, the backbone layout 'timm' or 'transformers', id2label) of a DetrConfig dict; what the
    project's DETR cannot be is refused, naming `source` (the config file) and the key. args.num_classes is None
    where the config gives no label count (neither 'id2label' nor 'num_labels')."""
    if not isinstance(config, dict):
        raise HFFolderError(f"{source}: expected a JSON object, got {type(config).__name__}")
    model_type = _get(config, "model_type", str, source, "detr")
    if model_type != "detr":
        raise HFFolderError(
            f"{source}: the key 'model_type' is {model_type!r}; only DETR ('detr') models convert "
            "(Conditional, Deformable and other DETR variants have other architectures)"
        )
    d_model = _positive(config, "d_model", source, 256)
    heads = _positive(config, "encoder_attention_heads", source, 8)
    for key, value in (("decoder_attention_heads", heads), ("decoder_ffn_dim", config.get("encoder_ffn_dim", 2048))):
        if config.get(key, value) != value:
            raise HFFolderError(
                f"{source}: the key {key!r} ({config[key]!r}) differs from its encoder's "
                f"({value!r}); the project's DETR has one value for both"
            )
    if d_model % heads:
        raise HFFolderError(f"{source}: 'd_model' {d_model} is not divisible by 'encoder_attention_heads' {heads}")
    activation = _get(config, "activation_function", str, source, "relu")
    if activation != "relu":
        raise HFFolderError(f"{source}: the key 'activation_function' is {activation!r}; the project's DETR uses relu")
    if _get(config, "num_channels", int, source, 3) != 3:
        raise HFFolderError(f"{source}: the key 'num_channels' must be 3 (RGB images), got {config['num_channels']!r}")
    position = _get(config, "position_embedding_type", str, source, "sine")
    if position not in ("sine", "learned"):
        raise HFFolderError(
            f"{source}: the key 'position_embedding_type' must be 'sine' or 'learned', got {position!r}"
        )
    id2label = _get(config, "id2label", dict, source, required=False)
    if id2label is not None:
        try:
            id2label = {int(k): str(v) for k, v in id2label.items()}
        except ValueError:
            raise HFFolderError(
                f"{source}: the keys of 'id2label' must be integers, got {list(id2label)[:5]}"
            ) from None
        if sorted(id2label) != list(range(len(id2label))):
            raise HFFolderError(f"{source}: 'id2label' must number its labels 0..N-1, got {sorted(id2label)[:10]}")
        num_labels = len(id2label)
    else:
        # transformers writes neither key when the count is its default (2): the weights then tell (hf_to_checkpoint).
        num_labels = _get(config, "num_labels", int, source, required=False)
        if num_labels is not None and num_labels < 1:
            raise HFFolderError(f"{source}: the key 'num_labels' must be a positive integer, got {num_labels!r}")
        id2label = {}
    dilation = _get(config, "dilation", bool, source, False)

    backbone_config = _get(config, "backbone_config", dict, source, required=False)
    backbone_source = f"{source} (backbone_config)"
    if _get(
        config,
        "use_timm_backbone",
        bool,
        source,
        backbone_config is None or backbone_config.get("model_type") == "timm_backbone",
    ):
        layout = "timm"
        if backbone_config is not None and backbone_config.get("model_type") == "timm_backbone":
            name = _get(backbone_config, "backbone", str, backbone_source)
            stride = _get(backbone_config, "output_stride", int, backbone_source, required=False)
            if stride not in (None, 16, 32):
                raise HFFolderError(f"{backbone_source}: 'output_stride' {stride} is not 32 (plain) or 16 (DC5)")
            dilation = dilation or stride == 16
        else:
            name = _get(config, "backbone", str, source, "resnet50")
        kwargs = config.get("backbone_kwargs") or {}
        if set(kwargs) - {"out_indices", "output_stride", "in_chans"}:
            raise HFFolderError(
                f"{source}: 'backbone_kwargs' {kwargs} change the backbone in ways the project's DETR does not follow"
            )
        if kwargs.get("output_stride") == 16:
            dilation = True
        if name not in RESNET_DEPTHS:
            where = backbone_source if backbone_config is not None and "backbone" in backbone_config else source
            raise HFFolderError(
                f"{where}: the key 'backbone' is {name!r}; the project's DETR takes a torchvision "
                f"ResNet ({', '.join(RESNET_DEPTHS)}), which timm's plain ResNets of these names equal"
            )
    else:
        layout = "transformers"
        if backbone_config is None:
            name = "resnet50"  # transformers' default ResNetConfig
        else:
            if backbone_config.get("model_type", "resnet") != "resnet":
                raise HFFolderError(
                    f"{backbone_source}: 'model_type' is {backbone_config.get('model_type')!r}; "
                    "only ResNet backbones convert"
                )
            name = _resnet_from_depths(backbone_config, backbone_source)
            if _get(backbone_config, "embedding_size", int, backbone_source, 64) != 64:
                raise HFFolderError(f"{backbone_source}: 'embedding_size' must be 64, as in torchvision's ResNets")
            for key in ("downsample_in_first_stage", "downsample_in_bottleneck"):
                if _get(backbone_config, key, bool, backbone_source, False):
                    raise HFFolderError(f"{backbone_source}: {key!r} true is not torchvision's ResNet")
        if dilation:
            raise HFFolderError(
                f"{source}: the key 'dilation' is true with transformers' ResNet backbone, which "
                "transformers does not dilate; DC5 models use the timm backbone"
            )
    if dilation and RESNET_DEPTHS[name][0] == "basic":
        raise HFFolderError(f"{source}: 'dilation' needs a bottleneck ResNet; {name} has basic blocks")

    # What config.json says, and no more: the flags it does not hold are at main.py's defaults, the original DETR's
    # network, which a reader of the checkpoint fills in (util.config.complete_args).
    args = argparse.Namespace(backbone=name, dilation=dilation, position_embedding=position)
    args.hidden_dim, args.nheads = d_model, heads
    args.enc_layers = _positive(config, "encoder_layers", source, 6)
    args.dec_layers = _positive(config, "decoder_layers", source, 6)
    args.dim_feedforward = _positive(config, "encoder_ffn_dim", source, 2048)
    args.num_queries = _positive(config, "num_queries", source, 100)
    args.dropout = float(_get(config, "dropout", (int, float), source, 0.1))
    args.num_classes = num_labels
    for flag, key in LOSS_KEYS.items():
        value = _get(config, key, (int, float), source, required=False)
        if value is not None:
            setattr(args, flag, float(value))
    args.aux_loss = True  # DetrConfig's auxiliary_loss defaults off; the project trains with it, as the original
    return args, layout, id2label


def config_from_args(args: argparse.Namespace, layout: str, id2label: Dict[int, str]) -> dict:
    """A DetrConfig dict (the flat form of the hub's facebook/detr-resnet-50, which transformers 4 and 5 read)."""
    config = {
        "architectures": ["DetrForSegmentation" if args.masks else "DetrForObjectDetection"],
        "model_type": "detr",
        "d_model": args.hidden_dim,
        "encoder_layers": args.enc_layers,
        "decoder_layers": args.dec_layers,
        "encoder_attention_heads": args.nheads,
        "decoder_attention_heads": args.nheads,
        "encoder_ffn_dim": args.dim_feedforward,
        "decoder_ffn_dim": args.dim_feedforward,
        "num_queries": args.num_queries,
        "position_embedding_type": "learned" if args.position_embedding in ("learned", "v3") else "sine",
        "activation_function": "relu",
        # The project's --dropout acts on the residuals, the attention weights and the feed-forward activations.
        "dropout": args.dropout,
        "attention_dropout": args.dropout,
        "activation_dropout": args.dropout,
        "encoder_layerdrop": 0.0,
        "decoder_layerdrop": 0.0,
        "auxiliary_loss": False,
        "init_std": 0.02,
        "init_xavier_std": 1.0,
        "is_encoder_decoder": True,
        "num_channels": 3,
        "dilation": bool(args.dilation),
        "use_pretrained_backbone": False,
        "id2label": {str(i): id2label.get(i, f"LABEL_{i}") for i in range(args.num_classes)},
        "torch_dtype": "float32",
    }
    config["label2id"] = {name: int(i) for i, name in config["id2label"].items()}
    for flag, key in LOSS_KEYS.items():
        value = float(getattr(args, flag))
        if key == "eos_coefficient":
            config[key] = value
        elif value.is_integer():
            config[key] = int(value)
        # else left out: transformers 5 takes whole numbers only for these training-only weights
    if layout == "timm":
        config.update(use_timm_backbone=True, backbone=args.backbone, backbone_config=None)
    else:
        kind, depths = RESNET_DEPTHS[args.backbone]
        width = 4 if kind == "bottleneck" else 1
        stages = ["stage1", "stage2", "stage3", "stage4"] if args.masks else ["stage4"]
        config.update(
            use_timm_backbone=False,
            backbone=None,
            backbone_config={
                "model_type": "resnet",
                "layer_type": kind,
                "depths": depths,
                "embedding_size": 64,
                "hidden_sizes": [64 * width * 2**i for i in range(4)],
                "hidden_act": "relu",
                "num_channels": 3,
                "downsample_in_first_stage": False,
                "downsample_in_bottleneck": False,
                "out_features": stages,
            },
        )
    return config


# The architecture flags (util.config.architecture_flags) that args_from_config and config_from_args carry over.
# Every other one is refused at any value but its default (the original DETR's network), which the layout holds.
HF_ARCHITECTURE_FLAGS = (
    "backbone",
    # --backbone_norm batch too: an eval-mode BatchNorm2d normalizes with its running statistics, as transformers'
    # frozen batch norm does with the same weight, bias, running_mean and running_var (and the same eps, 1e-5); the
    # one key it has beyond them, num_batches_tracked, counts training steps and is left out.
    "backbone_norm",
    "dilation",
    "position_embedding",
    "hidden_dim",
    "nheads",
    "enc_layers",
    "dec_layers",
    "dim_feedforward",
    "num_queries",
    "num_classes",
    "masks",
)
# Why the layout cannot hold a refused flag, and the flag a model that converts is trained with.
HF_REFUSALS = {
    "pre_norm": ("pre-norm transformer layers (DetrConfig has post-norm layers only)", "no --pre_norm"),
    "two_stage": ("two-stage queries (DETR in transformers has learned queries only)", "--no_two_stage"),
    "learned_queries": ("learned-query extensions of two-stage DETR", "--no_two_stage"),
    "feature_stride": (
        "a feature map of another stride than 32 (transformers' DETR reads layer4)",
        "--feature_stride 32",
    ),
    "backbone_width": ("a ResNet of other widths than torchvision's", "--backbone_width 1"),
}


def check_args_fit(args: argparse.Namespace, source: str) -> None:
    """Refuse, naming the flag, a checkpoint whose architecture the HF layout cannot hold (args: a full namespace,
    util.config.complete_args)."""
    defaults = parser_defaults()
    for flag in architecture_flags():
        value = getattr(args, flag)
        if flag in HF_ARCHITECTURE_FLAGS or value in (defaults[flag], None):
            continue
        generic = (f"a --{flag} that DetrConfig has no key for", f"--{flag} {defaults[flag]}")
        what, remedy = HF_REFUSALS.get(flag, generic)
        raise HFFolderError(
            f"{source} was trained with --{flag} {value!r}: {what}; the Hugging Face DETR layout cannot hold "
            f"it. Only a model trained with {remedy} converts"
        )
    if args.backbone not in RESNET_DEPTHS:
        raise HFFolderError(
            f"{source}: --backbone {args.backbone!r} is not a ResNet the HF layout names ({', '.join(RESNET_DEPTHS)})"
        )


# The weights --------------------------------------------------------------------------------------------------


def expected_shapes(args: argparse.Namespace) -> Dict[str, Tuple[int, ...]]:
    """Every key of the project's DETR (DETRsegm with --masks) for `args`, with its shape."""
    d, ffn, classes = args.hidden_dim, args.dim_feedforward, args.num_classes
    with torch.device("meta"):  # shapes only: no memory, no initialization
        resnet = getattr(torchvision.models, args.backbone)(weights=None)
    shapes = {
        f"backbone.0.body.{k}": tuple(v.shape)
        for k, v in resnet.state_dict().items()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }
    channels = resnet.fc.in_features
    if args.position_embedding in ("learned", "v3"):
        shapes["backbone.1.row_embed.weight"] = shapes["backbone.1.col_embed.weight"] = (50, d // 2)
    attention = {
        "in_proj_weight": (3 * d, d),
        "in_proj_bias": (3 * d,),
        "out_proj.weight": (d, d),
        "out_proj.bias": (d,),
    }
    feed_forward = {
        "linear1.weight": (ffn, d),
        "linear1.bias": (ffn,),
        "linear2.weight": (d, ffn),
        "linear2.bias": (d,),
    }
    for stack, count, attentions, norms in (
        ("encoder", args.enc_layers, ["self_attn"], 2),
        ("decoder", args.dec_layers, ["self_attn", "multihead_attn"], 3),
    ):
        for i in range(count):
            prefix = f"transformer.{stack}.layers.{i}."
            shapes.update({f"{prefix}{a}.{k}": s for a in attentions for k, s in attention.items()})
            shapes.update({prefix + k: s for k, s in feed_forward.items()})
            shapes.update({f"{prefix}norm{n}.{p}": (d,) for n in range(1, norms + 1) for p in ("weight", "bias")})
    shapes.update(
        {
            "transformer.decoder.norm.weight": (d,),
            "transformer.decoder.norm.bias": (d,),
            "class_embed.weight": (classes + 1, d),
            "class_embed.bias": (classes + 1,),
            "bbox_embed.layers.0.weight": (d, d),
            "bbox_embed.layers.0.bias": (d,),
            "bbox_embed.layers.1.weight": (d, d),
            "bbox_embed.layers.1.bias": (d,),
            "bbox_embed.layers.2.weight": (4, d),
            "bbox_embed.layers.2.bias": (4,),
            "query_embed.weight": (args.num_queries, d),
            "input_proj.weight": (d, channels, 1, 1),
            "input_proj.bias": (d,),
        }
    )
    if not args.masks:
        return shapes
    shapes = {"detr." + k: s for k, s in shapes.items()}
    dim = d + args.nheads
    inter = [dim, d // 2, d // 4, d // 8, d // 16]
    for name in ("q_linear", "k_linear"):
        shapes.update({f"bbox_attention.{name}.weight": (d, d), f"bbox_attention.{name}.bias": (d,)})
    for i in range(1, 6):
        out_channels, in_channels = inter[i - 1], inter[max(i - 2, 0)]
        shapes[f"mask_head.lay{i}.weight"] = (out_channels, in_channels, 3, 3)
        for key in (f"mask_head.lay{i}.bias", f"mask_head.gn{i}.weight", f"mask_head.gn{i}.bias"):
            shapes[key] = (out_channels,)
    shapes.update({"mask_head.out_lay.weight": (1, d // 16, 3, 3), "mask_head.out_lay.bias": (1,)})
    for i in range(1, 4):
        shapes[f"mask_head.adapter{i}.weight"] = (d >> i, channels >> i, 1, 1)
        shapes[f"mask_head.adapter{i}.bias"] = (d >> i,)
    return shapes


def _resnet_to_transformers(key: str) -> str:
    """torchvision ResNet key -> transformers' ResNet key (timm's names are torchvision's)."""
    if key.startswith("conv1."):
        return "embedder.embedder.convolution." + key[len("conv1.") :]
    if key.startswith("bn1."):
        return "embedder.embedder.normalization." + key[len("bn1.") :]
    found = re.match(r"layer(\d)\.(\d+)\.(conv|bn)(\d)\.(.+)$", key)
    if found:
        stage, block, kind, n, rest = found.groups()
        part = "convolution" if kind == "conv" else "normalization"
        return f"encoder.stages.{int(stage) - 1}.layers.{block}.layer.{int(n) - 1}.{part}.{rest}"
    found = re.match(r"layer(\d)\.(\d+)\.downsample\.([01])\.(.+)$", key)
    if found:
        stage, block, index, rest = found.groups()
        part = "convolution" if index == "0" else "normalization"
        return f"encoder.stages.{int(stage) - 1}.layers.{block}.shortcut.{part}.{rest}"
    raise KeyError(key)


# Project key (after 'transformer.<stack>.layers.<i>.') -> HF key (after 'model.<stack>.layers.<i>.').
LAYER_NAMES = {
    "self_attn.out_proj": "self_attn.out_proj",
    "multihead_attn.out_proj": "encoder_attn.out_proj",
    "linear1": "fc1",
    "linear2": "fc2",
}
NORM_NAMES = {
    "encoder": {"norm1": "self_attn_layer_norm", "norm2": "final_layer_norm"},
    "decoder": {"norm1": "self_attn_layer_norm", "norm2": "encoder_attn_layer_norm", "norm3": "final_layer_norm"},
}
HEAD_NAMES = {
    "class_embed": "class_labels_classifier",
    "bbox_embed": "bbox_predictor",
    "query_embed": "model.query_position_embeddings",
    "input_proj": "model.input_projection",
    "transformer.decoder.norm": "model.decoder.layernorm",
    "backbone.1.row_embed": "model.position_embedding.row_embeddings",
    "backbone.1.col_embed": "model.position_embedding.column_embeddings",
}


def hf_names(project_key: str, layout: str) -> List[str]:
    """The HF key(s) a project key becomes: three (q, k, v) for a joined attention projection, else one."""
    prefix = ""
    if project_key.startswith("detr."):
        prefix, project_key = "detr.", project_key[len("detr.") :]
    elif project_key.startswith(("bbox_attention.", "mask_head.")):
        return [project_key]  # the same names in both
    if project_key.startswith("backbone.0.body."):
        key = project_key[len("backbone.0.body.") :]
        return [
            prefix + "model.backbone.conv_encoder.model." + (key if layout == "timm" else _resnet_to_transformers(key))
        ]
    found = re.match(r"transformer\.(encoder|decoder)\.layers\.(\d+)\.(.+)$", project_key)
    if found:
        stack, i, rest = found.groups()
        head = f"{prefix}model.{stack}.layers.{i}."
        joined = re.match(r"(self_attn|multihead_attn)\.in_proj_(weight|bias)$", rest)
        if joined:
            attention = "self_attn" if joined.group(1) == "self_attn" else "encoder_attn"
            return [f"{head}{attention}.{p}_proj.{joined.group(2)}" for p in ("q", "k", "v")]
        module, _, param = rest.rpartition(".")
        name = LAYER_NAMES.get(module) or NORM_NAMES[stack].get(module)
        if name is None:
            raise KeyError(project_key)
        return [f"{head}{name}.{param}"]
    for old, new in HEAD_NAMES.items():
        if project_key.startswith(old + "."):
            return [prefix + new + project_key[len(old) :]]
    raise KeyError(project_key)


def check_shapes(state: Dict[str, Tensor], shapes: Dict[str, Tuple[int, ...]], name_of, source: str) -> None:
    """Raise naming `source` and the keys (as name_of(project key) calls them) that are missing, unexpected or
    of another shape than `shapes` says."""
    missing = [name_of(k) for k in shapes if k not in state]
    unexpected = [name_of(k) for k in state if k not in shapes]
    mismatched = [
        f"{name_of(k)}: {list(state[k].shape)}, expected {list(s)}"
        for k, s in shapes.items()
        if k in state and tuple(state[k].shape) != s
    ]
    if missing or unexpected or mismatched:
        lines = [f"{source} does not fit the DETR its configuration describes:"]
        for title, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shapes that do not fit", mismatched),
        ):
            if keys:
                lines.append(
                    f"  {title}: " + ", ".join(keys[:10]) + (f", ... ({len(keys)} in all)" if len(keys) > 10 else "")
                )
        raise HFFolderError("\n".join(lines))


def hf_state_to_project(
    hf_state: Dict[str, Tensor], args: argparse.Namespace, layout: str, source: str
) -> Dict[str, Tensor]:
    """The project's state_dict from an HF one (names of the hub's files), checked against `args`."""
    shapes = expected_shapes(args)
    # transformers 4 kept the learned position embedding under the backbone wrapper.
    hf_state = {
        k.replace("model.backbone.position_embedding.", "model.position_embedding."): v for k, v in hf_state.items()
    }
    state, origin = {}, {}
    for key in shapes:
        names = hf_names(key, layout)
        origin[key] = " + ".join(names)
        if not all(n in hf_state for n in names):
            continue
        parts = [hf_state[n] for n in names]
        if len(parts) == 3:
            d = args.hidden_dim
            expected = (d, d) if key.endswith("weight") else (d,)
            bad = [
                f"{n}: {list(p.shape)}, expected {list(expected)}"
                for n, p in zip(names, parts)
                if tuple(p.shape) != expected
            ]
            if bad:
                raise HFFolderError(f"{source}: shapes that do not fit its configuration: {', '.join(bad)}")
            state[key] = torch.cat(parts)
        else:
            state[key] = parts[0]
    used = {n for k in shapes for n in hf_names(k, layout)}
    extra = [k for k in hf_state if k not in used and not k.endswith("num_batches_tracked")]
    for key in extra:
        state[key] = hf_state[key]  # reported as unexpected below, under its own name
    check_shapes(state, shapes, lambda k: origin.get(k, k), source)
    return state


def project_state_to_hf(
    state: Dict[str, Tensor], args: argparse.Namespace, layout: str, source: str
) -> Dict[str, Tensor]:
    """The HF state_dict (names of the hub's files) of a project one, checked against `args` first."""
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    check_shapes(state, expected_shapes(args), lambda k: k, source)
    hf_state = {}
    for key, value in state.items():
        names = hf_names(key, layout)
        parts = value.chunk(3) if len(names) == 3 else [value]
        # contiguous copies: safetensors stores each tensor on its own and refuses shared or strided storage.
        hf_state.update({n: p.contiguous().clone() for n, p in zip(names, parts)})
    return hf_state


# Checkpoints ---------------------------------------------------------------------------------------------------


def args_of_checkpoint(checkpoint: dict, state: Dict[str, Tensor], source: str) -> argparse.Namespace:
    """The architecture of a checkpoint: its 'args' where it has them (a published or main.py checkpoint), the
    sizes its weights show (they win: a plain state_dict has no args), main.py's defaults (the original's) for what
    neither tells (nheads, dilation). Flags the HF layout cannot hold are refused (check_args_fit)."""
    saved = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    args = complete_args(saved if isinstance(saved, argparse.Namespace) else argparse.Namespace())
    check_args_fit(args, source)
    masks = any(k.startswith("mask_head.") for k in state)
    prefix = "detr." if masks else ""
    try:
        args.masks = masks
        args.num_queries, args.hidden_dim = state[prefix + "query_embed.weight"].shape
        args.num_classes = state[prefix + "class_embed.weight"].shape[0] - 1
        args.dim_feedforward = state[prefix + "transformer.encoder.layers.0.linear1.weight"].shape[0]
    except KeyError as e:
        raise HFFolderError(f"{source} is not a DETR checkpoint of the original layout: it has no key {e}") from None
    layers = {
        stack: len(
            {k[len(prefix) :].split(".")[3] for k in state if k.startswith(f"{prefix}transformer.{stack}.layers.")}
        )
        for stack in ("encoder", "decoder")
    }
    args.enc_layers, args.dec_layers = layers["encoder"], layers["decoder"]
    args.position_embedding = "learned" if prefix + "backbone.1.row_embed.weight" in state else "sine"
    # The ResNet by its block type and counts (a plain state_dict carries no flags).
    blocks = [
        len({k[len(prefix) :].split(".")[4] for k in state if k.startswith(f"{prefix}backbone.0.body.layer{i}.")})
        for i in range(1, 5)
    ]
    kind = "bottleneck" if prefix + "backbone.0.body.layer1.0.conv3.weight" in state else "basic"
    found = [name for name, depths in RESNET_DEPTHS.items() if depths == (kind, blocks)]
    if not found:
        raise HFFolderError(
            f"{source}: its backbone ({kind} blocks {blocks}) is no torchvision ResNet ({', '.join(RESNET_DEPTHS)})"
        )
    args.backbone = found[0]
    if args.hidden_dim % args.nheads:
        raise HFFolderError(f"{source}: hidden_dim {args.hidden_dim} is not divisible by nheads {args.nheads}")
    return args


def checkpoint_to_hf(
    checkpoint, source: str, layout: str = "timm", id2label: Optional[Dict[int, str]] = None
) -> Tuple[dict, Dict[str, Tensor]]:
    """(config.json's dict, the HF state_dict) of a checkpoint of the original's layout (main.py's or a
    published one). id2label defaults to the names the checkpoint carries ('class_names')."""
    if layout not in ("timm", "transformers"):
        raise ValueError(f"backbone layout must be 'timm' or 'transformers', got {layout!r}")
    state = checkpoint["model"] if isinstance(checkpoint, dict) and "model" in checkpoint else checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise HFFolderError(f"{source} holds no 'model' state_dict of tensors")
    args = args_of_checkpoint(checkpoint, state, source)
    if args.dilation and layout == "transformers":
        raise HFFolderError(
            f"{source} is a DC5 model (--dilation): transformers' own ResNet has no dilation; "
            "use the timm backbone layout"
        )
    if id2label is None and isinstance(checkpoint, dict):
        id2label = checkpoint.get("class_names")
    config = config_from_args(args, layout, id2label or {})
    return config, project_state_to_hf(state, args, layout, source)


def num_classes_of(
    configured: Optional[int], hf_state: Dict[str, Tensor], masks: bool, source: str, weights_source: str
) -> int:
    """The label count: the config's where it gives one, else the rows of the class head less "no object" (COCO's 91
    where there is no class head, which check_shapes then reports). A config that the weights contradict is refused,
    naming both files."""
    key = ("detr." if masks else "") + "class_labels_classifier.weight"
    classifier = hf_state.get(key)
    if classifier is None or classifier.dim() != 2 or classifier.shape[0] < 2:
        return 91 if configured is None else configured  # check_shapes names the missing or misshapen key
    found = classifier.shape[0] - 1
    if configured is not None and configured != found:
        raise HFFolderError(
            f"{source} gives {configured} labels ('id2label' or 'num_labels'), but {weights_source} has "
            f"{found} ({key} has {classifier.shape[0]} rows, one of them 'no object'); the two must agree"
        )
    return found


def hf_to_checkpoint(config: dict, hf_state: Dict[str, Tensor], source: str, weights_source: str) -> dict:
    """A checkpoint in the original's layout ({'model', 'args', 'class_names'}) from config.json's dict and the
    HF state_dict; `source` and `weights_source` name the two files in errors."""
    args, layout, id2label = args_from_config(config, source)
    args.masks = any(k.startswith("mask_head.") for k in hf_state)
    args.num_classes = num_classes_of(args.num_classes, hf_state, args.masks, source, weights_source)
    if args.masks and (args.hidden_dim + args.nheads) % 8 or args.masks and (args.hidden_dim // 16) % 8:
        raise HFFolderError(
            f"{source}: the project's mask head needs d_model + heads and d_model / 16 to be "
            f"multiples of 8 (its group norms have 8 groups); d_model is {args.hidden_dim}"
        )
    state = hf_state_to_project(hf_state, args, layout, weights_source)
    return {"model": state, "args": args, "class_names": id2label, "hf_backbone_layout": layout}


# Folders ------------------------------------------------------------------------------------------------------


def _read_safetensors(path: Path) -> Dict[str, Tensor]:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError as e:
        raise HFFolderError(
            f"{path}: reading safetensors files needs the 'safetensors' package (pip install safetensors)"
        ) from e
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise HFFolderError(
            f"{path} cannot be read: {type(e).__name__}: {e} (cut short or damaged: download it again)"
        ) from e


def read_hf_weights(folder: Path) -> Tuple[Dict[str, Tensor], str]:
    """(the state_dict of an HF folder, the name of its file) from model.safetensors, its shards, or
    pytorch_model.bin (read with weights_only=True)."""
    single, index, binary = folder / SAFETENSORS_NAME, folder / SAFETENSORS_INDEX_NAME, folder / BIN_NAME
    if single.is_file():
        return _read_safetensors(single), str(single)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise HFFolderError(
                f"{index}: not a safetensors index (the key 'weight_map' is missing or not an "
                f"object: {type(e).__name__}: {e})"
            ) from None
        state = {}
        for shard in shards:
            path = folder / shard
            if not isinstance(shard, str) or Path(shard).name != shard or not path.is_file():
                raise HFFolderError(f"{index}: the shard {shard!r} of 'weight_map' is not a file of {folder}")
            state.update(_read_safetensors(path))
        return state, str(index)
    if binary.is_file():
        try:
            loaded = torch.load(binary, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            # weights_only refuses every Python object but tensors and containers before creating it.
            found = re.search(r"GLOBAL [\w.]+ |Unsupported operand \S+", str(e))
            raise HFFolderError(
                f"{binary}: refused, it holds Python objects beyond tensors and containers, which "
                f"could run code when loaded ({found.group(0).strip() if found else 'unpickling'}"
                "). Nothing in it was run."
            ) from None
        except Exception as e:
            raise HFFolderError(f"{binary} cannot be read: {type(e).__name__}: {e}") from None
        if not isinstance(loaded, dict) or not all(isinstance(v, Tensor) for v in loaded.values()):
            raise HFFolderError(f"{binary}: expected a state_dict of tensors")
        return loaded, str(binary)
    raise HFFolderError(
        f"{folder} holds no weights: expected {SAFETENSORS_NAME} (or {SAFETENSORS_INDEX_NAME} "
        f"with its shards, or {BIN_NAME})"
    )


def read_hf_folder(folder) -> dict:
    """A Hugging Face DETR model folder as a checkpoint in the original's layout (see hf_to_checkpoint)."""
    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise HFFolderError(
            f"{folder} is a folder without {CONFIG_NAME}: a Hugging Face model folder has "
            f"{CONFIG_NAME} and {SAFETENSORS_NAME}; a checkpoint is a file"
        )
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise HFFolderError(f"{config_path} is not valid JSON: {e}") from None
    args_from_config(config, str(config_path))  # the configuration first: its errors say more than the weights'
    hf_state, weights_source = read_hf_weights(folder)
    return hf_to_checkpoint(config, hf_state, str(config_path), weights_source)


def write_hf_folder(
    checkpoint,
    destination,
    source: str = "checkpoint",
    layout: str = "timm",
    id2label: Optional[Dict[int, str]] = None,
    resize: Tuple[int, int] = (800, 1333),
) -> dict:
    """Write config.json, model.safetensors and preprocessor_config.json (for transformers' pipelines) of
    `checkpoint` into the new folder `destination`; returns the config. `resize` is (shorter side, cap of the
    longer side) of the images the pipelines give the model: those the model was evaluated on. Everything is
    converted and written into a temporary folder first: on any failure nothing is left."""
    from safetensors.torch import save_file

    destination = Path(destination)
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise FileExistsError(f"{destination} exists and is not an empty folder; choose a new one")
    config, hf_state = checkpoint_to_hf(checkpoint, source, layout, id2label)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=destination.name + ".tmp.", dir=destination.parent))
    try:
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        preprocessor = {**PREPROCESSOR_CONFIG, "size": {"shortest_edge": resize[0], "longest_edge": resize[1]}}
        (staging / PREPROCESSOR_NAME).write_text(json.dumps(preprocessor, indent=2) + "\n")
        save_file(hf_state, str(staging / SAFETENSORS_NAME), metadata={"format": "pt"})
        if destination.exists():
            destination.rmdir()
        os.replace(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return config
