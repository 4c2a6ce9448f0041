"""What the command lines share: argument types, the ``--ray`` options, and the runner a plugin registers for them.

``lookahead summarize`` and ``lookahead serve`` run their ``--ray`` paths through a runner they never name: an
installed distribution registers it under the command's entry point group (``name = "module:function"``, see
``pyproject.toml``), and :func:`load_runner` finds it there. So the plugin depends on the command, never the reverse.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

RAY_INSTALL_HINT = "pip install 'lookahead-rag[ray]'"


def number_type(convert: Callable[[str], Any], expected: str, low: float, high: float = math.inf, *,
                low_open: bool = False, name: str | None = None) -> Callable[[str], Any]:
    """An argparse type: ``convert(text)``, finite, in ``[low, high]`` (``low`` excluded when ``low_open``); a bad
    value is an error saying ``expected <expected>, got <text>``."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        above = value > low if low_open else value >= low
        if not (above and value <= high and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = name or expected
    return parse


positive_int = number_type(int, "a positive integer", 1, name="positive_int")
non_negative_float = number_type(float, "a finite number >= 0", 0.0, name="non_negative_float")
positive_float = number_type(float, "a finite number > 0", 0.0, low_open=True, name="positive_float")
port = number_type(int, "a port number in 0..65535", 0, 65535, name="port")


def add_ray_options(parser: argparse.ArgumentParser, unit: str, ray_help: str, learns_from: str) -> Any:
    """The ``--ray`` option group of a command that runs ``--{unit}s`` copies of the model on Ray (``--address``,
    ``--cpus-per-{unit}``, ``--gpus-per-{unit}``, ``--no-trie-sharing``); returns the group for the command's own."""
    ray = parser.add_argument_group(f"on Ray ({RAY_INSTALL_HINT})")
    ray.add_argument("--ray", action="store_true", help=ray_help)
    ray.add_argument("--address", default=None,
                     help="Ray cluster to join (auto, HOST:6379, ray://HOST:10001; default: start a local one)")
    ray.add_argument(f"--{unit}s", type=positive_int, default=2, help=f"{unit}s, each with its own model (default 2)")
    ray.add_argument(f"--cpus-per-{unit}", type=positive_int, default=1,
                     help=f"CPUs (and torch threads) per {unit} (default 1)")
    ray.add_argument(f"--gpus-per-{unit}", type=non_negative_float, default=0.0,
                     help=f"GPUs per {unit} (default 0; a fraction shares a GPU)")
    ray.add_argument("--no-trie-sharing", action="store_true",
                     help=f"no trie hub: each {unit} learns from its own {learns_from} only")
    return ray


class RunnerUnavailable(RuntimeError):
    """No installed distribution registers the runner, or importing it failed; the message says which and how to
    install it."""


def load_runner(group: str, name: str, command: str, hint: str = RAY_INSTALL_HINT) -> Callable[..., Any]:
    """The function registered as ``name`` in the entry point group ``group`` (``command`` and ``hint`` word the
    error: ``<command> needs <name> (<why>): <hint>``)."""
    found = [ep for ep in entry_points(group=group) if ep.name == name]
    if not found:
        raise RunnerUnavailable(f"{command} needs {name.capitalize()} (no distribution registers it in {group}): "
                                f"{hint}")
    try:
        return found[0].load()
    except ImportError as exc:
        raise RunnerUnavailable(f"{command} needs {name.capitalize()} ({exc}): {hint}") from None
