"""The seed project's place for the loss: ``ContrastiveLoss`` is defined with the model, in ``models/loss.py``."""
from models.loss import ContrastiveLoss, NonFiniteLossError

__all__ = ["ContrastiveLoss", "NonFiniteLossError"]
