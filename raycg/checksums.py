"""SHA-256 checksums for the files of a checkpoint or an export directory.

    <dir>/checksums.json   {"<file name>": "<sha256 hex>", ...}, written after the files

`verify_checksums` names the first file that is missing or differs from what was written, so
flipped bytes or a truncated copy are an error instead of a silently different model.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings

CHECKSUMS = "checksums.json"


class DamagedFileError(RuntimeError):
    """A file of a checkpoint or export is missing, damaged or unreadable; names the file."""


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_checksums(directory: str, names: list[str]) -> None:
    sums = {name: sha256(os.path.join(directory, name)) for name in names}
    tmp = os.path.join(directory, CHECKSUMS + ".tmp")
    with open(tmp, "w") as f:
        json.dump(sums, f, indent=1)
    os.replace(tmp, os.path.join(directory, CHECKSUMS))


def verify_checksums(directory: str) -> None:
    """Raise `DamagedFileError` naming the first file that is missing or does not match its
    recorded SHA-256. A directory without checksums.json (older raycg) passes with a warning."""
    path = os.path.join(directory, CHECKSUMS)
    if not os.path.exists(path):
        warnings.warn(f"{directory}: no {CHECKSUMS} (written by an older raycg): loading unverified", stacklevel=2)
        return
    try:
        with open(path) as f:
            sums = json.load(f)
    except (OSError, ValueError) as e:
        raise DamagedFileError(f"{path}: cannot read the checksums ({e})") from e
    for name, want in sums.items():
        file = os.path.join(directory, name)
        if not os.path.exists(file):
            raise DamagedFileError(f"{file}: missing (listed in {CHECKSUMS})")
        got = sha256(file)
        if got != want:
            raise DamagedFileError(f"{file}: damaged: SHA-256 {got[:16]}... does not match the "
                                   f"{want[:16]}... recorded when it was written")
