"""One source for a run's configuration: main.get_args_parser(), whose defaults also fill namespaces that lack
some flags (a checkpoint's 'args' saved by an older version, a published checkpoint's, a Hugging Face config's,
a namespace built by hand), so that everything downstream reads args.x as it reads a fresh run's.

A new flag that defines the network is the parser's (its default keeps the original's network), the builder's that
reads it, and its name in ARCHITECTURE_FLAGS. Checkpoints saved before it then load as what they were, a model at
the default; resuming one with another value is refused (util/checkpoint.py), and a conversion to the Hugging Face
layout refuses any value but the default unless util/hf.py maps the flag to a DetrConfig key.
"""

import argparse
from typing import Optional

# The flags that define the network. A checkpoint trained with other values is another model: some change no
# weight's shape or name (--dilation, --nheads, --backbone_norm), so its weights would load and silently mean
# something else. util/checkpoint.py refuses to resume across a difference; util/hf.py writes those that
# DetrConfig holds and refuses the others away from their defaults.
ARCHITECTURE_FLAGS = (
    "backbone",
    "backbone_norm",
    "dilation",
    "position_embedding",
    "hidden_dim",
    "nheads",
    "enc_layers",
    "dec_layers",
    "dim_feedforward",
    "num_queries",
    "pre_norm",
    "num_classes",
    "masks",
    "feature_stride",
    "backbone_width",
    "two_stage",
    "learned_queries",
)


def parser_defaults(parser: Optional[argparse.ArgumentParser] = None) -> dict:
    """Every flag's default, by its dest: of parser, or of main.py's."""
    if parser is None:
        # main.py wires the layers below it; its parser is read only when asked for, so importing this module
        # imports nothing of the project (torch.hub loads hubconf.py with util/ and models/ alone).
        from main import get_args_parser

        parser = get_args_parser()
    return vars(parser.parse_args([]))


def complete_args(args, parser: Optional[argparse.ArgumentParser] = None) -> argparse.Namespace:
    """A copy of args in which every flag of the parser (main.py's by default) that args lacks is at its default
    (thing_classes, which main.py sets from panoptic data, included); values args holds, and entries the parser does not
    know, are kept."""
    return argparse.Namespace(**{**parser_defaults(parser), **vars(args)})
