"""Writing files whole or not at all: the one atomic write every artifact goes through (reports,
JUnit files, goldens, traces). A temporary file beside the target, readable by everyone like
any shared artifact (mkstemp makes 0600), then one rename over the target."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def temp_beside(target: Path) -> str:
    """A new empty temporary file in the target's folder (created if needed), mode 0644."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)
    return tmp


@contextmanager
def replacing(target):
    """`with replacing(path) as tmp:` write `tmp` (a path) in the body; on success it is renamed
    over `path`, on any failure removed and `path` left as it was."""
    tmp = temp_beside(Path(target))
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(target, data: bytes | str) -> Path:
    """Write `data` (text as UTF-8) to `target` whole or not at all."""
    with replacing(target) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
    return Path(target)
