"""One library entry per command: the CLI builds one config, calls one of these, renders, exits.

- `fit(FitJob) -> FitRun`: train on normal images and write the model file (`fitting`).
- `score_report(ScoreConfig) -> ScoreRun`: score, decide, reach the verdict, write the outputs (`scoring`).
- `merge(MergeConfig) -> MergeRun`: join shard reports into one run's verdict (`merging`).

Everything a user sees is computed here or below; messages go through `on_message` (progress, files
written) and `on_warning`.
"""

from .fitting import FitJob, FitRun, FitWatch, fit, fit_summary
from .merging import MergeConfig, MergeRun, merge
from .scoring import ScoreConfig, ScoreRun, score_report

__all__ = [
    "FitJob",
    "FitRun",
    "FitWatch",
    "MergeConfig",
    "MergeRun",
    "ScoreConfig",
    "ScoreRun",
    "fit",
    "fit_summary",
    "merge",
    "score_report",
]
