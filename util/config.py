"""One source for a run's configuration: main.get_args_parser(), whose defaults also fill namespaces that lack
some flags (a checkpoint's 'args' saved by an older version, a namespace built by hand), so that everything
downstream reads args.x as it reads a fresh run's."""

import argparse
from typing import Optional


def parser_defaults(parser: Optional[argparse.ArgumentParser] = None) -> dict:
    """Every flag's default, by its dest: of parser, or of main.py's."""
    if parser is None:
        from main import get_args_parser  # main.py imports util/; its parser is read only when asked for

        parser = get_args_parser()
    return vars(parser.parse_args([]))


def complete_args(args, parser: Optional[argparse.ArgumentParser] = None) -> argparse.Namespace:
    """A copy of args in which every flag of the parser (main.py's by default) that args lacks is at its default;
    values args holds, and entries the parser does not know, are kept."""
    return argparse.Namespace(**{**parser_defaults(parser), **vars(args)})
