"""The `lowmem` command: a LightningCLI with lowmem's defaults (see :mod:`lowmem.cli.app`)."""

from lowmem.cli.app import LowMemCLI, main

__all__ = ["LowMemCLI", "main"]
