"""The manifest of a prepared dataset: ``<root>/lowmem_data.json``, written last.

A prepared dataset is a folder ``root/`` with ``train/`` and ``val/`` litdata chunk folders (each
with its ``index.json``) and this manifest. It is written into a temporary sibling and renamed
into place once complete, so a folder without the manifest is not a prepared dataset, or one whose
preparation did not finish; :func:`read_manifest` refuses it.

Fields (JSON object):

- ``format``: ``"lowmem-data"``; ``format_version``: :data:`FORMAT_VERSION` (an integer);
- ``kind``: ``"images"``, ``"text"`` or ``"samples"`` (tuples stored and returned as they are);
- ``splits``: samples per split, ``{"train": n, "val": m}``; ``chunks``: chunk files per split;
  ``bytes``: bytes of all chunk files; ``source``: where the data came from (informational);
- images: ``classes`` (label ``i`` is ``classes[i]``), ``image_size`` ``[height, width]`` in
  pixels, ``channels`` (1 or 3), ``pixel_format``: ``"uint8"`` (0..255 on disk, returned as
  float32 in [-1, 1]) or ``"float32"`` (stored in [-1, 1]);
- text: ``block_size`` (tokens per training sequence; a stored block holds ``block_size + 1``),
  ``tokenizer`` (``"bytes"``, ``"tiktoken:<encoding>"`` or a ``tokenizer.json`` path),
  ``vocab_size``, ``token_dtype`` (``"uint8"`` or ``"int32"`` on disk).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DataError", "FORMAT_VERSION", "MANIFEST_NAME", "SPLITS", "Manifest", "read_manifest", "write_manifest"]

MANIFEST_NAME = "lowmem_data.json"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
KINDS = ("images", "text", "samples")


class DataError(ValueError):
    """Bad input for preparing or reading a dataset; the CLI prints it as one line."""


@dataclass
class Manifest:
    """What a prepared dataset holds (see the module docstring for every field)."""

    kind: str
    splits: dict[str, int]
    chunks: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    source: str = ""
    classes: list[str] | None = None
    image_size: list[int] | None = None
    channels: int | None = None
    pixel_format: str | None = None
    block_size: int | None = None
    tokenizer: str | None = None
    vocab_size: int | None = None
    token_dtype: str | None = None
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        data = {"format": "lowmem-data", **{k: v for k, v in asdict(self).items() if v is not None}}
        return json.dumps(data, indent=1) + "\n"


def write_manifest(root: str | Path, manifest: Manifest) -> Path:
    """Write ``root/lowmem_data.json`` (call it last: its presence marks the dataset complete)."""
    path = Path(root) / MANIFEST_NAME
    path.write_text(manifest.to_json())
    return path


def _prepare_hint(root: Path) -> str:
    return f"lowmem data prepare --kind images|text --source <folder or files> --out {root}"


def read_manifest(root: str | Path) -> Manifest:
    """The manifest of the prepared dataset ``root``, checked against its chunk folders.

    Raises:
        DataError: ``root`` is missing, has no manifest (not prepared, or preparation did not
            finish), a manifest of another format version, or a split whose chunk index is
            missing or disagrees with the manifest's sample count.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"prepared dataset {root}: no such directory; write it with `{_prepare_hint(root)}`")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{root} is not a prepared dataset, or its preparation did not finish (it has no "
                        f"{MANIFEST_NAME}); run `{_prepare_hint(root)}`")  # fmt: skip
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is not readable JSON ({err}); prepare the dataset again") from None
    version = data.get("format_version")
    if data.get("format") != "lowmem-data" or not isinstance(version, int):
        raise DataError(f"{path} is not a lowmem dataset manifest; prepare the dataset again")
    if version != FORMAT_VERSION:
        raise DataError(f"{root} was prepared in data format version {version}, this lowmem reads version "
                        f"{FORMAT_VERSION}; prepare it again with this lowmem")  # fmt: skip
    data.pop("format")
    try:
        manifest = Manifest(**data)
    except TypeError as err:
        raise DataError(f"{path} has unexpected fields ({err}); prepare the dataset again") from None
    if manifest.kind not in KINDS or set(manifest.splits) != set(SPLITS):
        raise DataError(f"{path}: kind {manifest.kind!r} / splits {sorted(manifest.splits)} are not one of {KINDS} "
                        f"/ {list(SPLITS)}; prepare the dataset again")  # fmt: skip
    for split in SPLITS:
        index = root / split / "index.json"
        try:
            stored = sum(chunk["chunk_size"] for chunk in json.loads(index.read_text())["chunks"])
        except (OSError, ValueError, KeyError, TypeError):
            raise DataError(f"{root}/{split} has no readable litdata index (index.json); the dataset is incomplete: "
                            f"prepare it again with `{_prepare_hint(root)} --overwrite`") from None  # fmt: skip
        if stored != manifest.splits[split]:
            raise DataError(f"{root}/{split} holds {stored} samples but {MANIFEST_NAME} says "
                            f"{manifest.splits[split]}; prepare the dataset again")  # fmt: skip
    return manifest
