"""The network a trial starts from: a built-in architecture (:mod:`~dtp_search.models.zoo`)
or the user's own (:mod:`~dtp_search.models.user`), picked by ``model.arch``, then the
trained weights of ``model.checkpoint`` (:mod:`~dtp_search.models.weights`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from dtp_search.models.user import build_custom
from dtp_search.models.weights import apply_checkpoint, load_checkpoint
from dtp_search.models.zoo import MLP, VGG, LeNetStyle, ResNetCifar
from dtp_search.settings import MODEL_ARCHS, ModelSettings, from_mapping


def build_model(
    settings: ModelSettings | Mapping[str, Any], in_shape: Sequence[int], num_classes: int
) -> nn.Module:
    """Build the model the ``model`` settings describe (``arch`` picks the class; a
    mapping of some keys is read as :class:`~dtp_search.settings.ModelSettings`), with
    freshly initialised weights (:func:`start_model` adds ``model.checkpoint``)."""
    cfg = from_mapping(ModelSettings, settings, "model")
    c, h, w = (int(s) for s in in_shape)
    arch = cfg.arch
    if arch == "custom":
        return build_custom(cfg, num_classes)
    if arch == "mlp":
        return MLP(c * h * w, num_classes, hidden=list(_or(cfg.hidden, (300, 100))))
    if arch in ("lenet5", "simple_cnn"):
        default_pad = (2, 0) if arch == "lenet5" else (0, 0)
        return LeNetStyle(
            (c, h, w),
            num_classes,
            conv=list(_or(cfg.conv, (6, 16))),
            fc=list(_or(cfg.fc, (120, 84))),
            kernel_size=int(_or(cfg.kernel_size, 5)),
            padding=list(cfg.padding or default_pad),
            name=arch,
        )
    if arch == "vgg":
        return VGG(c, num_classes, widths=list(cfg.widths))
    if arch == "resnet20":
        return ResNetCifar(
            c, num_classes, n=int(_or(cfg.depth_n, 3)), widths=list(_or(cfg.widths, (16, 32, 64)))
        )
    raise ValueError(f"model.arch={arch!r} is not supported; allowed: {list(MODEL_ARCHS)}")


def start_model(
    settings: ModelSettings | Mapping[str, Any], in_shape: Sequence[int], num_classes: int
) -> nn.Module:
    """The network a trial (and the refit) starts from: :func:`build_model`, then the
    trained weights of ``model.checkpoint`` when it is set (:func:`load_checkpoint`)."""
    cfg = from_mapping(ModelSettings, settings, "model")
    model = build_model(cfg, in_shape, num_classes)
    if cfg.checkpoint:
        apply_checkpoint(model, load_checkpoint(cfg.checkpoint), cfg.checkpoint)
    return model


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value
