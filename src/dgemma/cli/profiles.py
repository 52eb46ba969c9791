"""`dgemma profiles`: the GPU profiles and the precisions each supports."""

from __future__ import annotations

from ..core.profiles import describe


def cmd_profiles(args) -> int:
    print(describe())
    return 0


def add_parser(sub) -> None:
    pr = sub.add_parser("profiles", help="list GPU profiles and what each supports")
    pr.set_defaults(func=cmd_profiles)
