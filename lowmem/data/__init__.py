"""A user's own data as litdata chunks: ``lowmem data prepare`` and the pieces behind it.

    lowmem data prepare --kind images --source photos/ --out data/photos --size 32
    lowmem data prepare --kind text --source notes/ --out data/notes --block_size 64
    lowmem fit --config configs/cnn_adamw.yaml \\
        --data=lowmem.lightning_modules.StreamingDataModule --data.init_args.root=data/photos

A prepared dataset is a folder with ``train/`` and ``val/`` litdata chunks and a manifest,
``lowmem_data.json`` (:mod:`lowmem.data.manifest`), written last and moved into place atomically.
``lowmem.lightning_modules.StreamingDataModule`` trains from it. Nothing here imports Lightning.
"""

from lowmem.data.chunks import ChunkedSplit, ChunkStats, write_chunks
from lowmem.data.images import prepare_images
from lowmem.data.manifest import MANIFEST_NAME, DataError, Manifest, read_manifest
from lowmem.data.output import PreparedOutput
from lowmem.data.text import prepare_text
from lowmem.data.tokenizers import Tokenizer, load_tokenizer

__all__ = [
    "MANIFEST_NAME",
    "ChunkStats",
    "ChunkedSplit",
    "DataError",
    "Manifest",
    "PreparedOutput",
    "Tokenizer",
    "load_tokenizer",
    "prepare_images",
    "prepare_text",
    "read_manifest",
    "write_chunks",
]
