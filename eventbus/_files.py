"""Writing a small file whole or not at all: the files processes share (the workers' statuses,
fingerprints and figures, the copies of the configuration they start from, a server's config).

Where it sits: at the bottom, beside the error tree, with no eventbus import: the metrics, the
sources, the bus, the composition root and the commands write their files through it.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["replace_file"]


def replace_file(path: Path, data: bytes | str, *, private: bool = False) -> None:
    """``data`` (text as UTF-8) as the file ``path``, whole or not at all: written beside it,
    under a name of this process's own, then renamed over it, so a reader finds the old file or
    the new one, never a part. ``private``: readable by its owner only (0600) from its creation
    (a file holding a secret); otherwise as the umask says."""
    raw = data.encode() if isinstance(data, str) else data
    written = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    written.unlink(missing_ok=True)
    fd = os.open(written, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(raw)
        written.replace(path)
    except BaseException:
        written.unlink(missing_ok=True)
        raise
