"""The seed project's place for preprocessing: ``normalize_image`` is defined in ``module/data/preprocess.py``."""
from module.data.preprocess import BlankScanError, normalize_image

__all__ = ["BlankScanError", "normalize_image"]
