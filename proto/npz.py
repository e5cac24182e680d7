"""Arrays by name in numpy's ``.npz`` format, written without numpy's ``savez`` keyword trap.

``np.savez(f, **arrays)`` takes a tensor called ``allow_pickle`` as its own flag and silently
leaves it out of the file. :func:`save_npz` writes the same archive (one ``<name>.npy`` member per
array, as ``np.savez`` does), whatever the names, and never pickles: ``np.load(...,
allow_pickle=False)`` reads it back.
"""

from __future__ import annotations

import zipfile
from typing import IO, Mapping

import numpy as np


def save_npz(file: IO[bytes], arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` to the binary file object ``file`` as an uncompressed ``.npz``."""
    with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, value in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
