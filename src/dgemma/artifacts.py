"""Atomic publication of stage outputs: a stage writes into a temp dir beside the target and publishes it
whole, so an interrupted stage never leaves a half-written directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def publish_dir(tmp: Path, final: Path) -> Path:
    """Move the completely written `tmp` to `final`; an existing `final` is swapped out first, then removed."""
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    return final
