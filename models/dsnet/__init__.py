"""The DSNet backbone of DetailSemNet."""
from .dsnet import DSNet

__all__ = ["DSNet"]
