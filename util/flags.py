"""What flags are: a command-line switch that a dataset's recipe may turn on and a flag given still turns off, and
the mark of a flag that defines the network."""

import argparse
from typing import Callable, Union


def add_switch(
    parser: Union[argparse.ArgumentParser, argparse._ArgumentGroup], name: str, help_on: str, help_off: str
) -> argparse.Action:
    """--NAME (off unless given) and --no_NAME, which undoes it (and a dataset default that turns it on); returns
    --NAME's action."""
    action = parser.add_argument(f"--{name}", action="store_true", help=help_on)
    parser.add_argument(f"--no_{name}", dest=name, action="store_false", help=f"{help_off} (undoes --{name})")
    return action


def defines_the_network(action: argparse.Action) -> argparse.Action:
    """Mark a flag as one that defines the network (util.config.architecture_flags): a checkpoint trained at another
    value is another model, which --resume refuses and the Hugging Face conversion checks."""
    action.defines_the_network = True
    return action


def network_flags(group: argparse._ArgumentGroup) -> Callable[..., argparse.Action]:
    """group.add_argument for flags that define the network: each one it adds is marked (defines_the_network)."""

    def add_argument(*names: str, **kwargs) -> argparse.Action:
        return defines_the_network(group.add_argument(*names, **kwargs))

    return add_argument
