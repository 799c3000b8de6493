"""Quality measurement: for the digits models a judge classifier, Fréchet distance, evaluation and sweeps
(needs scikit-learn for the real digits and, for plots, matplotlib: ``pip install fastdiff[digits]``); for the
coming shapes pipeline the attribute-detector judge in :mod:`fastdiff.quality.shapes_judge`.
"""

from fastdiff.quality.evaluate import EvalResult, evaluate, format_table, score
from fastdiff.quality.frechet import frechet_distance

__all__ = ["EvalResult", "evaluate", "format_table", "frechet_distance", "score"]
