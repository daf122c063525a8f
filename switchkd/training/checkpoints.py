"""Output folders and checkpoints: a run never takes over another run's folder unasked, and a checkpoint
counts only once every file of it is written.

A checkpoint is complete when its marker ``switchkd_checkpoint.json`` (written last, atomically, after
every process has saved) lists each file of the folder with its size and every listed file is there with
that size. ``latest_complete`` skips half-written folders, e.g. after a crash during a save.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

MARKER = "switchkd_checkpoint.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dirs(output_dir) -> list[Path]:
    """``checkpoint-N`` folders of ``output_dir``, newest (highest N) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MARKER and not p.name.startswith(f".{MARKER}")}


def clear_marker(checkpoint) -> None:
    """Forget a folder's completeness before it is written again."""
    Path(checkpoint, MARKER).unlink(missing_ok=True)


def mark_complete(checkpoint) -> None:
    """Record every file of ``checkpoint`` and its size; the marker appears atomically (temp file + rename)."""
    folder = Path(checkpoint)
    tmp = folder / f".{MARKER}.tmp"
    tmp.write_text(json.dumps({"files": _files(folder)}, indent=1))
    os.replace(tmp, folder / MARKER)


def is_complete(checkpoint) -> bool:
    folder = Path(checkpoint)
    try:
        listed = json.loads((folder / MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return bool(listed) and all((folder / name).is_file() and (folder / name).stat().st_size == size
                                for name, size in listed.items())


def latest_complete(output_dir) -> tuple[Path | None, list[Path]]:
    """(the newest complete checkpoint or None, the newer incomplete ones skipped)."""
    skipped = []
    for folder in checkpoint_dirs(output_dir):
        if is_complete(folder):
            return folder, skipped
        skipped.append(folder)
    return None, skipped


def check_output_dir(output_dir, *, resume: bool, overwrite: bool, any_file: bool = True) -> None:
    """Refuse a folder that holds another run unless resuming or overwriting (``any_file``: any entry counts,
    else only checkpoints). One line that says what to do."""
    root = Path(output_dir)
    if resume or overwrite or not root.is_dir():
        return
    held = any(root.iterdir()) if any_file else bool(checkpoint_dirs(root))
    if held:
        raise ValueError(f"output_dir {str(root)!r} is not empty (another run?): resume it with --resume latest "
                         "or replace it with --overwrite-output-dir")


def remove_previous_checkpoints(output_dir) -> list[Path]:
    """Delete the ``checkpoint-N`` folders left by an earlier run (``--overwrite-output-dir``), so that rotation
    and ``--resume latest`` never mix two runs. Nothing else in the folder is touched."""
    removed = checkpoint_dirs(output_dir)
    for folder in removed:
        shutil.rmtree(folder)
    return removed
