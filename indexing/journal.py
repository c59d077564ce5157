"""The journal of an index folder (``.journal``): names a writer is about to create or delete,
recorded (and fsynced) before it does, so that what a killed run left behind is known and removed
by the next writer, and nothing else ever is: files the index did not write are never touched.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mergeseek.errors import DamagedIndexError
from mergeseek.indexing.layout import FAISS_FILE, JOURNAL, MANIFEST, TMP_TAG, read_manifest, shard_files
from mergeseek.runtime import fsync_dir, write_error

log = logging.getLogger(__name__)


class Journal:
    """The journal of the index folder ``root`` (used by its one writer, under the writer's lock)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._recorded: set = set()

    def record(self, *paths: Path) -> None:
        """Record names before they are created (or deleted), so a killed run's leftovers are known."""
        names = [p.relative_to(self.root).as_posix() for p in paths]
        names = [n for n in names if n not in self._recorded]
        if not names:
            return
        path = self.root / JOURNAL
        new = not path.exists()
        try:
            with open(path, "a") as fh:
                fh.write("".join(n + "\n" for n in names))
                fh.flush()
                os.fsync(fh.fileno())
            if new:
                fsync_dir(self.root)
        except OSError as exc:
            raise write_error(path, exc) from None
        self._recorded.update(names)

    def recover(self) -> None:
        """Remove journaled files that the committed manifest does not list (left by a killed run)."""
        path = self.root / JOURNAL
        if not path.is_file():
            return
        names = {n.strip() for n in path.read_text(errors="replace").splitlines() if n.strip()}
        try:
            on_disk = read_manifest(self.root)
        except DamagedIndexError:
            on_disk = None
        keep = {MANIFEST, FAISS_FILE}
        if on_disk is not None:
            keep |= {p.relative_to(self.root).as_posix() for s in on_disk.shards for p in shard_files(self.root, s)}
        removed = 0
        for name in sorted(names - keep):
            if ".." in Path(name).parts or Path(name).is_absolute():
                continue
            if on_disk is None and not name.endswith(TMP_TAG):
                continue  # no manifest to compare with: keep every shard for `repair`
            p = self.root / name
            if p.is_file():
                p.unlink()
                removed += 1
        if removed:
            log.warning("removed %d file(s) an interrupted run of mergeseek left in %s", removed, self.root)
        pending = [n for n in names - keep if on_disk is None and (self.root / n).is_file()]
        if on_disk is not None or not pending:
            path.unlink(missing_ok=True)
            self._recorded.clear()
