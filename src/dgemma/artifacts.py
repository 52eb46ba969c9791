"""Stage outputs on disk: atomic publication (a stage writes into a temp dir beside the target and publishes it
whole, so an interrupted stage never leaves a half-written directory) and reading a stage's manifest.json with
an error that names the file and the make command that produces it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .errors import ArtifactError


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


def read_manifest(stage_dir: str | Path, what: str, make: str) -> dict:
    """`stage_dir`/manifest.json as a dict; missing or corrupt -> ArtifactError naming the file, what the
    directory should hold (`what`) and the command that rebuilds it (`make`)."""
    path = Path(stage_dir) / "manifest.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path} not found: no {what} in {stage_dir}. Build them with `{make}`.") from None
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); rebuild with `{make}`.") from None
