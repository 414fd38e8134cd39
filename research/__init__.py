"""Research harness of alpha_tuner: benchmarks and calibration runs (not part of the installed package).

Run its scripts from a clone, e.g. ``python -m research.lm_bench --help``.
"""
