"""Model zoo. Input channels, image size and class count come from the dataset.

* ``mlp`` — fully connected, configurable ``hidden`` sizes (``lenet300`` = [300, 100]).
* ``lenet5`` — LeCun et al. 1998 as commonly used on MNIST: conv 6@5×5 (padding 2),
  pool, conv 16@5×5, pool, fc 120 → 84.
* ``simple_cnn`` — the classic small CIFAR net: conv 6@5×5, pool, conv 16@5×5, pool,
  fc 120 → 84 (no padding).
* ``vgg`` — a small VGG-style net with batch norm: ``widths`` with ``"M"`` for max pooling,
  then global average pooling and one linear classifier.
* ``resnet20`` — He et al. 2016's CIFAR ResNet (3 stages × 3 basic blocks, 16/32/64
  channels, option-A identity shortcuts with zero-padded channels).
* ``custom`` — the user's own network: ``model._target_`` names any callable that returns
  an ``nn.Module`` (Hydra's ``instantiate`` convention); the node's other keys are its
  keyword arguments (:func:`build_custom`).

Any of them can start from trained weights (``model.checkpoint``, :func:`start_model`).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dtp_search.errors import ConfigError
from dtp_search.pruning.layers import ChannelPadShortcut
from dtp_search.settings import ModelSettings, from_mapping
from dtp_search.targets import locate

MODELS = ("mlp", "lenet5", "simple_cnn", "vgg", "resnet20")  # the built-in networks


class MLP(nn.Module):
    def __init__(
        self, in_features: int, num_classes: int, hidden: Sequence[int] = (300, 100)
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        prev = in_features
        for h in hidden:
            layers += [nn.Linear(prev, int(h)), nn.ReLU(inplace=True)]
            prev = int(h)
        layers.append(nn.Linear(prev, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _flat_size(features: nn.Module, in_shape: tuple[int, int, int], model: str) -> int:
    with torch.no_grad():
        try:
            out = features(torch.zeros(1, *in_shape))
        except RuntimeError as exc:
            raise ValueError(
                f"model={model} cannot take {in_shape[1]}×{in_shape[2]} inputs "
                f"({exc}); raise model.padding or pick model=mlp/resnet20/vgg"
            ) from exc
    return out.numel()


class LeNetStyle(nn.Module):
    """conv(c1, k) → ReLU → maxpool 2 → conv(c2, k) → ReLU → maxpool 2 → fc → fc → classifier."""

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        num_classes: int,
        *,
        conv: Sequence[int] = (6, 16),
        fc: Sequence[int] = (120, 84),
        kernel_size: int = 5,
        padding: Sequence[int] = (0, 0),
        name: str = "simple_cnn",
    ) -> None:
        super().__init__()
        c1, c2 = (int(c) for c in conv)
        p1, p2 = (int(p) for p in padding)
        self.features = nn.Sequential(
            nn.Conv2d(in_shape[0], c1, kernel_size, padding=p1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, kernel_size, padding=p2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        prev = _flat_size(self.features, in_shape, name)
        layers: list[nn.Module] = []
        for h in fc:
            layers += [nn.Linear(prev, int(h)), nn.ReLU(inplace=True)]
            prev = int(h)
        layers.append(nn.Linear(prev, num_classes))
        self.classifier = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class VGG(nn.Module):
    """Conv3×3-BN-ReLU blocks (``"M"`` = 2×2 max pool), global average pool, linear classifier."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        widths: Sequence[int | str] = (32, 32, "M", 64, 64, "M", 128, 128, "M"),
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for w in widths:
            if w == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [
                    nn.Conv2d(prev, int(w), 3, padding=1, bias=False),
                    nn.BatchNorm2d(int(w)),
                    nn.ReLU(inplace=True),
                ]
                prev = int(w)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with an identity shortcut (option A: stride-2 subsample + zero
    channels, :class:`ChannelPadShortcut`)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        pad = planes - in_planes
        self.shortcut: nn.Module = (
            nn.Identity()
            if stride == 1 and pad == 0
            else ChannelPadShortcut(stride, pad // 2, pad - pad // 2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet-(6n+2) for CIFAR (He et al. 2016, §4.2); n=3 gives ResNet-20 (0.27 M parameters)."""

    def __init__(
        self, in_channels: int, num_classes: int, n: int = 3, widths: Sequence[int] = (16, 32, 64)
    ) -> None:
        super().__init__()
        w0 = int(widths[0])
        self.conv1 = nn.Conv2d(in_channels, w0, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w0)
        stages, prev = [], w0
        for i, w in enumerate(widths):
            blocks = [BasicBlock(prev, int(w), stride=1 if i == 0 else 2)]
            blocks += [BasicBlock(int(w), int(w)) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            prev = int(w)
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(prev, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


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
    raise ValueError(f"model.arch={arch!r} is not supported; allowed: {[*MODELS, 'custom']}")


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


# ---------------------------------------------------------------------- the user's network


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


# ---------------------------------------------------------------------- trained weights


def checkpoint_digest(path: str | Path) -> str:
    """SHA-1 of the checkpoint file's bytes (part of a study's definition)."""
    return _digest(*_file_key(path))


def _file_key(path: str | Path) -> tuple[str, int, int]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(
            f"model.checkpoint={str(path)!r} does not exist; allowed: a file "
            "written by torch.save(model.state_dict(), path)"
        )
    st = p.stat()
    return str(p.resolve()), st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=4)
def _digest(path: str, mtime_ns: int, size: int) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` stored at ``path``: the file itself, or a dict holding it under
    ``state_dict`` or ``model`` (as training scripts and Lightning save them); a
    ``module.`` prefix (``DataParallel``) is dropped. Read with ``weights_only=True``, so
    no code in the file runs. Cached per file (path, modification time, size): every
    fold of every trial starts from it."""
    return _load(*_file_key(path))


@functools.lru_cache(maxsize=2)
def _load(path: str, mtime_ns: int, size: int) -> dict[str, torch.Tensor]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(
            f"model.checkpoint={path!r} cannot be read with torch.load("
            f"weights_only=True) ({first[:200]}); allowed: a state_dict saved "
            "with torch.save"
        ) from exc
    state = blob
    if isinstance(blob, Mapping) and not _is_state(blob):
        for key in ("state_dict", "model"):
            if isinstance(blob.get(key), Mapping) and _is_state(blob[key]):
                state = blob[key]
                break
    if not isinstance(state, Mapping) or not _is_state(state):
        keys = list(blob)[:5] if isinstance(blob, Mapping) else type(blob).__name__
        raise ConfigError(
            f"model.checkpoint={path!r} holds no state_dict (found {keys}); "
            "allowed: a state_dict, or a dict holding one under 'state_dict' "
            "or 'model'"
        )
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _is_state(d: Mapping[str, Any]) -> bool:
    return bool(d) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


def apply_checkpoint(model: nn.Module, state: Mapping[str, torch.Tensor], path: str) -> None:
    """Load ``state`` into ``model``, refusing (:class:`ConfigError`) missing or unexpected
    keys and shape mismatches, with the first few names of each."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {list(state[k].shape)} vs {list(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    problems = []
    for what, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches (checkpoint vs network)", shapes),
    ):
        if items:
            more = f" and {len(items) - 3} more" if len(items) > 3 else ""
            problems.append(f"{len(items)} {what}: {', '.join(items[:3])}{more}")
    if problems:
        raise ConfigError(
            f"model.checkpoint={path!r} does not fit the network ("
            f"{'; '.join(problems)}); allowed: a state_dict of this very network"
        )
    model.load_state_dict(state)


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value
