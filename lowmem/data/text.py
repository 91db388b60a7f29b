"""``lowmem data prepare --kind text``: text files -> fixed-length token blocks for the language model.

Sources are files and folders (folders: every visible file under them, sorted). The files are
tokenized one by one (``bytes``: read in 16 MiB pieces; a named tokenizer: a whole file at a
time, decoded as UTF-8) and their tokens concatenated in that order into one stream, kept in a
temporary file rather than in memory. The stream is cut into ``n = (tokens - 1) // block_size``
blocks of ``block_size + 1`` tokens, block ``i`` starting at token ``i * block_size`` (so
consecutive blocks share one token; the same windows as ``StdlibTextDataModule``). A block is read
back as ``(x, y) = (block[:-1], block[1:])``, int64. The last ``round(n * val_fraction)`` blocks
(at least one) are the validation split, the rest the training split: validation text is the
end of the stream, never interleaved with training text.

A file with NUL bytes is refused as not text.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from lowmem.data.manifest import DataError, Manifest
from lowmem.data.output import PreparedOutput, progress
from lowmem.data.sources import visible_files
from lowmem.data.tokenizers import Tokenizer, load_tokenizer

__all__ = ["prepare_text"]

PIECE_BYTES = 16 << 20


def _text_files(sources: list[str | Path]) -> list[Path]:
    if not sources:
        raise DataError("--source: give one or more text files or folders")
    files: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            found = visible_files(source)
            if not found:
                raise DataError(f"--source {source} is an empty folder: it has no text files")
            files += found
        elif source.is_file():
            files.append(source)
        else:
            raise DataError(f"--source {source}: no such file or folder")
    return files


def _pieces(files: list[Path], tokenizer: Tokenizer) -> Iterator[tuple[Path, bytes]]:
    """(file, bytes) in order: whole files for a text tokenizer, 16 MiB pieces for ``bytes``."""
    for path in files:
        with path.open("rb") as f:
            if tokenizer.text:
                yield path, f.read()
                continue
            while piece := f.read(PIECE_BYTES):
                yield path, piece


def _encode(path: Path, piece: bytes, tokenizer: Tokenizer) -> np.ndarray:
    if b"\0" in piece:
        raise DataError(f"{path} is not text (it has NUL bytes); remove it from --source or name the text files")
    try:
        return tokenizer.encode(piece)
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); --tokenizer {tokenizer.spec} "
                        "reads UTF-8 only (--tokenizer bytes reads any text)") from None  # fmt: skip


def prepare_text(
    sources: list[str | Path],
    out: str | Path,
    block_size: int = 64,
    tokenizer: str = "bytes",
    val_fraction: float = 0.1,
    overwrite: bool = False,
    show_progress: bool = True,
) -> tuple[Manifest, str]:
    """Prepare text files as token blocks in ``out``; returns (manifest, summary line).

    Args:
        sources: text files and/or folders of text files.
        out: the dataset folder to write (``train/``, ``val/``, ``lowmem_data.json``).
        block_size: tokens per training sequence (``x`` and ``y`` each have this many).
        tokenizer: ``bytes``, ``tiktoken:<encoding>`` or a ``tokenizer.json`` path (see
            :mod:`lowmem.data.tokenizers`).
        val_fraction: fraction of the blocks (the stream's end) held out for validation, in (0, 1).
        overwrite: replace an existing prepared dataset at ``out``.
        show_progress: progress bars on a terminal.

    Raises:
        DataError: bad input (the message says which file or option, and the fix).
    """
    if block_size < 1:
        raise DataError(f"--block_size {block_size} must be at least 1 token, e.g. 64 (the lm configs' block size)")
    if not 0 < val_fraction < 1:
        raise DataError(f"--val_fraction {val_fraction} must be between 0 and 1 (exclusive), e.g. 0.1")
    output = PreparedOutput(out, overwrite=overwrite, show_progress=show_progress)
    files = _text_files(sources)
    tok = load_tokenizer(tokenizer)
    sizes = [p.stat().st_size for p in files]
    if not sum(sizes):
        raise DataError(f"no text: the {len(files)} file(s) of --source are empty")
    n_pieces = len(files) if tok.text else sum(math.ceil(s / PIECE_BYTES) for s in sizes)
    dtype = np.dtype(tok.dtype)
    with output:
        stream = output.path / "tokens.tmp"
        with stream.open("wb") as f:
            for path, piece in progress(_pieces(files, tok), n_pieces, "tokenizing", enabled=show_progress):
                _encode(path, piece, tok).astype(dtype, copy=False).tofile(f)
        tokens = np.memmap(stream, dtype=dtype, mode="r") if stream.stat().st_size else np.zeros(0, dtype)
        n_blocks = (len(tokens) - 1) // block_size
        if n_blocks < 2:
            raise DataError(f"too little text: {len(tokens)} tokens make {max(n_blocks, 0)} block(s) of "
                            f"--block_size {block_size} (+1); need at least 2 (one per split): add text or lower "
                            "--block_size")  # fmt: skip
        n_val = min(n_blocks - 1, max(1, int(n_blocks * val_fraction + 0.5)))

        def blocks(start: int, stop: int) -> Iterator[tuple[torch.Tensor]]:
            for i in range(start, stop):
                yield (torch.from_numpy(np.array(tokens[i * block_size : (i + 1) * block_size + 1])),)

        output.write_split("train", blocks(0, n_blocks - n_val), n_blocks - n_val, "writing train blocks")
        output.write_split("val", blocks(n_blocks - n_val, n_blocks), n_val, "writing val blocks")
        del tokens
        stream.unlink()
        manifest = output.finish(Manifest(kind="text", splits={}, source=", ".join(str(Path(s).resolve()) for s in sources),
                                          block_size=block_size, tokenizer=tok.spec, vocab_size=tok.vocab_size,
                                          token_dtype=tok.dtype))  # fmt: skip
    what = (f"{n_blocks} blocks of {block_size}+1 tokens ({tok.spec}, vocabulary {tok.vocab_size}) from "
            f"{len(files)} file{'s' * (len(files) > 1)}, {sum(sizes):,} bytes of text")  # fmt: skip
    return manifest, output.summary(manifest, what)
