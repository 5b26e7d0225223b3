"""Product benchmarks of backbone_kd: each prints a table and writes JSON (see README, *Benchmarks*).

A package so that scripts and tests import each other as ``benchmarks.<name>`` without ``sys.path`` edits. Run them
from the repository root as modules: ``python -m benchmarks.throughput ...``. Not installed with the package
(``pyproject.toml`` installs ``backbone_kd*`` only): benchmarks need a checkout and its ``../shared`` data.
"""
