"""Listing the files of a ``--source`` folder."""

from __future__ import annotations

from pathlib import Path

__all__ = ["visible_files"]


def visible_files(folder: Path) -> list[Path]:
    """Every file under ``folder`` (recursively), sorted, without hidden files or anything inside
    hidden folders (``.git``, ``.DS_Store``, ...)."""
    return sorted(p for p in folder.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))  # fmt: skip
