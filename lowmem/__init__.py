"""lowmem: train with memory-efficient Adam variants on PyTorch Lightning."""

__version__ = "0.1.0"
