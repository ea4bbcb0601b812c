"""A command-line switch that a dataset's recipe may turn on and a flag given still turns off."""

import argparse
from typing import Union


def add_switch(
    parser: Union[argparse.ArgumentParser, argparse._ArgumentGroup], name: str, help_on: str, help_off: str
) -> None:
    """--NAME (off unless given) and --no_NAME, which undoes it (and a dataset default that turns it on)."""
    parser.add_argument(f"--{name}", action="store_true", help=help_on)
    parser.add_argument(f"--no_{name}", dest=name, action="store_false", help=f"{help_off} (undoes --{name})")
