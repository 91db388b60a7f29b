"""``lowmem data prepare --kind images``: a folder with one sub-folder per class -> image chunks.

Layout read: ``SOURCE/<class name>/**/<image file>``. Classes are the sorted sub-folder names
(label ``i`` is ``classes[i]``); image files are those whose extension Pillow opens (others are
skipped and counted); hidden files and folders are ignored.

Stored per image: ``(uint8 tensor (C, H, W), label int)``, read back as float32 in [-1, 1]
(``p / 127.5 - 1``: the range of the digits data the CNN and the diffusion model train on).
With ``size`` every image is centre-cropped to a square and resized to ``size x size`` (bicubic);
without it all images must already have one size. ``channels`` 1 converts to greyscale (Pillow
mode ``L``), 3 to RGB; by default 3 if any image has colour, else 1.

The split is stratified and deterministic: in each class, ``round(n * val_fraction)`` images
(at most ``n - 1``), drawn by a ``random.Random(seed)`` shuffle, go to ``val``; each split is
stored in a shuffled order (classes interleaved), so a partial validation sees every class.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from lowmem.data.manifest import DataError, Manifest
from lowmem.data.output import PreparedOutput, progress
from lowmem.data.sources import visible_files

__all__ = ["prepare_images"]

_GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


def _image_extensions() -> set[str]:
    from PIL import Image

    Image.init()
    return {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def _scan(source: Path) -> tuple[list[str], list[tuple[Path, int]], int]:
    """(classes, [(file, label)], files skipped as not images)."""
    if not source.exists():
        raise DataError(f"--source {source}: no such folder; give a folder with one sub-folder of images per class")
    if not source.is_dir():
        raise DataError(f"--source {source} is a file; --kind images takes a folder with one sub-folder of images "
                        "per class")  # fmt: skip
    extensions = _image_extensions()
    class_dirs = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        loose = [p for p in visible_files(source) if p.suffix.lower() in extensions]
        if loose:
            raise DataError(f"--source {source} has images ({loose[0].name}, ...) but no class sub-folders; put each "
                            f"class's images in {source}/<class name>/ (one sub-folder for a single class)")  # fmt: skip
        raise DataError(f"--source {source} is empty: it has no class sub-folders with images")
    files, skipped = [], 0
    for label, folder in enumerate(class_dirs):
        found = visible_files(folder)
        images = [p for p in found if p.suffix.lower() in extensions]
        if not images:
            raise DataError(f"class folder {folder} has no image files (.png, .jpg, .bmp, ...); remove it or add "
                            "images")  # fmt: skip
        skipped += len(found) - len(images)
        files += [(p, label) for p in images]
    return [p.name for p in class_dirs], files, skipped


def _header(path: Path) -> tuple[tuple[int, int], str]:
    """((width, height), Pillow mode) from the file's header."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.size, img.mode
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {path} ({err}); remove or replace the file") from None


def _load(path: Path, mode: str, size: int | None) -> torch.Tensor:
    """The image as uint8 (C, H, W), converted to ``mode`` and, with ``size``, centre-cropped and resized."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert(mode)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {path} ({err}); remove or replace the file") from None
    if size is not None and img.size != (size, size):
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
    channels = 1 if mode == "L" else 3
    pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return pixels.view(img.height, img.width, channels).permute(2, 0, 1).contiguous()


def _split(files: list[tuple[Path, int]], n_classes: int, val_fraction: float, seed: int) -> dict[str, list]:
    rng = random.Random(seed)
    parts: dict[str, list] = {"train": [], "val": []}
    for label in range(n_classes):
        members = [f for f in files if f[1] == label]
        order = list(range(len(members)))
        rng.shuffle(order)
        n_val = min(len(members) - 1, int(len(members) * val_fraction + 0.5))
        val = set(order[:n_val])
        parts["val"] += [m for i, m in enumerate(members) if i in val]
        parts["train"] += [m for i, m in enumerate(members) if i not in val]
    if not parts["val"]:
        raise DataError(f"--val_fraction {val_fraction} of {len(files)} images leaves no validation image; raise "
                        "--val_fraction or add images")  # fmt: skip
    for members in parts.values():  # classes interleaved: a partial validation (limit_val_batches) sees them all
        rng.shuffle(members)
    return parts


def prepare_images(
    source: str | Path,
    out: str | Path,
    size: int | None = None,
    channels: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    overwrite: bool = False,
    show_progress: bool = True,
) -> tuple[Manifest, str]:
    """Prepare the class folders under ``source`` as a dataset in ``out``; returns (manifest, summary line).

    Args:
        source: folder with one sub-folder of images per class.
        out: the dataset folder to write (``train/``, ``val/``, ``lowmem_data.json``).
        size: side in pixels of the square every image is cropped and resized to (None: keep
            the images' own size, which must be the same for all).
        channels: 1 (greyscale) or 3 (RGB); None: 3 if any image has colour, else 1.
        val_fraction: fraction of each class held out for validation, in (0, 1).
        seed: seed of the train/val split.
        overwrite: replace an existing prepared dataset at ``out``.
        show_progress: progress bars on a terminal.

    Raises:
        DataError: bad input (the message says which file or option, and the fix).
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"--val_fraction {val_fraction} must be between 0 and 1 (exclusive), e.g. 0.1")
    if size is not None and size < 1:
        raise DataError(f"--size {size} must be a positive number of pixels, e.g. 32")
    if channels not in (None, 1, 3):
        raise DataError(f"--channels {channels} must be 1 (greyscale) or 3 (RGB)")
    source = Path(source)
    output = PreparedOutput(out, overwrite=overwrite, show_progress=show_progress)
    classes, files, skipped = _scan(source)
    headers = {path: _header(path) for path, _ in progress(files, len(files), "checking images", enabled=show_progress)}
    if size is None:
        first = files[0][0]
        other = next((p for p, _ in files if headers[p][0] != headers[first][0]), None)
        if other is not None:
            (w1, h1), (w2, h2) = headers[first][0], headers[other][0]
            raise DataError(f"images differ in size: {first} is {w1}x{h1}, {other} is {w2}x{h2}; pass --size N to "
                            "crop and resize every image to NxN")  # fmt: skip
        width, height = headers[first][0]
    else:
        width = height = size
    if channels is None:
        channels = 1 if all(mode in _GREY_MODES for _, mode in headers.values()) else 3
    mode = "L" if channels == 1 else "RGB"
    parts = _split(files, len(classes), val_fraction, seed)
    with output:
        for split, members in parts.items():
            samples = ((_load(path, mode, size), label) for path, label in members)
            output.write_split(split, samples, len(members), f"writing {split} images")
        manifest = output.finish(Manifest(kind="images", splits={}, source=str(source.resolve()), classes=classes,
                                          image_size=[height, width], channels=channels, pixel_format="uint8"))  # fmt: skip
    note = f", skipped {skipped} non-image files" if skipped else ""
    what = f"{len(files)} images of {len(classes)} classes ({height}x{width}, {channels} channel{'s' * (channels > 1)}{note})"
    return manifest, output.summary(manifest, what)
