"""DetailSemNet for offline signature verification: the siamese wrapper and checkpoint loading.

``ViT_for_OSV_DSNet`` compares a reference and a query signature::

    distance = global_distance + temp * structural_distance

The global distance compares the mean of the backbone's final-norm tokens;
the structural distance is an entropic EMD between the ink-holding stage-4
tokens of the two images, projected by ``head_str``. Smaller is more likely
genuine. The state dict is the authors' (445 keys), so their checkpoints load
with ``strict=True``.

The forward pass is split into ``embed`` (the backbone, per image) and
``compare`` (everything after it, per pair) so that a frozen backbone's
features can be computed once per image and reused for every pair.
``explain`` opens one pair's distance up: the transport plan says which
reference token each query token was matched to, and what that cost.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models import adapt_input_conv
from torch import nn

from models.dsnet.dsnet import DSNet
from models.emd import pack_valid, pairwise_cost, sinkhorn_emd, sinkhorn_plan, unit_rows
from models.errors import InputError
from models.fine_tune_utils import FrozenModulesStayInEval
from models.loss import ContrastiveLoss
from models.weights import CheckpointError, CheckpointMismatchError, load_state_dict_checked, read_torch_file

__all__ = [
    "ViT_for_OSV_DSNet",
    "TokenFeatures",
    "Explanation",
    "CheckpointMismatchError",
    "load_pretrained",
    "init_from",
    "WeightTransfer",
    "read_model_options",
    "MODEL_DEFAULTS",
]

MODEL_DEFAULTS: dict[str, Any] = {"emd": True, "dis_type": "cos", "mar_type": "uniform", "gol_dis": "l2", "temp": 1.0}
SINKHORN_EPS_TRAIN = 5e-2
SINKHORN_EPS_EVAL = 5e-8
# Iterations between the checks which pairs have stopped, in training: at eps 5e-2 pairs of real scans' features
# stop after 8 to 100 iterations, and each check costs a host sync and ~40 small operations (2 is the evaluation's:
# its pairs stop after 2). The result does not depend on it.
SINKHORN_CHECK_EVERY_TRAIN = 8
# A token is kept when its area-averaged ink is this far above the image's minimum.
KEPT_TOKEN_MARGIN = 1e-5


def read_model_options(opt: Any = None) -> dict[str, Any]:
    """The model options from an argparse Namespace, a dict, a dataclass or ``None``.

    Missing options take ``MODEL_DEFAULTS``; unknown values raise ``ValueError``.
    """
    if opt is None:
        opt = {}
    if isinstance(opt, Mapping):
        options = {name: opt.get(name, default) for name, default in MODEL_DEFAULTS.items()}
    else:
        options = {name: getattr(opt, name, default) for name, default in MODEL_DEFAULTS.items()}
    options["emd"] = bool(options["emd"])
    options["temp"] = float(options["temp"])
    if options["dis_type"] not in ("cos", "l2"):
        raise InputError(f"dis_type must be 'cos' or 'l2', got {options['dis_type']!r}")
    if options["gol_dis"] not in ("cos", "l2"):
        raise InputError(f"gol_dis must be 'cos' or 'l2', got {options['gol_dis']!r}")
    if options["mar_type"] != "uniform":
        raise InputError(
            f"mar_type {options['mar_type']!r} is not supported: only 'uniform' marginals are. "
            "The original 'different'/'uniform_v2' marginals weigh 14x14 pixel patches against at most "
            "49 stage-4 tokens and fail with a shape error in the authors' code too."
        )
    return options


class TokenFeatures(NamedTuple):
    """What the backbone gives for a batch of images.

    Attributes:
        tokens: ``[B, N, 384]`` stage-4 tokens before the final norm,
            ``N = (H / 32) * (W / 32)`` in row-major order.
        kept: ``[B, N]`` bool, the tokens whose cell holds ink.
    """

    tokens: torch.Tensor
    kept: torch.Tensor

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TokenFeatures:
        """Move to ``device``; ``dtype`` applies to ``tokens`` only."""
        return TokenFeatures(self.tokens.to(device=device, dtype=dtype), self.kept.to(device=device))

    def select(self, index: torch.Tensor | slice | int) -> TokenFeatures:
        """The features of the images at ``index`` (batch dimension)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return TokenFeatures(self.tokens[index], self.kept[index])


class Explanation(NamedTuple):
    """One pair's distance opened up: the transport plan between the ink (kept) tokens of the two images.

    Attributes:
        plan: ``[S2, S1]`` float64, the mass moved from each kept query token (row)
            to each kept reference token (column); each column sums to ``1 / S1``
            (see ``models.emd.sinkhorn_plan``).
        cost: ``[S2, S1]`` float64, the cost of each match (``dis_type`` between
            the tokens projected by ``head_str``).
        ref_positions: ``[S1, 2]`` int64, (row, column) of each kept reference
            token on the token grid; a token covers 32 x 32 input pixels.
        query_positions: ``[S2, 2]`` int64, the same for the query.
        grid: ``(rows, columns)`` of the token grid, ``(H / 32, W / 32)``.
        global_distance: the distance between the mean final-norm tokens.
        structural_distance: ``(plan * cost).sum()``, exactly.
        distance: ``global_distance + temp * structural_distance``, exactly
            (float64; ``forward`` gives the same in float32).
        temp: the weight of the structural distance.
    """

    plan: torch.Tensor
    cost: torch.Tensor
    ref_positions: torch.Tensor
    query_positions: torch.Tensor
    grid: tuple[int, int]
    global_distance: float
    structural_distance: float
    distance: float
    temp: float


class ViT_for_OSV_DSNet(FrozenModulesStayInEval):  # noqa: N801 - the authors' public name
    """Siamese DetailSemNet.

    Args:
        opt: options as an argparse Namespace, dict or dataclass (see
            ``read_model_options``): ``emd`` (add the structural distance and
            ``head_str``), ``dis_type`` (``cos``/``l2`` token cost for the
            EMD), ``mar_type`` (``uniform``), ``gol_dis`` (``l2``/``cos``
            global distance), ``temp`` (weight of the structural distance).

    Input images are ``[B, 1, H, W]`` in ``[0, 1]`` with bright ink on black,
    ``H`` and ``W`` multiples of 32 (224 for the authors' checkpoints).
    ``train()`` leaves fully frozen sub-modules (BatchNorm included) in eval
    mode (``FrozenModulesStayInEval``); with nothing frozen it is ``nn.Module.train``.
    """

    def __init__(self, opt: Any = None) -> None:
        super().__init__()
        options = read_model_options(opt)
        self.emd = options["emd"]
        self.dis_type = options["dis_type"]
        self.gol_dis = options["gol_dis"]
        self.temp = options["temp"]
        self.model = DSNet(in_chans=1)
        if self.emd:
            self.head_str = nn.Linear(self.model.num_features, 96)
            trunc_normal_(self.head_str.weight, std=0.02)
            nn.init.zeros_(self.head_str.bias)
        self.loss_fn = ContrastiveLoss(margin=0.9, margin_1=0.3)
        self.pdist = nn.PairwiseDistance(p=2, keepdim=True)
        # State-dict keys set from data rather than by the seed (models/data_init.py); checkpoints hold them.
        self.keys_from_data: tuple[str, ...] = ()

    def embed(self, images: torch.Tensor) -> TokenFeatures:
        """Backbone features of ``images [B, 1, H, W]``: tokens ``[B, N, 384]`` and kept mask ``[B, N]``."""
        return self.embed_until(images, self.model.num_blocks)

    def embed_until(self, images: torch.Tensor, block: int) -> TokenFeatures:
        """The backbone's features at the input of block ``block`` (0-17; 18: ``embed``'s stage-4 tokens).

        ``tokens [B, h * w, C]`` on that block's grid (row-major; block 15, stage 4's first: ``[B, N, 384]``,
        the shape of ``embed``'s), ``kept [B, N]`` the stage-4 ink mask. ``embed_from`` finishes the embedding.
        """
        if images.dim() != 4 or images.shape[1] != 1:
            raise ValueError(f"embed expects images of shape [B, 1, H, W], got {list(images.shape)}")
        tokens = self.model.forward_until(images, block).flatten(1, 2)
        grid = (images.shape[-2] // 32, images.shape[-1] // 32)
        ink = F.interpolate(images.float(), size=grid, mode="area").flatten(1)
        kept = ink >= ink.amin(dim=1, keepdim=True) + KEPT_TOKEN_MARGIN
        return TokenFeatures(tokens, kept)

    def embed_from(self, features: TokenFeatures, block: int) -> TokenFeatures:
        """``embed``'s features from ``embed_until(images, block)``'s, for square images."""
        batch, n_tokens, channels = features.tokens.shape
        side = math.isqrt(n_tokens)
        if side * side != n_tokens:
            raise ValueError(f"embed_from needs a square token grid, got {n_tokens} tokens")
        tokens = self.model.forward_from(features.tokens.reshape(batch, side, side, channels), block)
        return TokenFeatures(tokens, features.kept)

    def global_distance(self, ref: TokenFeatures, query: TokenFeatures) -> torch.Tensor:
        """Distance ``[B, 1]`` between the mean final-norm tokens of each pair."""
        ref_mean = self.model.norm(ref.tokens.float()).mean(dim=1)
        query_mean = self.model.norm(query.tokens.float()).mean(dim=1)
        if self.gol_dis == "l2":
            return self.pdist(ref_mean, query_mean)
        return 1 - F.cosine_similarity(ref_mean, query_mean, dim=1).unsqueeze(1)

    def _token_cost(self, ref: TokenFeatures, query: TokenFeatures) -> torch.Tensor:
        """Cost ``[B, N, N]`` (query rows, reference columns) between every pair of tokens after ``head_str``."""
        return pairwise_cost(self.head_str(query.tokens.float()), self.head_str(ref.tokens.float()), self.dis_type)

    def structural_distance(self, ref: TokenFeatures, query: TokenFeatures) -> torch.Tensor:
        """EMD ``[B]`` (float32) between the kept tokens of each pair after ``head_str``; 0 where a side has none.

        Evaluation: the cost ``[B, N, N]`` of the whole token grid (``_token_cost``) and the Sinkhorn in
        float64, the padded implementation's arithmetic: at the evaluation epsilon (5e-8) one float32 ulp of a
        cost moves an exponent by ~1, so the cost is built exactly as it always was.
        Training: ``head_str`` and the cost on the kept tokens alone (``models.emd.pack_valid``), and the
        Sinkhorn in float32 for the ``cos`` cost (in [0, 2]: within ~1e-7 of float64 in distances and ~1e-6
        in ``head_str``'s gradient), in float64 for ``l2`` (unbounded, and slower to converge: float32's
        gradients drift past 1e-5).
        """
        if not self.training:
            return sinkhorn_emd(self._token_cost(ref, query), query.kept, ref.kept, eps=self._sinkhorn_eps(),
                                dtype=torch.float64)
        cos = self.dis_type == "cos"

        def project(tokens: torch.Tensor) -> torch.Tensor:
            # cos: normalised here, on the kept tokens alone, rather than on the padded packs.
            projected = self.head_str(tokens.float())
            return unit_rows(projected) if cos else projected

        query_str, query_kept = pack_valid(query.tokens, query.kept, project)
        ref_str, ref_kept = pack_valid(ref.tokens, ref.kept, project)
        return sinkhorn_emd(pairwise_cost(query_str, ref_str, self.dis_type, unit=cos), query_kept, ref_kept,
                            eps=self._sinkhorn_eps(), dtype=torch.float32 if cos else torch.float64,
                            check_every=SINKHORN_CHECK_EVERY_TRAIN)

    def _sinkhorn_eps(self) -> float:
        return SINKHORN_EPS_TRAIN if self.training else SINKHORN_EPS_EVAL

    def compare(self, ref: TokenFeatures, query: TokenFeatures) -> torch.Tensor:
        """Distance ``[B, 1]`` between reference and query features (smaller = more likely genuine).

        Runs in float32 outside autocast, whatever the features' dtype; the
        Sinkhorn iterations run in float64.
        """
        with torch.autocast(device_type=ref.tokens.device.type, enabled=False):
            distance = self.global_distance(ref, query)
            if self.emd:
                distance = distance + self.temp * self.structural_distance(ref, query).unsqueeze(1)
        return distance

    def explain(self, ref: torch.Tensor, query: torch.Tensor) -> Explanation:
        """The transport plan behind one pair's distance; ``ref``, ``query``: images ``[1, H, W]`` or ``[1, 1, H, W]``.

        Runs in eval mode (the evaluation epsilon), whatever the model's mode,
        and leaves the mode as it was; ``distance`` is the eval-mode ``forward``
        distance of the pair (which ``forward`` rounds to float32).
        """
        images = [image.unsqueeze(0) if image.dim() == 3 else image for image in (ref, query)]
        if any(image.dim() != 4 or image.shape[:2] != (1, 1) for image in images):
            raise ValueError(f"explain takes one pair, images of shape [1, H, W] or [1, 1, H, W]; got "
                             f"{list(ref.shape)} and {list(query.shape)}")
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                grid = (images[1].shape[-2] // 32, images[1].shape[-1] // 32)
                return self.explain_features(self.embed(images[0]), self.embed(images[1]), grid)
        finally:
            self.train(was_training)

    def explain_features(self, ref: TokenFeatures, query: TokenFeatures, grid: tuple[int, int]) -> Explanation:
        """``explain`` from one pair's features (``embed`` of each image) on a token ``grid`` ``(H / 32, W / 32)``,
        in the model's current mode.
        """
        if not self.emd:
            raise ValueError("explain needs the structural distance: this model was built with emd=False")
        if ref.tokens.shape[0] != 1 or query.tokens.shape[0] != 1 or query.tokens.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"explain takes one pair's features on a {grid[0]}x{grid[1]} grid, got tokens "
                             f"{list(ref.tokens.shape)} and {list(query.tokens.shape)}")
        with torch.no_grad(), torch.autocast(device_type=ref.tokens.device.type, enabled=False):
            global_distance = float(self.global_distance(ref, query))
            cost = self._token_cost(ref, query).double()
            plan = sinkhorn_plan(cost, query.kept, ref.kept, eps=self._sinkhorn_eps())
        query_kept, ref_kept = query.kept[0], ref.kept[0]
        plan = plan[0][query_kept][:, ref_kept].cpu()
        cost = cost[0][query_kept][:, ref_kept].cpu()
        structural_distance = float((plan * cost).sum())

        def positions(kept: torch.Tensor) -> torch.Tensor:
            index = kept.nonzero()[:, 0].cpu()
            return torch.stack((index // grid[1], index % grid[1]), dim=1)

        return Explanation(plan, cost, positions(ref_kept), positions(query_kept), grid, global_distance,
                           structural_distance, global_distance + self.temp * structural_distance, self.temp)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x [B, 2, H, W]`` (reference, query), ``y [B, 1]`` (1 genuine) -> ``(distance [B, 1], loss)``.

        ``loss`` is ``None`` when ``y`` is not given.
        """
        if x.dim() != 4 or x.shape[1] != 2:
            raise ValueError(f"forward expects pairs of shape [B, 2, H, W], got {list(x.shape)}")
        distance = self.compare(self.embed(x[:, 0:1]), self.embed(x[:, 1:2]))
        loss = self.loss_fn(distance, y) if y is not None else None
        return distance, loss


_STATE_DICT_WRAPPERS = ("model_state_dict", "state_dict", "model")


def _unwrap_state_dict(checkpoint: Any, source: str) -> dict[str, torch.Tensor]:
    if isinstance(checkpoint, Mapping) and "trained_state_dict" in checkpoint:
        raise CheckpointError(f"{source} is a fine-tuning checkpoint: it holds only the trained tensors, not the whole "
                              "model. Load best_weights.pth of its run folder instead, or use "
                              "training_utils.load_trained_model")
    state = checkpoint
    while isinstance(state, Mapping) and not all(isinstance(value, torch.Tensor) for value in state.values()):
        wrapper = next((key for key in _STATE_DICT_WRAPPERS if isinstance(state.get(key), Mapping)), None)
        if wrapper is None:
            raise CheckpointError(
                f"{source} holds no state dict: expected tensors, or one of the keys "
                f"{', '.join(_STATE_DICT_WRAPPERS)}; found keys {sorted(map(str, state))[:8]}"
            )
        state = state[wrapper]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source} holds a {type(state).__name__}, not a state dict")
    prefix = "module."
    if state and all(key.startswith(prefix) for key in state):
        state = {key[len(prefix):]: value for key, value in state.items()}
    return dict(state)


def load_pretrained(model: nn.Module, path_or_state: str | Path | Mapping[str, Any], strict: bool = True) -> nn.Module:
    """Load weights into ``model`` and return it.

    Args:
        model: the model to fill, usually ``ViT_for_OSV_DSNet``.
        path_or_state: a checkpoint path (read with ``torch.load(weights_only=True)``)
            or an already loaded object. A bare state dict, the wrappers
            ``{'model_state_dict': ...}``, ``{'state_dict': ...}``, ``{'model': ...}``
            and the ``module.`` prefix of DataParallel/DDP are accepted.
        strict: require exactly the model's keys. With ``strict=False``
            missing and unexpected keys are skipped; wrong shapes always fail.

    Raises:
        FileNotFoundError: the path does not exist.
        models.weights.CheckpointError: the file is not a safe, readable checkpoint, or holds no state dict.
        CheckpointMismatchError: keys or shapes differ (the message lists them).
    """
    source = str(path_or_state) if isinstance(path_or_state, (str, Path)) else "the given checkpoint"
    checkpoint = read_torch_file(path_or_state) if isinstance(path_or_state, (str, Path)) else path_or_state
    return load_state_dict_checked(model, _unwrap_state_dict(checkpoint, source), strict=strict, source=source)


class WeightTransfer(NamedTuple):
    """What ``init_from`` did, tensor by tensor (the model's state-dict names, except ``skipped``: the source's).

    Attributes:
        loaded: copied as they were (name and shape match).
        adapted: first convolutions taken from 3 input channels to the model's 1 (summed over RGB).
        skipped: the source's tensors that fit nowhere (no such name, or another shape), with their shapes.
        fresh: the model's tensors nothing was loaded into: they keep their new initialisation.
    """

    loaded: list[str]
    adapted: list[str]
    skipped: list[tuple[str, tuple[int, ...]]]
    fresh: list[str]

    def summary(self, source: str) -> str:
        """One line a user can read: the counts, and the first names of what was adapted, skipped and left fresh."""
        def names(items: Sequence[str], limit: int = 4) -> str:
            shown = ", ".join(items[:limit])
            return f" ({shown}{', ...' if len(items) > limit else ''})" if items else ""

        skipped = [f"{name} {list(shape)}" for name, shape in self.skipped]
        return (f"weights from {source}: {len(self.loaded)} tensors loaded, {len(self.adapted)} adapted to 1 input "
                f"channel{names(self.adapted)}, {len(self.skipped)} skipped{names(skipped)}, {len(self.fresh)} left "
                f"fresh{names(self.fresh)}")


def init_from(model: nn.Module, path_or_state: str | Path | Mapping[str, Any]) -> WeightTransfer:
    """Start ``model`` from any checkpoint: every tensor whose name and shape match is loaded; returns what was done.

    For a backbone checkpoint (an ImageNet classifier, say) names are tried as they are and under the
    siamese model's ``model.`` prefix. A 3-channel first convolution meets the model's 1-channel one through
    timm's ``adapt_input_conv`` (the RGB kernels summed, so a gray image gives what the RGB network gave for
    the same gray in every channel). Everything else in the source is skipped, and the model's tensors that
    got nothing keep their initialisation. Accepts what ``load_pretrained`` accepts (path or object, wrappers,
    the ``module.`` prefix).

    Raises:
        models.weights.CheckpointError: the file is not a safe, readable checkpoint, or holds no state dict.
        CheckpointMismatchError: not one tensor of the source fits the model (the wrong file, most likely).
    """
    source = str(path_or_state) if isinstance(path_or_state, (str, Path)) else "the given checkpoint"
    checkpoint = read_torch_file(path_or_state) if isinstance(path_or_state, (str, Path)) else path_or_state
    state = model.state_dict()
    loaded, adapted, skipped, update = [], [], [], {}
    for name, tensor in _unwrap_state_dict(checkpoint, source).items():
        target = next((key for key in (name, f"model.{name}") if key in state and key not in update), None)
        if target is not None and tensor.shape == state[target].shape:
            update[target] = tensor
            loaded.append(target)
        elif (target is not None and tensor.dim() == 4 and tensor.shape[1] == 3 and state[target].shape[1] == 1
              and tensor.shape[0] == state[target].shape[0] and tensor.shape[2:] == state[target].shape[2:]):
            update[target] = adapt_input_conv(1, tensor)
            adapted.append(target)
        else:
            skipped.append((name, tuple(tensor.shape)))
    if not update:
        raise CheckpointMismatchError(
            f"{source}: none of its {len(skipped)} tensors has a name and shape of this model's (first: "
            f"{', '.join(name for name, _ in skipped[:3])}); it is not a DSNet or DetailSemNet checkpoint")
    model.load_state_dict({**state, **{key: value.to(state[key].dtype) for key, value in update.items()}})
    return WeightTransfer(loaded, adapted, skipped, [key for key in state if key not in update])
