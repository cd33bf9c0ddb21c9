"""`hydralora compare` and the engine of keyed runs it shares with benchmarks/quality.py:

    runs.py     training and evaluation runs keyed by their flags, reused when complete
    report.py   the comparison: equal-size rows, learning rates, paired seeds, table, verdict
"""
