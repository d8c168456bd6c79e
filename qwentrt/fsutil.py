"""Output folders that appear whole or not at all: work in a hidden sibling, rename at the end."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from qwentrt.errors import QwentrtError


@contextlib.contextmanager
def staged_folder(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out`, on any error it is removed.
    An existing `out` is refused unless `force`."""
    out = Path(out)
    if out.exists() and not force:
        raise QwentrtError(f"{out} already exists: pass --force to replace it, or choose another output folder")
    if out.exists() and not out.is_dir():
        raise QwentrtError(f"{out} exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.chmod(0o755)
    for f in tmp.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
