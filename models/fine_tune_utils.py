"""Which parameters of ``ViT_for_OSV_DSNet`` train, and the modes that stay frozen.

Head-only fine-tuning trains ``head_str`` (``Linear(384, 96)``, 36,960
parameters) and nothing else. Freezing a parameter is not enough to freeze a
module: BatchNorm layers update their running statistics in training mode,
and dropout draws noise, and every training loop calls ``model.train()`` at
the start of an epoch, which undoes a one-off ``.eval()`` on them.
``FrozenModulesStayInEval`` (a base class of ``ViT_for_OSV_DSNet``) therefore
overrides ``train`` to put every fully frozen sub-module back into eval mode
each time. The frozen part is read from ``requires_grad`` at every call, so
it follows ``unfreeze_last_blocks``; and being the class's method, it
survives pickling and ``copy.deepcopy``.

Typical use::

    setup_head_only_finetune(model)
    groups = unfreeze_last_blocks(model, 2, lr_blocks=1e-5)   # optional, partial fine-tuning
    groups = train_whole_model(model, lr_backbone=1e-4)         # or: every parameter
    optimizer = build_optimizer_for_head_only(model, lr_head=1e-4, param_groups=groups)
    print_trainable_params(model)
"""
from __future__ import annotations

import types
from collections.abc import Iterable
from typing import Any

import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from models.weights import weights_fingerprint  # re-exported: users import it from here

__all__ = [
    "FrozenModulesStayInEval",
    "setup_head_only_finetune",
    "keep_frozen_modules_in_eval",
    "print_trainable_params",
    "build_optimizer_for_head_only",
    "unfreeze_last_blocks",
    "train_whole_model",
    "backbone_blocks",
    "weights_fingerprint",
]


def _put_frozen_modules_in_eval(module: nn.Module) -> None:
    """Set to eval every sub-module that holds parameters or buffers, none of them trainable.

    A sub-module with neither (activation, dropout, loss) keeps its parent's mode.
    """
    for child in module.children():
        parameters = list(child.parameters())
        if any(parameter.requires_grad for parameter in parameters):
            _put_frozen_modules_in_eval(child)
        elif parameters or next(child.buffers(), None) is not None:
            child.eval()


class FrozenModulesStayInEval(nn.Module):
    """A module whose ``train()`` leaves its fully frozen sub-modules in eval mode.

    The module itself still switches mode (``ViT_for_OSV_DSNet`` picks its
    Sinkhorn epsilon from ``self.training``); a model with every parameter
    trainable behaves exactly as a plain ``nn.Module``.
    """

    def train(self, mode: bool = True) -> FrozenModulesStayInEval:
        super().train(mode)
        if mode:
            _put_frozen_modules_in_eval(self)
        return self


def _train_keeping_frozen_modules_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    nn.Module.train(self, mode)
    if mode:
        _put_frozen_modules_in_eval(self)
    return self


def keep_frozen_modules_in_eval(model: nn.Module) -> nn.Module:
    """Put ``model``'s fully frozen sub-modules in eval mode, now and on every later ``model.train()``.

    ``ViT_for_OSV_DSNet`` (a ``FrozenModulesStayInEval``) does this by its
    class; any other model gets ``train`` replaced on the instance, which a
    pickled copy does not keep. Returns ``model``.
    """
    if not isinstance(model, FrozenModulesStayInEval):
        model.train = types.MethodType(_train_keeping_frozen_modules_in_eval, model)
    model.train(model.training)
    return model


def setup_head_only_finetune(model: nn.Module) -> nn.Module:
    """Freeze everything but ``head_str``; the frozen part stays in eval mode through ``model.train()``.

    Returns ``model`` (same object), in its current train/eval mode.

    Raises:
        ValueError: the model has no ``head_str`` (built with ``emd=False``).
    """
    head = getattr(model, "head_str", None)
    if not isinstance(head, nn.Module):
        raise ValueError(
            "head-only fine-tuning trains head_str, and this model has none: build it with emd=True"
        )
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in head.parameters():
        parameter.requires_grad_(True)
    return keep_frozen_modules_in_eval(model)


def backbone_blocks(model: nn.Module) -> list[nn.Module]:
    """The backbone's transformer blocks in order, stage 1 to 4 (18 for DSNet)."""
    backbone = getattr(model, "model", None)
    blocks: list[nn.Module] = []
    stage = 1
    while backbone is not None and isinstance(getattr(backbone, f"blocks{stage}", None), nn.Sequential):
        blocks.extend(getattr(backbone, f"blocks{stage}"))
        stage += 1
    if not blocks:
        raise ValueError("the model has no backbone 'model' with stages blocks1, blocks2, ...")
    return blocks


def unfreeze_last_blocks(model: nn.Module, n: int, lr_blocks: float = 1e-5) -> list[dict[str, Any]]:
    """Make the backbone's last ``n`` blocks and its final norm trainable; return their optimizer parameter groups.

    The final norm (``model.model.norm``, LayerNorm 384) comes with them
    because it sits between the last block and the global distance. Pass the
    returned groups to ``build_optimizer_for_head_only(param_groups=...)``;
    their learning rate is ``lr_blocks``. BatchNorm layers stay frozen: DSNet
    has them only in its patch embeddings, which ``n`` blocks never include.

    Raises:
        ValueError: ``n`` outside ``1 .. number of blocks``.
    """
    blocks = backbone_blocks(model)
    if not 1 <= n <= len(blocks):
        raise ValueError(f"n must be between 1 and {len(blocks)} (the backbone's blocks), got {n}")
    modules = blocks[-n:] + [model.model.norm]
    parameters = [parameter for module in modules for parameter in module.parameters()]
    for parameter in parameters:
        parameter.requires_grad_(True)
    model.train(model.training)  # the newly trainable blocks take the model's mode
    return [{"params": parameters, "lr": lr_blocks, "name": f"backbone_last_{n}_blocks"}]


def train_whole_model(model: nn.Module, lr_backbone: float = 1e-4) -> list[dict[str, Any]]:
    """Make every parameter trainable; return the optimizer parameter group of all but ``head_str``.

    Patch embeddings and their BatchNorms train too, and with nothing frozen
    the BatchNorms stay in train mode under ``model.train()``: their running
    statistics follow the training images (and are saved with the weights).
    Pass the returned group to ``build_optimizer_for_head_only(param_groups=...)``;
    its learning rate is ``lr_backbone``.
    """
    head = getattr(model, "head_str", None)
    head_ids = {id(parameter) for parameter in head.parameters()} if isinstance(head, nn.Module) else set()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    model.train(model.training)
    parameters = [parameter for parameter in model.parameters() if id(parameter) not in head_ids]
    return [{"params": parameters, "lr": lr_backbone, "name": "backbone"}]


def print_trainable_params(model: nn.Module) -> dict[str, int]:
    """Print trainable against total parameters, overall and per top-level sub-module; return the two totals.

    Returns ``{"trainable": int, "total": int}`` (counts of scalars).
    """
    total = sum(parameter.numel() for parameter in model.parameters())
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)")
    for name, child in model.named_children():
        child_total = sum(parameter.numel() for parameter in child.parameters())
        if child_total:
            child_trainable = sum(parameter.numel() for parameter in child.parameters() if parameter.requires_grad)
            print(f"  {name:<10} {child_trainable:>12,} of {child_total:>12,}")
    return {"trainable": trainable, "total": total}


def build_optimizer_for_head_only(
    model: nn.Module,
    lr_head: float = 1e-4,
    weight_decay: float = 1e-4,
    param_groups: Iterable[dict[str, Any]] = (),
) -> torch.optim.AdamW:
    """AdamW over ``head_str`` (learning rate ``lr_head``), plus any ``param_groups`` (e.g. ``unfreeze_last_blocks``).

    Weight decay follows timm's ``param_groups_weight_decay``: biases and
    other 1-D parameters (LayerNorm weights, ``layer_scale``) get none, so
    each learning-rate group becomes a decayed group named as given and a
    ``"<name> (no weight decay)"`` group, in that order (``param_groups[0]``
    is ``head_str.weight``'s). Every trainable parameter of the model must be
    in exactly one given group, so a parameter unfrozen but left out of the
    optimizer is an error, not a silent no-op.

    Raises:
        ValueError: no trainable ``head_str``, or trainable parameters the groups miss.
    """
    head = getattr(model, "head_str", None)
    if not isinstance(head, nn.Module) or not all(parameter.requires_grad for parameter in head.parameters()):
        raise ValueError("head_str is missing or frozen: call setup_head_only_finetune(model) first")
    lr_groups = [{"params": list(head.parameters()), "lr": lr_head, "name": "head_str"}]
    lr_groups += [dict(group) for group in param_groups]
    in_groups = {id(parameter) for group in lr_groups for parameter in group["params"]}
    left_out = [name for name, parameter in model.named_parameters()
                if parameter.requires_grad and id(parameter) not in in_groups]
    if left_out:
        raise ValueError(
            f"{len(left_out)} trainable parameters are in no optimizer group (first: {left_out[:3]}); "
            "pass the groups returned by unfreeze_last_blocks as param_groups"
        )
    # Only timm's split is used here, so any non-zero decay will do; 0 would put everything in one group.
    undecayed = {id(parameter) for group in param_groups_weight_decay(model, 1.0) if group["weight_decay"] == 0
                 for parameter in group["params"]}
    groups = []
    for group in lr_groups:
        for decayed, decay, suffix in ((True, weight_decay, ""), (False, 0.0, " (no weight decay)")):
            members = [parameter for parameter in group["params"] if (id(parameter) not in undecayed) == decayed]
            if members:
                groups.append({**group, "params": members, "weight_decay": decay, "name": group["name"] + suffix})
    return torch.optim.AdamW(groups, lr=lr_head, weight_decay=weight_decay)
