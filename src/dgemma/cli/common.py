"""Argument helpers shared by the subcommands: integer flags checked with a message that names the flag, the
range and the fix; the --checkpoint help text."""

from __future__ import annotations

from ..core.errors import ConfigError
from ..model.checkpoint import SYNTHETIC

CHECKPOINT_HELP = ("checkpoint dir (default: the embedded trained tiny model)")
CHECKPOINT_OR_SYNTHETIC_HELP = (f"checkpoint dir (default: the embedded trained tiny model), or '{SYNTHETIC}' "
                                "(full size, random weights, built on the device)")


def int_arg(name: str, value, lo: int | None = None, hi: int | None = None, fix: str = "") -> int | None:
    """`value` (a flag's string, or None) as an int in [lo, hi]; ConfigError naming the flag otherwise."""
    if value is None:
        return None
    try:
        v = int(str(value), 10)
    except ValueError:
        raise ConfigError(f"{name} must be an integer (got {value!r}).{fix}") from None
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise ConfigError(f"{name} must be {rng} (got {v}).{fix}")
    return v
