"""The user's own network (``model.arch=custom``): ``model._target_`` names any callable
that returns an ``nn.Module`` (Hydra's ``instantiate`` convention); the node's other keys
are its keyword arguments (:func:`build_custom`). :func:`check_output` checks that it
fits the dataset."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from dtp_search.errors import ConfigError
from dtp_search.settings import ModelSettings, from_mapping
from dtp_search.targets import locate


def _takes_num_classes(factory: Callable[..., Any]) -> tuple[bool, bool]:
    """``(named, via **kwargs)``: whether ``factory`` has a ``num_classes`` parameter, or
    takes arbitrary keyword arguments (torchvision's builders pass them to the class)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # a builtin or C extension without a signature
        return False, False
    named = any(p.name == "num_classes" for p in params)
    return named, not named and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def build_custom(settings: ModelSettings | Mapping[str, Any], num_classes: int) -> nn.Module:
    """The user's network: ``model._target_(**model.args)``.

    ``num_classes`` (the dataset's class count) is added to the arguments when the
    factory takes it and the config does not set it: when it names the parameter, or
    when it takes ``**kwargs`` (``torchvision.models.resnet18``), in which case a
    ``TypeError`` about ``num_classes`` makes it retry without. Raises
    :class:`ConfigError` for a target that cannot be imported, a factory that raises, and
    one that returns no ``nn.Module``.
    """
    cfg = from_mapping(ModelSettings, settings, "model")
    target = str(cfg._target_)
    factory = locate(target, "model._target_")
    if not callable(factory):
        raise ConfigError(
            f"model._target_={target!r} is a {type(factory).__name__}, not a "
            "callable; allowed: a class or function that returns an nn.Module"
        )
    kwargs = dict(cfg.args)
    named, via_kwargs = _takes_num_classes(factory)
    added = "num_classes" not in kwargs and (named or via_kwargs)
    if added:
        kwargs["num_classes"] = int(num_classes)
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        if not (added and via_kwargs and "num_classes" in str(exc)):
            raise _factory_failed(target, exc) from exc
        kwargs.pop("num_classes")
        try:
            model = factory(**kwargs)
        except Exception as exc2:
            raise _factory_failed(target, exc2) from exc2
    except Exception as exc:
        raise _factory_failed(target, exc) from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model._target_={target!r} returned a {type(model).__name__}; "
            "allowed: a callable that returns an nn.Module"
        )
    return model


def _factory_failed(target: str, exc: BaseException) -> ConfigError:
    text = " ".join(str(exc).split()) or "no message"
    return ConfigError(f"model._target_={target!r} raised {type(exc).__name__}: {text}")


def check_output(model: nn.Module, x: torch.Tensor, num_classes: int) -> None:
    """Run one batch ``x`` through ``model`` (eval mode, no gradients) and raise
    :class:`ConfigError` unless the output is logits of shape ``[batch, num_classes]``."""
    batch = [int(d) for d in x.shape]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:
        text = " ".join(str(exc).split())[:300]
        raise ConfigError(
            f"model: the network cannot take the dataset's input batch of "
            f"shape {batch} ({type(exc).__name__}: {text})"
        ) from exc
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise ConfigError(
            f"model: the network returns a {type(out).__name__} for an input "
            f"batch of shape {batch}; allowed: a tensor of shape [batch, "
            f"num_classes] = {[batch[0], int(num_classes)]}"
        )
    if list(out.shape) != [batch[0], int(num_classes)]:
        raise ConfigError(
            f"model: the network's output has shape {list(out.shape)} for an "
            f"input batch of shape {batch}; allowed: [batch, num_classes] = "
            f"{[batch[0], int(num_classes)]} (the dataset has {num_classes} "
            "classes: set the network's class count, e.g. +model.num_classes="
            f"{num_classes})"
        )
