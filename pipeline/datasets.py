"""The shared labelled data, read in place from the datasets folder (``MODPIPE_DATASETS_DIR``), never copied.

Every developer machine and CI has the folder at ``../shared/datasets`` (the setting's default); production workers
never need it. A missing folder or file is a clear error that names the setting and the path looked at.
"""

from __future__ import annotations

from pathlib import Path

DATASETS_SETTING = "MODPIPE_DATASETS_DIR"


class DatasetNotFoundError(FileNotFoundError):
    """The datasets folder, or a data set file inside it, is missing: the message names the setting and the path."""


def dataset_file(datasets_dir: Path, relative: Path | str) -> Path:
    """``datasets_dir / relative``, or a :class:`DatasetNotFoundError` saying which setting points where."""
    datasets_dir, relative = Path(datasets_dir), Path(relative)
    if not datasets_dir.is_dir():
        raise DatasetNotFoundError(
            f"datasets folder {datasets_dir} does not exist: set {DATASETS_SETTING} to the folder holding the "
            f"shared labelled data ({relative.parts[0]}/, ...)"
        )
    path = datasets_dir / relative
    if not path.is_file():
        raise DatasetNotFoundError(
            f"{relative.as_posix()} is not in the datasets folder {datasets_dir} (looked for {path}; "
            f"{DATASETS_SETTING} sets the folder)"
        )
    return path
