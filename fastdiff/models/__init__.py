"""Models that ship inside fastdiff (``"digits"``, ``"digits-onestep"``) and label conditioning."""
