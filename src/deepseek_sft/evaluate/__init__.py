"""Stage evaluate: one evaluation code path for the base, SFT and compressed models.

`evaluate_model` (core.py) measures one model; `run_evaluation` (stage.py) runs the stage: every model, the
TF-IDF baseline, error analysis, metrics, plots and the report.
"""

from .core import ModelResults, evaluate_loaded, evaluate_model, read_split
from .stage import run_evaluation

__all__ = ["ModelResults", "evaluate_loaded", "evaluate_model", "read_split", "run_evaluation"]
