"""Knowledge distillation from the dense network (``train.distill``; Hinton, Vinyals &
Dean 2015, "Distilling the knowledge in a neural network").

With the student's logits s, the teacher's logits t, the labels y, the weight α and the
temperature T the loss of a batch is

    L = (1 − α) · CE(s, y) + α · T² · KL(softmax(t/T) ‖ softmax(s/T)),

KL averaged over the batch. The factor T² keeps the soft term's gradient on the scale
of the hard term's as T changes (the soft gradients scale as 1/T²). CE is the fold's own
cross-entropy (with ``train.label_smoothing``).

The teacher is ``train.distill.teacher`` where one is given (a ``state_dict`` of the same
network, e.g. the dense network trained once by hand: :func:`load_teacher`), else, with
``train.distill.teacher_epochs`` ≥ 1, the fold's starting network trained dense for that
many epochs before the student (:mod:`dtp_search.training.teacher`), else the
fold's dense network as it stands when pruning begins: the end of the policy's dense
epochs (the dense warm start, shared between trials through its cache), or, when the
policy prunes from the first step, the network it starts from — ``model.checkpoint``,
the user's trained weights. Either way distillation starts with the first epoch after
the dense ones: the dense warm-up trains on the labels alone, so that its cached state
serves distilled and plain trials alike. Without either there is no trained
dense network to learn from, and the search refuses
that configuration before any training (:func:`check_teacher`): distilling from a
randomly initialised network would only pull the student towards noise.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dtp_search.errors import ConfigError
from dtp_search.models import load_checkpoint
from dtp_search.pruning import ThresholdPolicy
from dtp_search.settings import TrainSettings


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    hard_loss: torch.Tensor,
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """(1 − α)·``hard_loss`` + α·T²·KL(softmax(t/T) ‖ softmax(s/T)), the KL divergence
    averaged over the batch (``reduction="batchmean"``, the true KL per sample)."""
    t = float(temperature)
    log_p_student = F.log_softmax(student.float() / t, dim=1)
    log_p_teacher = F.log_softmax(teacher.float() / t, dim=1)
    soft = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return (1.0 - alpha) * hard_loss + alpha * (t * t) * soft


def make_teacher(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` to distil from: its own mask buffers (the student's
    later mask updates do not reach it), the pruner's forward hooks dropped (an
    activation criterion must not score the teacher's activations), eval mode
    (batch-norm running statistics, no dropout), no gradients.

    The masks stay attached rather than folded in: ``remove_parametrizations`` on a
    deep copy would delete the ``weight`` property from the class the copy shares with
    the student (parametrize makes one class per module and deepcopy keeps it)."""
    teacher = copy.deepcopy(model)
    for module in teacher.modules():
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


_ORIGINAL = re.compile(r"\.parametrizations\.(\w+)\.original$")  # a masked tensor's W


def load_teacher(model: nn.Module, path: str) -> nn.Module:
    """:func:`make_teacher` of ``model`` holding the weights of the ``state_dict`` at
    ``path`` (the plain network's keys: a masked ``weight`` is read into its
    parametrization's ``original``; the teacher's masks stay all ones). Raises
    :class:`ConfigError` naming ``train.distill.teacher`` when the file does not fit."""
    key = "train.distill.teacher"
    try:
        state = load_checkpoint(path)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("model.checkpoint=", f"{key}=", 1)) from exc
    teacher = make_teacher(model)
    own = teacher.state_dict()
    plain = {_ORIGINAL.sub(r".\1", k): k for k in own if ".parametrizations." not in k}
    plain |= {_ORIGINAL.sub(r".\1", k): k for k in own if _ORIGINAL.search(k)}
    bad = [p for p in plain if p not in state or state[p].shape != own[plain[p]].shape]
    extra = [k for k in state if k not in plain]
    if bad or extra:
        raise ConfigError(
            f"{key}={path!r} does not fit the network (missing or misshapen: {bad[:3]}, "
            f"unexpected: {extra[:3]}); allowed: a state_dict of this very network"
        )
    teacher.load_state_dict({**own, **{plain[p]: state[p] for p in plain}})
    return teacher


@torch.no_grad()
def teacher_logits(teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The teacher's logits on the student's (augmented) batch, without a graph."""
    return teacher(x)


def check_teacher(train: TrainSettings, policy: ThresholdPolicy, checkpoint: str | None) -> None:
    """Raise :class:`ConfigError` when ``train.distill`` is on but the fold has no trained
    dense network to distil from: no ``model.checkpoint`` and a policy that prunes from
    the first epoch (no dense epochs)."""
    alpha, given = train.distill.alpha, train.distill.teacher
    if given is not None and not Path(given).expanduser().is_file():
        raise ConfigError(
            f"train.distill.teacher={given!r} does not exist; allowed: null (the fold's "
            "dense network) or a file written by torch.save(model.state_dict(), path)"
        )
    if (
        alpha <= 0
        or given
        or train.distill.teacher_epochs > 0
        or checkpoint is not None
        or policy.dense_epochs(train.epochs) >= 1
    ):
        return
    raise ConfigError(
        f"train.distill.alpha={alpha!r} needs a trained dense teacher, but policy "
        f"{policy.name} prunes from the first epoch and model.checkpoint is null; allowed: "
        "train.distill.alpha=0, a policy.start_epoch >= 1 (its dense epochs train the "
        "teacher), train.distill.teacher_epochs >= 1 (a dense teacher trained first), "
        "model.checkpoint (trained weights, the teacher) or train.distill.teacher"
    )
