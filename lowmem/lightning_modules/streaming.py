"""Datasets that outgrow memory: prepared litdata chunks, read by index as the model trains.

    lowmem data prepare --kind images --source photos/ --out data/photos --size 32   # or --kind text
    python -m lowmem.lightning_modules.streaming digits data/digits    # the built-in sets: digits, text
    lowmem fit --config configs/cnn_adamw.yaml \\
        --data=lowmem.lightning_modules.StreamingDataModule --data.init_args.root=data/digits

A prepared dataset (``lowmem.data``) is ``root/{train,val}`` litdata chunks plus
``root/lowmem_data.json``, its manifest: what the samples are (images: classes, size, channels;
text: block size, tokenizer, vocabulary). ``StreamingDataModule`` refuses a folder without a
manifest (not prepared, or preparation did not finish), and refuses a model whose configuration
disagrees with the manifest (``num_classes``, ``in_channels``, ``image_size``, ``vocab_size``,
``block_size``) in one line, before training.

Batches: images ``(float32 (B, C, H, W) in [-1, 1], int64 (B,))``; text ``(int64 (B, T), int64
(B, T))`` with ``y`` the next-token shift of ``x``; ``samples`` as stored. Items are read from the
chunk files one at a time (litdata's reader; only the current item is decoded), in the order
of ``ResumableSampler``: a seeded permutation per epoch, sharded across DDP ranks into disjoint
equal shares (the tail that does not divide evenly is dropped, as is the last incomplete batch),
and a run resumed from a mid-epoch checkpoint continues with exactly the batches the
uninterrupted run trains on. Validation reads the val split in order, every sample.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lowmem.data import ChunkedSplit, DataError, Manifest, PreparedOutput, read_manifest, write_chunks
from lowmem.data.chunks import decode_images, decode_samples, decode_text
from lowmem.lightning_modules.errors import ConfigError
from lowmem.lightning_modules.sampling import ResumableSampler

__all__ = ["StreamingDataModule", "write_chunks"]


def _decoder(manifest: Manifest) -> Any:
    if manifest.kind == "images":
        return functools.partial(decode_images, pixel_format=manifest.pixel_format or "uint8")
    return decode_text if manifest.kind == "text" else decode_samples


def model_mismatches(manifest: Manifest, model: Any) -> list[str]:
    """How ``model``'s hyperparameters disagree with the prepared data (empty: they fit).

    Checked where the model has the hyperparameter: images give ``num_classes`` (= number of
    classes), ``in_channels`` (= channels) and ``image_size`` (= the square side); text gives
    ``vocab_size`` (at least the data's) and ``block_size`` (at least the data's)."""
    hp = dict(getattr(model, "hparams", {}) or {})
    name = type(model).__name__
    found = []
    if manifest.kind == "images":
        if "vocab_size" in hp:
            found.append(f"it holds images, but {name} takes token blocks: prepare text with --kind text")
        n = len(manifest.classes or [])
        if "num_classes" in hp and hp["num_classes"] != n:
            shown = ", ".join((manifest.classes or [])[:4]) + (", ..." if n > 4 else "")
            found.append(f"model.init_args.num_classes={hp['num_classes']}, but it has {n} classes ({shown}): set "
                         f"--model.init_args.num_classes={n}")  # fmt: skip
        if "in_channels" in hp and hp["in_channels"] != manifest.channels:
            found.append(f"model.init_args.in_channels={hp['in_channels']}, but its images have {manifest.channels} "
                         f"channel(s): set --model.init_args.in_channels={manifest.channels}")  # fmt: skip
        height, width = manifest.image_size or (0, 0)
        if "image_size" in hp and (height, width) != (hp["image_size"], hp["image_size"]):
            fix = f"--model.init_args.image_size={height}" if height == width else "prepare it with --size N"
            found.append(f"model.init_args.image_size={hp['image_size']}, but its images are {height}x{width}: "
                         f"set {fix}")  # fmt: skip
    elif manifest.kind == "text":
        if "num_classes" in hp or "in_channels" in hp:
            found.append(f"it holds token blocks, but {name} takes images: prepare images with --kind images")
        if "vocab_size" in hp and hp["vocab_size"] < (manifest.vocab_size or 0):
            found.append(f"model.init_args.vocab_size={hp['vocab_size']}, but its tokenizer {manifest.tokenizer} has "
                         f"{manifest.vocab_size} tokens: set --model.init_args.vocab_size={manifest.vocab_size}")  # fmt: skip
        if "block_size" in hp and hp["block_size"] < (manifest.block_size or 0):
            found.append(f"model.init_args.block_size={hp['block_size']}, but its blocks have {manifest.block_size} "
                         f"tokens: set --model.init_args.block_size={manifest.block_size} or prepare it with "
                         f"--block_size {hp['block_size']}")  # fmt: skip
    return found


class StreamingDataModule(pl.LightningDataModule):
    """Batches of a prepared dataset (``lowmem data prepare``, or this module's ``digits``/``text`` writer).

    Args:
        root: the prepared dataset folder (``train/``, ``val/``, ``lowmem_data.json``).
        batch_size: samples per batch (per device under DDP).
        seed: seed of the training order (epoch ``e`` is shuffled with ``seed + e``).
        num_workers: DataLoader worker processes (each opens its own litdata reader).

    Attributes:
        manifest: the dataset's :class:`lowmem.data.Manifest` (classes, image size, channels,
            block size, tokenizer, vocabulary, sample counts).
    """

    def __init__(self, root: str, batch_size: int = 64, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"data.init_args.batch_size={batch_size} must be >= 1")
        try:
            self.manifest = read_manifest(root)
        except DataError as err:
            raise ConfigError(str(err)) from None
        self.root, self.batch_size, self.seed, self.num_workers = Path(root), batch_size, seed, num_workers
        self.splits: dict[str, Dataset] = {}

    def setup(self, stage: str | None = None) -> None:
        model = self.trainer.lightning_module if self.trainer is not None else None
        if model is not None and (found := model_mismatches(self.manifest, model)):
            raise ConfigError(f"the model does not fit the prepared data in {self.root}: {'; '.join(found)}")
        if self.splits:
            return
        decode = _decoder(self.manifest)
        self.splits = {split: ChunkedSplit(self.root / split, decode) for split in ("train", "val")}

    def _split(self, split: str) -> Dataset:
        if not self.splits:  # used directly, without a Trainer
            self.setup()
        return self.splits[split]

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        data = self._split(split)
        sampler = ResumableSampler(data, self.batch_size, seed=self.seed, trainer=self.trainer) if train else None
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler, drop_last=train,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        world = self.trainer.world_size if self.trainer is not None else 1
        if len(self._split("train")) // world < self.batch_size:
            raise ConfigError(f"{self.root}/train has {len(self.splits['train'])} samples, fewer than one batch of "
                              f"data.init_args.batch_size={self.batch_size} per rank ({world} rank(s)): lower the "
                              "batch size")  # fmt: skip
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        """The val split (a prepared dataset has no separate test split)."""
        return self._loader("val")

    def predict_dataloader(self) -> DataLoader:
        """The val split (the diffusion model draws one sample per item)."""
        return self._loader("val")


TEXT_BLOCK_SIZE = 64  # the lm configs' block_size: chunks written by default train with them


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a built-in data set as a prepared dataset (litdata chunks).")
    parser.add_argument("dataset", choices=["digits", "text"])
    parser.add_argument("root", help="output directory (gets train/, val/ and lowmem_data.json)")
    parser.add_argument("--block_size", type=int, default=TEXT_BLOCK_SIZE,
                        help=f"text: tokens per window (default {TEXT_BLOCK_SIZE}, the block size of configs/lm_*.yaml)")  # fmt: skip
    parser.add_argument("--max_bytes", type=int, default=1_000_000, help="text: corpus size")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset at root")
    args = parser.parse_args(argv)
    if args.dataset == "digits":
        from lowmem.lightning_modules.digits import DigitsDataModule

        dm = DigitsDataModule()
        dm.setup()
        manifest = Manifest(kind="images", splits={}, source="scikit-learn digits", classes=[str(i) for i in range(10)],
                            image_size=[8, 8], channels=1, pixel_format="float32")  # fmt: skip
        splits = {split: dm.splits[split] for split in ("train", "val")}
    else:
        from lowmem.lightning_modules.text import StdlibTextDataModule

        dm = StdlibTextDataModule(block_size=args.block_size, max_bytes=args.max_bytes)
        dm.setup()
        manifest = Manifest(kind="text", splits={}, source="Python standard library source", block_size=args.block_size,
                            tokenizer="bytes", vocab_size=256, token_dtype="uint8")  # fmt: skip
        windows = {split: dm.splits[split] for split in ("train", "val")}
        splits = {split: [(torch.cat([x, y[-1:]]).to(torch.uint8),) for x, y in (w[i] for i in range(len(w)))]
                  for split, w in windows.items()}  # fmt: skip
    try:
        with PreparedOutput(args.root, overwrite=args.overwrite) as output:
            for split, data in splits.items():
                output.write_split(split, (data[i] for i in range(len(data))), len(data), f"writing {split}")
            manifest = output.finish(manifest)
    except DataError as err:
        parser.error(str(err))
    print(output.summary(manifest, f"{args.dataset} ({manifest.kind})"))


if __name__ == "__main__":
    _main()
