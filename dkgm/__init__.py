"""DKGM model library: kernel density estimation, debiasing networks, samplers, metrics.

Plain functions and modules with typed arguments. No params parsing, no Prefect,
no artifact layout: `stages/` owns I/O and `pipeline/` owns orchestration. Only
torch and numpy are required, so GPU benchmarks can run this package as plain scripts.
"""

__version__ = "0.1.0"
