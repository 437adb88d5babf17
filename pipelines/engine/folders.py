"""A job's folders: one per run, the ``latest`` link, the champion's file, and what ``--resume``
continues::

    runs/<name>/<YYYYmmdd-HHMMSS>/   one run: teacher_<t>/, student_alone/, student/, the
                                     exported student, results.md (written last: it finished)
    runs/<name>/latest               -> the last run that finished
    runs/<name>/champion.pt          a copy of the champion version's exported file, replaced
                                     atomically when a version is promoted (champion.pt2 and
                                     champion.encoding.txt for export.format: pt2)
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable

#: In a job's folder (``<output_dir>/<name>/``): the last finished run, and the champion's file.
LATEST = "latest"
CHAMPION_FILE = "champion.pt"
#: The last file a run writes to its folder: a folder without it is a run to ``--resume``.
FINISHED = "results.md"
#: A run folder's name: the UTC time it started, and a count when two start in one second.
RUN_FOLDER = re.compile(r"\d{8}-\d{6}(-\d+)?")


def new_run_folder(root: Path) -> Path:
    """A new folder under ``root`` named by the time it starts (UTC), so the latest sorts last."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    folder, n = root / stamp, 1
    while folder.exists():
        n += 1
        folder = root / f"{stamp}-{n}"
    folder.mkdir(parents=True)
    return folder


def run_folders(root: Path) -> list[Path]:
    """The run folders under ``root``, oldest first (not ``latest``, a link, nor the model
    folders an older version of the job wrote straight into ``root``)."""
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir()
            if RUN_FOLDER.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]  # fmt: skip
    return sorted(runs, key=lambda p: (p.name[:15], int(p.name[16:] or 1)))


def folder_to_resume(root: Path, name: str | None = None) -> Path | None:
    """The folder ``--resume`` continues in: ``root/name`` when named, else the latest run
    folder without ``results.md`` (``None`` when every run finished).

    Raises:
        ValueError: ``name`` names no run folder under ``root``, or one that finished (its
            files stay as they are: one may be the champion's).
    """
    unfinished = [p for p in run_folders(root) if not (p / FINISHED).is_file()]
    if name is None:
        return unfinished[-1] if unfinished else None
    folder = root / name
    if not folder.is_dir():
        known = ", ".join(p.name for p in run_folders(root)) or "none"
        raise ValueError(f"--resume {name}: no run folder {folder} (runs there: {known})")
    if folder not in unfinished:
        raise ValueError(f"--resume {name}: the run in {folder} finished ({FINISHED}); "
                         "nothing to resume")  # fmt: skip
    return folder


def _replace_atomically(root: Path, name: str, write: Callable[[Path], None]) -> Path:
    """``root/name`` replaced in one step by what ``write`` puts at a temporary path beside it:
    a reader sees the old entry or the new one, never half a file."""
    tmp = root / f".{name}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    write(tmp)
    os.replace(tmp, root / name)
    return root / name


def point_latest(folder: Path) -> Path:
    """Point ``<job>/latest`` at the run ``folder`` (a relative link: the job folder can move)."""
    return _replace_atomically(folder.parent, LATEST, lambda tmp: tmp.symlink_to(folder.name))


def champion_name(student_file: str | Path) -> str:
    """The champion's copy of an exported file: ``champion.pt``, or ``champion.pt2`` for an
    AOTInductor package (``export.format: pt2``)."""
    return Path(CHAMPION_FILE).stem + Path(student_file).suffix


def publish_champion(student_file: Path) -> Path:
    """Copy a promoted run's exported file to its job's ``champion.pt`` (the run folder's
    parent), replacing the old champion's copy atomically; the run's own file stays its own.
    A pt2 package goes to ``champion.pt2``, its encoding table first to
    ``champion.encoding.txt``."""
    from recdistill.export import encoding_path

    student_file = Path(student_file)
    root, name = student_file.parent.parent, champion_name(student_file)
    if student_file.suffix == ".pt2":
        table = encoding_path(student_file)
        _replace_atomically(root, encoding_path(name).name, lambda tmp: shutil.copyfile(table, tmp))
    return _replace_atomically(root, name, lambda tmp: shutil.copyfile(student_file, tmp))
