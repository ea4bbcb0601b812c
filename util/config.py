"""One source for a run's configuration: main.get_args_parser(), whose defaults also fill namespaces that lack
some flags (a checkpoint's 'args' saved by an older version, a published checkpoint's, a Hugging Face config's,
a namespace built by hand), so that everything downstream reads args.x as it reads a fresh run's.

A new flag that defines the network is two edits: its definition in the parser, marked with
util.flags.defines_the_network (its default keeps the original's network), and the builder that reads it.
Checkpoints saved before it then load as what they were, a model at the default; resuming one with another value is
refused (util/checkpoint.py), and a conversion to the Hugging Face layout refuses any value but the default unless
util/hf.py maps the flag to a DetrConfig key.
"""

import argparse
from typing import Optional, Tuple


def architecture_flags(parser: Optional[argparse.ArgumentParser] = None) -> Tuple[str, ...]:
    """The flags that define the network, in the parser's order: those its definition marks with
    util.flags.defines_the_network. A checkpoint trained with other values is another model: some change no
    weight's shape or name (--dilation, --nheads, --backbone_norm), so its weights would load and silently mean
    something else. util/checkpoint.py refuses to resume across a difference; util/hf.py writes those that
    DetrConfig holds and refuses the others away from their defaults."""
    parser = parser if parser is not None else main_parser()
    return tuple(action.dest for action in parser._actions if getattr(action, "defines_the_network", False))


def main_parser() -> argparse.ArgumentParser:
    """main.py's parser."""
    # main.py wires the layers below it; its parser is read only when asked for, so importing this module
    # imports nothing of the project (torch.hub loads hubconf.py with util/ and models/ alone).
    from main import get_args_parser

    return get_args_parser()


def parser_defaults(parser: Optional[argparse.ArgumentParser] = None) -> dict:
    """Every flag's default, by its dest: of parser, or of main.py's."""
    return vars((parser if parser is not None else main_parser()).parse_args([]))


def complete_args(args, parser: Optional[argparse.ArgumentParser] = None) -> argparse.Namespace:
    """A copy of args in which every flag of the parser (main.py's by default) that args lacks is at its default
    (thing_classes, which main.py sets from panoptic data, included); values args holds, and entries the parser does not
    know, are kept."""
    return argparse.Namespace(**{**parser_defaults(parser), **vars(args)})
