"""The lightly-train harness of the benchmarks: lightly-train (AGPL) is never a dependency of backbone_kd, so it runs in
its own environment (``venv.py``: ``--lt-python``, else a venv made on first use with pinned requirements), and the
side scripts (``lt_sides.py`` for ``python -m benchmarks.throughput --vs lightly-train`` via ``vs_lightly_train.py``,
``lt_quality_side.py`` for ``python -m benchmarks.quality_compare``) run there as files, ``python path/to/side.py``,
never importing ``benchmarks``; the rest imports as ``benchmarks.lightly_train.<name>`` in our interpreter.
"""
