"""Verify a signature against references of the claimed writer, the way a bank or a document examiner does.

    from training_utils import Verifier

    verifier = Verifier.from_run("runs/cedar")              # the run's best model and validation EER threshold
    verifier.enroll("alice", ["alice_1.png", "alice_2.png", "alice_3.png"])
    decision = verifier.verify("cheque.png", writer="alice")
    decision.genuine, decision.distance, decision.distances  # the mean of the 3 distances against the threshold
    decision, explanation = verifier.explain("cheque.png", writer="alice", figure="why.png")

Enrolled references are embedded once, when enrolled, and their features are
kept; each call embeds its query once and compares it with all references
in one batch. A query is genuine when the aggregate (mean, min or max) of its
distances is at or below the threshold.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from model_v3 import Explanation, TokenFeatures, ViT_for_OSV_DSNet, load_pretrained
from models.errors import InputError
from module.core.precision import model_device
from module.core.wording import option
from module.data.images import load_signature
from module.evaluation.metrics import AGGREGATES
from module.evaluation.plots import plot_explanation
from module.run.trained import load_trained_model, run_threshold

__all__ = ["Decision", "Verifier"]

# Images per backbone pass when enrolling many references.
EMBED_BATCH = 16


class Decision(NamedTuple):
    """A verification: ``genuine`` when ``distance <= threshold``.

    Attributes:
        distances: the query's distance to each reference, in their order.
        distance: their aggregate (mean, min or max).
        threshold: the distance threshold used.
        genuine: the decision.
    """

    distances: list[float]
    distance: float
    threshold: float
    genuine: bool


class _Enrolled(NamedTuple):
    paths: list[str]
    features: TokenFeatures  # tokens [K, N, 384], kept [K, N], on the model's device


class Verifier:
    """A model (eval mode), a distance threshold and the enrolled writers' reference features.

    Args:
        model: a ``ViT_for_OSV_DSNet``; it is put in eval mode and stays on its device.
        threshold: a query is genuine when its aggregate distance is at or below it.
        image_size: the model's input side, pixels (the run's ``image_size``).
        aggregate: how the distances to several references combine: ``mean``, ``min`` or ``max``.
        threshold_source: where the threshold comes from, for messages.
    """

    def __init__(self, model: nn.Module, threshold: float, *, image_size: int = 224, aggregate: str = "mean",
                 threshold_source: str = "given") -> None:
        _check_aggregate(aggregate)
        self.model = model.eval()
        self.threshold = float(threshold)
        self.image_size = int(image_size)
        self.aggregate = aggregate
        self.threshold_source = threshold_source
        self.device = model_device(model)
        self._enrolled: dict[Any, _Enrolled] = {}

    @classmethod
    def from_run(cls, run: str | Path, *, threshold: float | None = None, aggregate: str = "mean") -> Verifier:
        """The best model of a run folder (or checkpoint file) and its validation EER threshold (or ``threshold``)."""

        source = option("threshold", threshold)
        if threshold is None:  # read first: a run never evaluated fails before the model is loaded
            threshold, source = run_threshold(run)
        config, model = load_trained_model(run)
        return cls(model, threshold, image_size=config.image_size, aggregate=aggregate, threshold_source=source)

    @classmethod
    def from_weights(cls, path: str | Path, *, threshold: float, image_size: int = 224,
                     model_options: dict[str, Any] | None = None, device: str | torch.device | None = None,
                     aggregate: str = "mean") -> Verifier:
        """Plain weights (``load_pretrained``: a state dict, e.g. a run's ``best_weights.pth``) and a threshold.

        ``model_options``: ``ViT_for_OSV_DSNet``'s options (default: the
        authors'); ``device``: default CUDA when there is one, else the CPU.
        """
        model = load_pretrained(ViT_for_OSV_DSNet(model_options), path, strict=True)
        device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(model.to(device), threshold, image_size=image_size, aggregate=aggregate,
                   threshold_source=f"{option('threshold', threshold)} (weights {path})")

    @property
    def enrolled(self) -> dict[Any, list[str]]:
        """The enrolled writers and their reference paths."""
        return {writer: list(entry.paths) for writer, entry in self._enrolled.items()}

    def enroll(self, writer: Any, reference_paths: Sequence[str | os.PathLike]) -> None:
        """Embed ``writer``'s genuine references and keep their features (replacing any enrolled before)."""
        paths = [str(path) for path in reference_paths]
        if not paths:
            raise InputError(f"enroll needs at least one reference scan for writer {writer!r}")
        self._enrolled[writer] = _Enrolled(paths, self._embed(self._load(paths)))

    def verify(self, query_path: str | os.PathLike, *, writer: Any = None,
               references: Sequence[str | os.PathLike] | None = None, aggregate: str | None = None) -> Decision:
        """Is ``query_path`` by ``writer`` (enrolled) or by the writer of ``references`` (scans)?"""
        _, query, reference_features = self._query_and_references(query_path, writer, references)
        return self._decide(query, reference_features, aggregate)

    def explain(self, query_path: str | os.PathLike, *, writer: Any = None,
                references: Sequence[str | os.PathLike] | None = None, aggregate: str | None = None,
                figure: str | os.PathLike | None = None) -> tuple[Decision, Explanation]:
        """``verify``, and the explanation of the query against its closest reference.

        ``figure``: also draw it there (``plot_explanation``, a PNG).
        """
        query_image, query, reference_features = self._query_and_references(query_path, writer, references)
        decision = self._decide(query, reference_features, aggregate)
        closest = min(range(len(decision.distances)), key=decision.distances.__getitem__)
        grid = (self.image_size // 32, self.image_size // 32)
        with torch.no_grad():
            explanation = self.model.explain_features(reference_features.select(closest), query, grid)
        if figure is not None:
            reference_path = (self._enrolled[writer].paths if references is None else list(map(str, references)))[closest]
            count = len(decision.distances)
            title = (f"{Path(query_path).name} against {Path(reference_path).name}"
                     + (f" (the closest of {count} references; {aggregate or self.aggregate} distance "
                        f"{decision.distance:.4f}: {'GENUINE' if decision.genuine else 'FORGED'})" if count > 1 else ""))
            plot_explanation(explanation, self._load([reference_path])[0], query_image, figure,
                             threshold=self.threshold, title=title)
        return decision, explanation

    def _load(self, paths: Sequence[str]) -> torch.Tensor:
        """``[K, 1, S, S]`` model inputs of the scans at ``paths``, on the CPU."""
        return torch.stack([load_signature(path, self.image_size) for path in paths])

    def _embed(self, images: torch.Tensor) -> TokenFeatures:
        with torch.no_grad():
            parts = [self.model.embed(batch.to(self.device)) for batch in images.split(EMBED_BATCH)]
        return TokenFeatures(torch.cat([part.tokens for part in parts]), torch.cat([part.kept for part in parts]))

    def _query_and_references(self, query_path: str | os.PathLike, writer: Any,
                              references: Sequence[str | os.PathLike] | None
                              ) -> tuple[torch.Tensor, TokenFeatures, TokenFeatures]:
        """``(query image [1, S, S], query features, reference features)``; one backbone pass."""
        if (writer is None) == (references is None):
            raise InputError("give either writer= (enrolled) or references= (scans), not both and not neither")
        if references is not None:
            paths = [str(path) for path in references]
            if not paths:
                raise InputError("references= is empty: give at least one reference scan")
            images = self._load([*paths, str(query_path)])
            features = self._embed(images)
            return images[-1], features.select(len(paths)), features.select(slice(0, len(paths)))
        if writer not in self._enrolled:
            raise InputError(f"writer {writer!r} is not enrolled (enrolled: {sorted(map(str, self._enrolled))[:10]}); "
                             "call enroll(writer, reference_paths) first")
        image = self._load([str(query_path)])
        return image[0], self._embed(image), self._enrolled[writer].features

    def _decide(self, query: TokenFeatures, references: TokenFeatures, aggregate: str | None) -> Decision:
        aggregate = aggregate or self.aggregate
        _check_aggregate(aggregate)
        count = references.tokens.shape[0]
        repeated = TokenFeatures(query.tokens.expand(count, -1, -1), query.kept.expand(count, -1))
        with torch.no_grad():
            distances = self.model.compare(references, repeated)[:, 0].double().cpu()
        distance = float(getattr(distances, aggregate)())
        return Decision(distances.tolist(), distance, self.threshold, distance <= self.threshold)


def _check_aggregate(aggregate: str) -> None:
    if aggregate not in AGGREGATES:
        raise InputError(f"{option('aggregate')} must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
