"""Speed, memory and training-quality benchmarks of lowmem's optimizers; see docs/benchmarks.md.

Each module runs alone (``python -m benchmarks.speed --help``); ``python -m benchmarks.run_all``
(``make bench``) runs all of them.
"""
