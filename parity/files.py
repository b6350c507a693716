"""Writing files whole or not at all: the one atomic write every artifact goes through (reports,
JUnit files, goldens, traces). A temporary file beside the target, readable by everyone like
any shared artifact (mkstemp makes 0600), then one rename over the target."""
from __future__ import annotations

import errno
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


def run_folder_name(kind: str) -> str:
    """The default folder of one run: `<kind>-<UTC time>-<6 hex>` (report and gate alike), so
    two runs started in the same second never share a folder."""
    import datetime
    import secrets

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{kind}-{now}-{secrets.token_hex(3)}"


def publish_folder(target, files: dict[str, bytes], owned: frozenset | set = frozenset()) -> dict:
    """Write `files` (name -> bytes) as the folder `target`, whole or not at all.

    All files are written into a hidden temporary folder beside `target` first. A new target
    (or one holding nothing but files of an earlier run, names in `files` or `owned`) is then
    swapped in by renaming folders, so a reader sees the earlier run's folder or this one, never
    a mix. A target that also holds other files (a user's) is not removed: each file is renamed
    into it, every one whole. Returns name -> final path. Raises OSError."""
    import shutil

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp / name, 0o644)
        ours = set(files) | set(owned)
        for _ in range(5):  # another run may swap its folder in between: look again
            try:
                if not target.exists():
                    os.rename(tmp, target)
                elif target.is_dir() and all(p.name in ours for p in target.iterdir()):
                    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old",
                                                dir=target.parent))
                    os.rename(target, old / "run")
                    try:
                        os.rename(tmp, target)
                    finally:
                        shutil.rmtree(old, ignore_errors=True)
                else:
                    for name in files:
                        os.replace(tmp / name, target / name)
                    shutil.rmtree(tmp, ignore_errors=True)
                break
            except FileExistsError:
                continue
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOENT):
                    raise
        else:
            raise OSError(errno.EBUSY, f"{target} kept changing while this run was written")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {name: target / name for name in files}
