"""Tokenizers for ``lowmem data prepare --kind text --tokenizer SPEC``, offline only.

``SPEC`` is one of:

- ``bytes`` (the default): every byte is a token, vocabulary 256, nothing to install;
- ``tiktoken:<encoding>`` (e.g. ``tiktoken:gpt2``): needs the ``tiktoken`` package and the
  encoding's file already in tiktoken's cache (``$TIKTOKEN_CACHE_DIR``, else
  ``~/.cache/tiktoken``); it is never downloaded here;
- the path of a Hugging Face ``tokenizer.json`` file: needs the ``tokenizers`` package.

A :class:`Tokenizer` maps the raw bytes of one file to token ids in ``[0, vocab_size)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lowmem.data.manifest import DataError

__all__ = ["Tokenizer", "load_tokenizer"]


@dataclass(frozen=True)
class Tokenizer:
    """``encode(raw bytes of a file) -> token ids`` (numpy array) and the vocabulary size.

    ``text`` is False for ``bytes`` (any file is accepted as it is); the others decode the bytes
    as UTF-8 first, so a file that is not UTF-8 is an error.
    """

    spec: str
    vocab_size: int
    encode: Callable[[bytes], np.ndarray]
    text: bool = True

    @property
    def dtype(self) -> str:
        """On-disk token dtype: ``uint8`` for a vocabulary of at most 256, else ``int32``."""
        return "uint8" if self.vocab_size <= 256 else "int32"


def _missing(spec: str, package: str) -> DataError:
    return DataError(f"--tokenizer {spec} needs the `{package}` package, which is not installed: `pip install "
                     f"{package}`, or use --tokenizer bytes")  # fmt: skip


class _NotCached(Exception):
    pass


@contextlib.contextmanager
def _tiktoken_offline() -> Iterator[None]:
    """tiktoken reads an encoding's file from its cache, else downloads it (``tiktoken.load.read_file``
    on a URL): refuse the download."""
    import tiktoken.load

    real = tiktoken.load.read_file

    def read_local_only(blobpath: str) -> bytes:
        if "://" in blobpath:
            raise _NotCached(blobpath)
        return real(blobpath)

    tiktoken.load.read_file = read_local_only
    try:
        yield
    finally:
        tiktoken.load.read_file = real


def _tiktoken(spec: str, name: str) -> Tokenizer:
    try:
        import tiktoken
    except ImportError:
        raise _missing(spec, "tiktoken") from None
    if name not in tiktoken.list_encoding_names():
        raise DataError(f"--tokenizer {spec}: tiktoken has no encoding {name!r}; it has "
                        f"{', '.join(tiktoken.list_encoding_names())}")  # fmt: skip
    try:
        with _tiktoken_offline():
            encoding = tiktoken.get_encoding(name)
    except _NotCached as err:
        raise DataError(f"--tokenizer {spec} is not available offline: {err} is not in tiktoken's cache "
                        "($TIKTOKEN_CACHE_DIR or ~/.cache/tiktoken); run tiktoken.get_encoding("
                        f"{name!r}) once where there is internet and copy the cache, or use --tokenizer bytes") from None  # fmt: skip

    def encode(data: bytes) -> np.ndarray:
        return np.asarray(encoding.encode_ordinary(data.decode("utf-8")), dtype=np.int64)

    return Tokenizer(spec, encoding.n_vocab, encode)


def _hf_file(spec: str, path: Path) -> Tokenizer:
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError:
        raise _missing(spec, "tokenizers") from None
    try:
        tokenizer = HFTokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises its own Exception subclass for unparsable files
        raise DataError(f"--tokenizer {spec} is not a Hugging Face tokenizer.json file ({err})") from None

    def encode(data: bytes) -> np.ndarray:
        return np.asarray(tokenizer.encode(data.decode("utf-8"), add_special_tokens=False).ids, dtype=np.int64)

    return Tokenizer(str(path.resolve()), tokenizer.get_vocab_size(with_added_tokens=True), encode)


def _bytes(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)


def load_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer ``spec`` names (see the module docstring).

    Raises:
        DataError: an unknown form, a package that is not installed, an encoding that is not
            cached, or a file that is not a tokenizer.
    """
    if spec == "bytes":
        return Tokenizer("bytes", 256, _bytes, text=False)
    if spec.startswith("tiktoken:"):
        return _tiktoken(spec, spec.removeprefix("tiktoken:"))
    path = Path(spec).expanduser()
    if path.is_file():
        return _hf_file(spec, path)
    raise DataError(f"--tokenizer {spec}: not 'bytes', 'tiktoken:<encoding>' (e.g. tiktoken:gpt2) or an existing "
                    "Hugging Face tokenizer.json file")  # fmt: skip
