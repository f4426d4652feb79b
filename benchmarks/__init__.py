"""Timing and peer comparisons of detkit, run by ``tools/benchmark.py`` and ``tools/bench_peers.py``.

A package of the repository, not of the installed ``detkit``: detkit never imports it. The timing primitive
itself is :mod:`detkit.utils.timing`, which the compression reports share.
"""
