"""`embedkit compare`: on the clinic's own data, which encoder and which fusion, at what cost, better than what.

    data -> encoders (extracted once each, or found in embedding folders)
         -> the rows every encoder embedded, with labels; one set of grouped splits for all
         -> the grid: baselines (majority, chance), every fusion x encoder (pair) x alignment
         -> each configuration trained as `train` trains it on the same splits (choices on validation,
            test once), its test probabilities kept; finished configurations are reused on a rerun
         -> the leaderboard: scores with paired-bootstrap intervals, differences to the best, to the
            logistic baseline and to chance on the same resamples, costs  (board.py)
         -> label efficiency of the best few (curve.py), raw data through the encoders (raw.py)
         -> OUT/leaderboard.csv, OUT/compare.json, OUT/report.html

`compare(...)` returns the leaderboard as a pandas DataFrame; the CLI prints it.
"""

from __future__ import annotations

from embedkit.comparison.config import METRICS, CompareConfig
from embedkit.comparison.run import compare

__all__ = ["CompareConfig", "METRICS", "compare"]
