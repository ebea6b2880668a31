"""Verify a signature against references of the claimed writer, the way a bank or a document examiner does.

    from training_utils import Verifier

    verifier = Verifier.from_run("runs/cedar")              # the run's best model and validation EER threshold
    verifier.enroll("alice", ["alice_1.png", "alice_2.png", "alice_3.png"])
    decision = verifier.verify("cheque.png", writer="alice")
    decision.genuine, decision.distance, decision.distances  # the mean of the 3 distances against the threshold
    decision.likelihood_ratio, decision.verbal_equivalent    # the strength of the evidence (calibration.json)
    decision, explanation = verifier.explain("cheque.png", writer="alice", figure="why.png")

Enrolled references are embedded once, when enrolled, and their features are
kept; each call embeds its query once and compares it with all references
in one batch. A query is genuine when the aggregate (mean, min or max) of its
distances is at or below the threshold. With a calibration (a run's
``calibration.json``, fitted on its validation split) each decision also
carries the likelihood ratio of its aggregate distance and the verbal
equivalent on the ENFSI guideline's scale. The calibration was fitted on
single-pair distances; an aggregate of several references is scored as if it
were one pair's distance (the mean of K distances varies less, so its LR is
an approximation).
"""
from __future__ import annotations

import base64
import html
import math
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from model_v3 import Explanation, TokenFeatures, ViT_for_OSV_DSNet, load_pretrained
from models.errors import InputError
from module.core.precision import model_device
from module.core.wording import option
from module.data.images import load_signature
from module.evaluation.calibration import Calibration, load_calibration, missing_calibration_note, verbal_equivalent
from module.evaluation.metrics import AGGREGATES
from module.evaluation.plots import plot_explanation
from module.run.trained import load_trained_model, run_threshold

if TYPE_CHECKING:  # the page's type; gradio is imported when a page is made
    import gradio

__all__ = ["Decision", "Verifier"]

# Images per backbone pass when enrolling many references.
EMBED_BATCH = 16


class Decision(NamedTuple):
    """A verification: ``genuine`` when ``distance <= threshold``; the strength of the evidence when calibrated.

    Attributes:
        distances: the query's distance to each reference, in their order.
        distance: their aggregate (mean, min or max).
        threshold: the distance threshold used.
        genuine: the decision.
        likelihood_ratio: P(distance | same writer) / P(distance | different writers), finite and > 0
            (``None`` without a calibration).
        log10_likelihood_ratio: its log10 (> 0 supports the same writer).
        verbal_equivalent: its words on the ENFSI guideline's scale (``verbal_equivalent``).
    """

    distances: list[float]
    distance: float
    threshold: float
    genuine: bool
    likelihood_ratio: float | None = None
    log10_likelihood_ratio: float | None = None
    verbal_equivalent: str | None = None


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
        calibration: the map distance -> likelihood ratio (``None``: decisions carry no LR).
    """

    def __init__(self, model: nn.Module, threshold: float, *, image_size: int = 224, aggregate: str = "mean",
                 threshold_source: str = "given", calibration: Calibration | None = None) -> None:
        _check_aggregate(aggregate)
        self.model = model.eval()
        if not math.isfinite(float(threshold)) or float(threshold) < 0:
            raise InputError(f"{option('threshold', threshold)} is not a distance threshold: give a finite number "
                             ">= 0 (distances are >= 0; smaller is more likely genuine)")
        self.threshold = float(threshold)
        self.image_size = int(image_size)
        self.aggregate = aggregate
        self.threshold_source = threshold_source
        self.calibration = calibration
        self.device = model_device(model)
        self._enrolled: dict[Any, _Enrolled] = {}

    @classmethod
    def from_run(cls, run: str | Path, *, threshold: float | None = None, aggregate: str = "mean") -> Verifier:
        """The best model of a run folder (or checkpoint file), its validation EER threshold (or ``threshold``) and
        its ``calibration.json``; a run without one warns, saying how to add it."""

        source = option("threshold", threshold)
        if threshold is None:  # read first: a run never evaluated fails before the model is loaded
            threshold, source = run_threshold(run)
        calibration = load_calibration(run)
        if calibration is None:
            warnings.warn(missing_calibration_note(run), stacklevel=2)
        config, model = load_trained_model(run)
        return cls(model, threshold, image_size=config.image_size, aggregate=aggregate, threshold_source=source,
                   calibration=calibration)

    @classmethod
    def from_weights(cls, path: str | Path, *, threshold: float, image_size: int = 224,
                     model_options: dict[str, Any] | None = None, device: str | torch.device | None = None,
                     aggregate: str = "mean", calibration: Calibration | None = None) -> Verifier:
        """Plain weights (``load_pretrained``: a state dict, e.g. a run's ``best_weights.pth``) and a threshold.

        ``model_options``: ``ViT_for_OSV_DSNet``'s options (default: the
        authors'); ``device``: default CUDA when there is one, else the CPU;
        ``calibration``: e.g. ``load_calibration(run_folder)`` of the run the weights come from.
        """
        model = load_pretrained(ViT_for_OSV_DSNet(model_options), path, strict=True)
        device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(model.to(device), threshold, image_size=image_size, aggregate=aggregate,
                   threshold_source=f"{option('threshold', threshold)} (weights {path})", calibration=calibration)

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

    def page(self, *, title: str = "Signature verification") -> gradio.Blocks:
        """A web page on this verifier (Gradio, the ``app`` extra: ``pip install -e .[app]``).

        A user drops one or more reference scans of the claimed writer and the query scan, presses Verify, and
        sees the decision, each distance and their aggregate, the likelihood ratio and its verbal equivalent
        (when the verifier is calibrated) and the explanation figure. A bad upload (not an image, a blank scan,
        an image too large) gets one message on the page. The scans are read as the command line reads them
        (the page hands their paths to ``explain``). Signatures are biometric data: a request's uploads are
        deleted once it is answered, its figure is sent inline and never written to Gradio's cache, uploads
        never verified are swept within ``PAGE_CACHE_SWEEP``, and Gradio's analytics are off. Serve it on this
        machine only, ``page.launch(server_name="127.0.0.1")`` (as ``finetune.py serve`` does); Gradio's
        ``share=True`` (its default in Colab) puts the page on a public link.

        Raises:
            ModuleNotFoundError: gradio is not installed.
        """
        try:
            import gradio as gr
        except ModuleNotFoundError as error:
            raise ModuleNotFoundError(f"Verifier.page() needs gradio: {PAGE_INSTALL}", name="gradio") from error

        def check(references: list[str] | None, query: str | None) -> tuple[str, str, None, None]:
            return *_page_check(self, references or [], query), None, None  # the inputs emptied: their files are gone

        with gr.Blocks(title=title, analytics_enabled=False, delete_cache=PAGE_CACHE_SWEEP) as page:
            gr.Markdown(f"## {html.escape(title)}\n"
                        f"Genuine when the {self.aggregate} distance to the references is at or below "
                        f"{self.threshold:.4g} ({html.escape(self.threshold_source)}). The scans are deleted "
                        "from this server as soon as the check is answered.")
            with gr.Row():
                references = gr.File(label="Reference scans: genuine signatures of the claimed writer",
                                     file_count="multiple", elem_id="references")
                query = gr.File(label="Query scan: the signature to check", elem_id="query")
            verify = gr.Button("Verify", variant="primary", elem_id="verify")
            result = gr.HTML(elem_id="decision")
            figure = gr.HTML(elem_id="explanation")
            verify.click(check, [references, query], [result, figure, references, query])
        return page

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
        decision = Decision(distances.tolist(), distance, self.threshold, distance <= self.threshold)
        if self.calibration is None:
            return decision
        log_lr = float(self.calibration.log_lrs([distance])[0])
        lr = math.exp(log_lr)
        return decision._replace(likelihood_ratio=lr, log10_likelihood_ratio=log_lr / math.log(10),
                                 verbal_equivalent=verbal_equivalent(lr))


def _check_aggregate(aggregate: str) -> None:
    if aggregate not in AGGREGATES:
        raise InputError(f"{option('aggregate')} must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")


# --------------------------------------------------------------------------- the page (Verifier.page)

PAGE_INSTALL = "pip install -e '.[app]' (or pip install 'gradio>=6,<7')"
# Gradio's sweep of its upload cache, (every, older than) in seconds: it catches uploads no request used
# (a page closed before Verify); what a request used is deleted as soon as it is answered.
PAGE_CACHE_SWEEP = (300, 900)


def _page_check(verifier: Verifier, references: Sequence[str], query: str | None) -> tuple[str, str]:
    """``(decision HTML, figure HTML)`` of one press of Verify (a bad upload's message instead of a decision);
    the uploaded files are deleted before it returns."""
    try:
        return _page_answer(verifier, references, query)
    finally:
        _delete_uploads([*references, *([query] if query else [])])


def _page_answer(verifier: Verifier, references: Sequence[str], query: str | None) -> tuple[str, str]:
    if not references or not query:
        return _page_paragraph("Drop one or more reference scans of the claimed writer and the query scan, then "
                               "press Verify."), ""
    with tempfile.TemporaryDirectory(prefix="verification-page-") as folder:
        figure = Path(folder) / "explanation.png"
        try:
            decision, _ = verifier.explain(query, references=references, figure=figure)
        except (InputError, OSError) as error:  # the upload's fault; anything else is a bug, for the server's log
            message = " ".join(str(error).split())
            for path in [*references, query]:  # name the file as the user knows it, not its place on the server
                message = message.replace(str(path), Path(path).name)
            return _page_paragraph(f"Cannot verify: {message}", role="alert"), ""
        image = base64.b64encode(figure.read_bytes()).decode("ascii")
    names = [Path(path).name for path in references]
    alt = f"why: {Path(query).name} against its closest reference"
    return (_decision_html(decision, verifier, names),
            f'<img src="data:image/png;base64,{image}" alt="{html.escape(alt)}" style="max-width: 100%">')


def _decision_html(decision: Decision, verifier: Verifier, reference_names: Sequence[str]) -> str:
    """The decision, the aggregate against the threshold, the likelihood ratio (a calibrated verifier's) and each
    reference's distance, as HTML."""
    verdict, colour = ("GENUINE", "#1a7f37") if decision.genuine else ("FORGED", "#b42318")
    count = len(decision.distances)
    aggregate = f"{verifier.aggregate} distance" if count > 1 else "distance"
    side = "at or below" if decision.genuine else "above"
    parts = [f'<h2 style="color: {colour}">{verdict}</h2>',
             f"<p>The {aggregate} {decision.distance:.4g} is {side} the threshold {decision.threshold:.4g} "
             f"({html.escape(verifier.threshold_source)}).</p>"]
    if decision.likelihood_ratio is not None:  # a calibrated verifier
        parts.append(f"<p>Likelihood ratio {decision.likelihood_ratio:.3g} (log10 {decision.log10_likelihood_ratio:+.2f}): "
                     f"{html.escape(str(decision.verbal_equivalent))}"
                     + (f" (the calibration was fitted on single pairs: for the {aggregate} of {count} references "
                        "it is an approximation)" if count > 1 else "") + ".</p>")
    rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{distance:.4g}</td></tr>"
                   for name, distance in zip(reference_names, decision.distances))
    parts.append(f"<table><tr><th>reference</th><th>distance</th></tr>{rows}</table>")
    parts.append("<p>The scans were deleted from the server; drop them again for another check.</p>")
    return "\n".join(parts)


def _page_paragraph(text: str, role: str = "status") -> str:
    return f'<p role="{role}">{html.escape(text)}</p>'


def _delete_uploads(paths: Sequence[str]) -> None:
    """Delete uploaded files and the folders Gradio made for them (each upload has its own, named by a hash)."""
    for path in map(Path, paths):
        path.unlink(missing_ok=True)
        try:
            path.parent.rmdir()
        except OSError:  # not empty: another upload with the same content is still in use
            pass
