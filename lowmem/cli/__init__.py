"""The `lowmem` command: a LightningCLI with lowmem's defaults (see :mod:`lowmem.cli.app`).

``lowmem`` and ``lowmem --help`` answer from the text below without importing torch and
Lightning (seconds of start-up); ``lowmem data ...`` goes to :mod:`lowmem.cli.data` (no
Lightning either), every other command line to :func:`lowmem.cli.app.main`.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["LowMemCLI", "SUBCOMMANDS", "main"]

# name -> what it does; lowmem.cli.app's parser has the same subcommands (a test checks it).
SUBCOMMANDS = {
    "fit": "train a config (and validate it); --ckpt_path PATH|last resumes",
    "validate": "evaluate a checkpoint on the validation set",
    "test": "evaluate a checkpoint on the test set",
    "predict": "run the model's predict_step (diffusion: samples)",
    "memory": "params/grads/optimizer state of a config vs AdamW, no training (--ranks N: per FSDP2 rank)",
    "roles": "every parameter's role and what each optimizer does with it (dims, momentum, blocks, decay)",
    "compare": "train several configs, one figure and table of loss and memory",
    "data": "prepare your own images or text files as a streaming dataset (lowmem data prepare --help)",
    "snr": "train with AdamW, SNR of Adam's v per layer: SlimAdamW rules JSON, table, figures",
}

HELP = "\n".join([
    f"usage: lowmem [-h] {{{','.join(SUBCOMMANDS)}}} ...",
    "",
    "Train with memory-efficient Adam variants (HMAdamW, SlimAdamW, AdamS, AdaPM, IO-Adam, Adam-mini, AdamW).",
    "",
    "subcommands:",
    *(f"  {name:<9} {text}" for name, text in SUBCOMMANDS.items()),
    "",
    "`lowmem <subcommand> --help` lists the keys of a subcommand; `lowmem fit --config X.yaml --print_config`",
    "prints a config fully resolved.",
])  # fmt: skip


def main(args: Any = None) -> None:
    """Entry point of the ``lowmem`` console script; ``main(["fit", "--config", path])`` from Python."""
    argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else None
    if argv is not None and argv in ([], ["-h"], ["--help"]):
        print(HELP)
        raise SystemExit(0 if argv else 2)
    if argv is not None and argv[:1] == ["data"]:  # its own parser; no Lightning import
        from lowmem.cli.data import data_main

        raise SystemExit(data_main(argv[1:]))
    from lowmem.cli.app import main as app_main

    app_main(args)


def __getattr__(name: str) -> Any:
    if name == "LowMemCLI":
        from lowmem.cli.app import LowMemCLI

        return LowMemCLI
    raise AttributeError(f"module 'lowmem.cli' has no attribute {name!r}")
