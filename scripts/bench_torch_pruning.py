"""dtp_search's searched channel policy against Torch-Pruning on ResNet-20 / CIFAR-10, at 2x
and 3x fewer FLOPs, side by side in one run.

Every arm starts from the same dense checkpoint and trains the same number of epochs after
it (``--finetune-epochs``), on the same data, normalisation and augmentation (one
``dataset=imagefolder`` load of ``../shared/data/cifar10``, a stratified
``--train-limit`` subset of the training split, the whole test split):

* ``dense`` — the built-in ResNet-20 (``model=resnet20``) trained from scratch for
  ``--dense-epochs`` (SGD, Nesterov momentum 0.9, weight decay 5e-4 on weights, cosine
  from ``--dense-lr``, batch 128, random crop + flip); its ``state_dict`` is the
  checkpoint every other arm starts from;
* ``tp_oneshot`` — Torch-Pruning's ``BasePruner`` (``MetaPruner`` is its deprecated alias
  in 1.6) with ``GroupMagnitudeImportance(p=2)``, local (uniform) channel pruning, the
  classifier ``fc`` ignored; ``pruning_ratio`` bisected so that the pruned network has at
  most the target fraction of the dense FLOPs; pruned once, then fine-tuned
  ``--finetune-epochs`` (the same loop, cosine from ``--lr``);
* ``tp_iterative`` — the same pruner with ``iterative_steps=--steps``: the steps spread
  evenly over the fine-tuning's optimizer steps (the first before any training), each
  followed by its share of the fine-tuning under its own cosine from ``--lr`` (the
  optimizer is rebuilt after each step: pruning replaces the parameters);
* ``dtp`` — a real ``python -m dtp_search`` study per target in its own folder
  (``model.checkpoint=<dense>``, ``policy.granularity=channel``, single objective
  ``search.objectives=[accuracy]`` under ``search.max_flops=<target>``, ``--trials``
  trials of ``--folds``-fold cross-validation on the same training subset, AGP's gradual
  magnitude schedule with its final sparsity and window searched), then ``mode=refit``: the
  best trial retrained on the whole training subset for ``--finetune-epochs`` epochs from
  the checkpoint, and its exported compacted network (``model/compact.pt``, read with
  :func:`dtp_search.models.export.load_pruned`) measured here.

Torch-Pruning and the option-A shortcut. ResNet-20's shortcut is
:class:`~dtp_search.pruning.layers.ChannelPadShortcut` (subsample, then zero channels before and
after): input channel j is output channel ``front + j``. Torch-Pruning's dependency graph
sees the ``F.pad`` inside it as an element-wise op (its ``_ElementWiseOp``, identity index
mapping), so by default it couples stem channel j with stage-2 channel j and stage-3
channel j instead of ``8 + j`` and ``24 + j``: the pruned network runs, with the
right shapes, but computes another function (:func:`check_structural` shows it). Here
the shortcut gets a customized pruner (:func:`pad_pruner_class`: drops zero channels by
lowering ``front``/``back``), the index mapping j ↔ ``front + j`` on its two edges of the
graph (set as Torch-Pruning sets its own slice mappings), and the widest layers first in
the graph's root order, so that one group holds all 64 stage-3 residual channels with
the stage-2 and stem channels they carry (with the stem first, its group would hold only
its 16 channels and the 48 zero-fed residual channels of stages 2-3 could never be
pruned). Every run checks the result against a channel-masked dense copy.

Measured per arm and target, all with the same code in this process: test accuracy on the
whole test split, FLOPs (``torch.utils.flop_counter.FlopCounterMode``, one 3×32×32 image:
convolutions and the linear layer, 2 FLOPs per multiply-add), parameters of the physical
network, and CPU latency at batch 1 and 128 (``torch.inference_mode``, channels-last,
``--threads`` threads, warm-up, then the models timed round-robin, median).

Results go to ``--work``/results.json as they finish; a rerun skips what is there and
measures everything again.

    python scripts/bench_torch_pruning.py                 # 73 min on 2 shared CPU cores (docs/benchmarks.md, 10)
    python scripts/bench_torch_pruning.py --smoke         # a tiny tree of its own, about a minute
"""

from __future__ import annotations

import argparse
import bisect
import copy
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# OpenMP threads that spin while waiting stall each other when the cores are shared with
# other processes (a training step at 2 threads took twice as long as at 1 on the shared
# development VM, 1.2 s instead of 3.6 with passive waiting); it must be set before torch
# loads OpenMP. The dtp_search subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F
from _cli import dtp_search
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
MEAN = [0.4914, 0.4822, 0.4465]
STD = [0.2470, 0.2435, 0.2616]
TARGETS = (0.5, 0.33)  # fraction of the dense FLOPs: 2x and 3x fewer
BATCH = 128


# ------------------------------------------------------------------ data, model, training


def dataset_keys(a: argparse.Namespace) -> dict[str, Any]:
    """The ``dataset`` settings every arm uses (the dtp arm passes them to the CLI)."""
    return {
        "kind": "imagefolder",
        "name": "cifar10",
        "path": str(a.data),
        "train_limit": a.train_limit,
        "test_limit": a.test_limit,
        "mean": MEAN,
        "std": STD,
        "augment": True,
        "crop_padding": 4,
        "in_memory": True,
    }


def load_data(a: argparse.Namespace):
    """The dataset, through dtp_search's own loader (the CLI's study sees the same)."""
    from dtp_search.data import load_dataset

    return load_dataset(dataset_keys(a), cache_dir=a.work / "cache")


def resnet20(ds) -> nn.Module:
    from dtp_search.models import build_model

    return build_model({"arch": "resnet20"}, ds.input_shape, ds.num_classes)


def _optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """SGD as dtp_search builds it: Nesterov momentum 0.9, weight decay 5e-4 on weights only."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": 5e-4}, {"params": rest, "weight_decay": 0.0}],
        lr=lr,
        momentum=0.9,
        nesterov=True,
    )


def fit(
    model: nn.Module,
    ds,
    epochs: int,
    lr: float,
    seed: int,
    prune_points: int = 0,
    prune: Callable[[], None] | None = None,
    log: str | None = None,
) -> None:
    """Train ``model`` for ``epochs`` on the augmented training split, one cosine schedule
    from ``lr`` over all optimizer steps. With ``prune_points`` = n, ``prune()`` runs
    before optimizer steps ⌊kK/n⌋, k = 0 … n−1 (K steps in all), the optimizer is
    rebuilt after each call (pruning replaces parameters), and the cosine restarts from
    ``lr`` there: each pruning step is followed by its own share of fine-tuning, down to
    a small learning rate before the next. ``log``: print each epoch's mean loss and time
    under that label."""
    from dtp_search.data.batches import TensorBatches

    torch.manual_seed(seed)
    batches = TensorBatches(
        ds.train,
        None,
        batch_size=BATCH,
        mean=ds.mean,
        std=ds.std,
        shuffle=True,
        augment=True,
        crop_padding=ds.crop_padding,
        seed=seed,
        drop_last=len(ds.train.labels) > BATCH,
        channels_last=True,
    )
    total = max(epochs * len(batches), 1)
    points = [k * total // prune_points for k in range(prune_points)]
    bounds = [*points, total] if points else [0, total]  # the cosine's (re)starts and end
    model.to(memory_format=torch.channels_last).train()
    opt = _optimizer(model, lr)
    step = 0
    for epoch in range(epochs):
        t0, losses = time.time(), []
        for x, y in batches:
            while points and points[0] <= step:
                points.pop(0)
                prune()
                model.to(memory_format=torch.channels_last).train()
                opt = _optimizer(model, lr)
            seg = bisect.bisect_right(bounds, step) - 1
            start, end = bounds[seg], bounds[min(seg + 1, len(bounds) - 1)]
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * (step - start) / max(end - start, 1)))
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            losses.append(loss.item())
        if log:
            print(
                f"  {log} epoch {epoch + 1}/{epochs}: loss {statistics.fmean(losses):.3f} "
                f"({time.time() - t0:.0f} s)",
                flush=True,
            )
    while points:  # fewer optimizer steps than pruning steps (a tiny smoke run)
        points.pop(0)
        prune()
    model.eval()


def test_accuracy(model: nn.Module, ds) -> float:
    from dtp_search.data.batches import TensorBatches
    from dtp_search.training import evaluate

    batches = TensorBatches(
        ds.test, None, batch_size=500, mean=ds.mean, std=ds.std, channels_last=True
    )
    return evaluate(model.to(memory_format=torch.channels_last), batches)


def count_flops(model: nn.Module, shape: Sequence[int]) -> int:
    """FLOPs of one image (``FlopCounterMode``: 2 per multiply-add of convs and linears)."""
    x = torch.zeros(1, *shape)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(x)
    return int(counter.get_total_flops())


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def widths(model: nn.Module) -> dict[str, int]:
    """Output channels of every convolution (how a pruned network is shaped)."""
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


# ------------------------------------------------------------------ Torch-Pruning


def _tp():
    import torch_pruning as tp

    return tp


def _shortcut_class() -> type[nn.Module]:
    from dtp_search.pruning.layers import ChannelPadShortcut

    return ChannelPadShortcut


class _PadIndexMap:
    """Torch-Pruning index mapping across a :class:`ChannelPadShortcut`: input channel j
    is output channel ``front + j`` (``reverse``: output → input, the zero channels
    dropped). Reads the shortcut's current ``front`` and input width, so that it stays
    right after earlier pruning steps."""

    def __init__(self, owner: Any, layer: nn.Module, reverse: bool) -> None:
        self.owner, self.layer, self.reverse = owner, layer, reverse

    def __call__(self, idxs: list) -> list:
        from torch_pruning._helpers import _HybridIndex

        front, n_in = self.layer.front, self.owner.in_channels[self.layer]
        if self.reverse:
            return [
                _HybridIndex(idx=i.idx - front, root_idx=i.root_idx)
                for i in idxs
                if front <= i.idx < front + n_in
            ]
        return [_HybridIndex(idx=i.idx + front, root_idx=i.root_idx) for i in idxs]


def pad_pruner_class() -> type:
    """Torch-Pruning's customized pruner for :class:`ChannelPadShortcut` (built on first use,
    so that importing this script does not import torch_pruning).

    Indices are the shortcut's *output* channels (the edges' index mapping brings an
    input-side index j to ``front + j``). A zero channel (index < ``front`` or past the
    input's channels) is dropped by lowering ``front`` or ``back``; an input channel needs
    no edit here (its producer loses it). Output and input pruning are the same function,
    which is how Torch-Pruning couples a layer's input and output channels."""
    tp = _tp()

    class _ChannelPadPruner(tp.pruner.function.BasePruningFunc):
        def __init__(self) -> None:
            super().__init__()
            self.in_channels: dict[nn.Module, int] = {}

        def probe(self, model: nn.Module, example: torch.Tensor) -> None:
            """Record every shortcut's input width (the module does not store it)."""
            cls = _shortcut_class()
            hooks = [
                m.register_forward_hook(
                    lambda mod, args, out: self.in_channels.__setitem__(mod, args[0].shape[1])
                )
                for m in model.modules()
                if isinstance(m, cls)
            ]
            with torch.no_grad():
                model(example)
            for h in hooks:
                h.remove()

        def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
            n_in = self.in_channels[layer]
            front = sum(1 for i in idxs if i < layer.front)
            back = sum(1 for i in idxs if i >= layer.front + n_in)
            layer.front -= front
            layer.back -= back
            self.in_channels[layer] = n_in - (len(idxs) - front - back)
            return layer

        prune_in_channels = prune_out_channels

        def get_out_channels(self, layer: nn.Module) -> int:
            return layer.front + self.in_channels[layer] + layer.back

        # The indices this pruner gets are output channels, whichever side they came
        # from, so Torch-Pruning's checks ("would this empty the layer?") must count those.
        get_in_channels = get_out_channels

    return _ChannelPadPruner


def _install_pad_mappings(pad: Any, graph: Any) -> None:
    """Set the j ↔ ``front + j`` index mapping on the two edges between every shortcut and
    the node that feeds it (Torch-Pruning keeps a node's indices in its output coordinates
    and maps them on the edges, as ``update_slice_index_mapping`` does for slices)."""
    for layer in pad.in_channels:
        node = graph.module2node[layer]
        if len(node.inputs) != 1:
            raise RuntimeError(f"{node}: expected one input node, found {node.inputs}")
        (source,) = node.inputs
        for dep in node.dependencies:
            if dep.target is source:
                dep.index_mapping[0] = _PadIndexMap(pad, layer, reverse=True)
        for dep in source.dependencies:
            if dep.target is node:
                dep.index_mapping[0] = _PadIndexMap(pad, layer, reverse=False)


def _widest_roots_first(graph: Any) -> None:
    """Reorder the graph so that wider convolutions come first as group roots.

    ``DependencyGraph.get_all_groups`` makes one group per root layer in graph order and
    never makes a layer a root again once it is pruned in an earlier group. A stem-rooted
    group holds 16 indices, mapped onto 16 of stage 2's 32 and 16 of stage 3's 64 residual
    channels; the rest of those (fed by the shortcuts' zero channels) would never be
    pruned. A stage-3 root holds all 64, and the earlier stages' channels through the
    shortcuts' mappings."""
    order = sorted(
        graph.module2node.items(),
        key=lambda kv: -(kv[0].out_channels if isinstance(kv[0], nn.Conv2d) else 0),
    )
    graph.module2node = dict(order)


def tp_pruner(
    model: nn.Module,
    example: torch.Tensor,
    ratio: float,
    steps: int = 1,
    fix_shortcut: bool = True,
) -> Any:
    """Torch-Pruning's ``BasePruner`` (``MetaPruner``) with ``GroupMagnitudeImportance(p=2)``,
    local pruning at ``ratio`` of every group's channels, ``fc`` ignored. ``fix_shortcut``:
    the customized pruner, index mapping and root order of the module docstring; without
    it, Torch-Pruning's default handling of the shortcut."""
    tp = _tp()
    model.to(memory_format=torch.contiguous_format)
    kwargs: dict[str, Any] = {}
    pad = None
    if fix_shortcut:
        pad = pad_pruner_class()()
        pad.probe(model, example)
        kwargs["customized_pruners"] = {_shortcut_class(): pad}
    pruner = tp.pruner.BasePruner(
        model,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio,
        iterative_steps=steps,
        ignored_layers=[model.fc],
        **kwargs,
    )
    if pad is not None:
        _install_pad_mappings(pad, pruner.DG)
        _widest_roots_first(pruner.DG)
    return pruner


def prune_once(model: nn.Module, example: torch.Tensor, ratio: float, **kw: Any) -> nn.Module:
    """A copy of ``model`` pruned at ``ratio`` in one step."""
    pruned = copy.deepcopy(model)
    pruner = tp_pruner(pruned, example, ratio, **kw)
    pruner.step()
    return pruned


def ratio_for(model: nn.Module, example: torch.Tensor, target: float) -> tuple[float, float]:
    """The smallest pruning ratio (to 1e-3) whose one-shot pruned copy has at most ``target``
    of ``model``'s FLOPs, and that copy's FLOPs fraction. The channel counts a ratio gives
    are the same one-shot and after the last iterative step."""
    shape = example.shape[1:]
    dense = count_flops(model, shape)
    lo, hi = 0.0, 0.9
    frac_hi = count_flops(prune_once(model, example, hi), shape) / dense
    if frac_hi > target:
        raise RuntimeError(f"ratio {hi} leaves {frac_hi:.3f} of the FLOPs > {target}")
    while hi - lo > 1e-3:
        mid = (lo + hi) / 2
        frac = count_flops(prune_once(model, example, mid), shape) / dense
        if frac <= target:
            hi, frac_hi = mid, frac
        else:
            lo = mid
    return hi, frac_hi


@torch.no_grad()
def check_structural(model: nn.Module, example: torch.Tensor, ratio: float, **kw: Any) -> float:
    """Largest |difference| between a Torch-Pruning-pruned copy of ``model`` and the dense
    copy with the same channels masked, relative to the largest |logit| (0 = exact).

    The copy's batch norms get distinct random statistics first; each surviving norm
    entry is found by its (unique) running mean; every removed entry gets weight and bias 0
    in the dense copy, so that its channel emits 0 everywhere (every producer of ResNet-20
    ends in a batch norm). A structurally correct pruning computes exactly that masked
    network; one that couples the wrong channels does not."""
    gen = torch.Generator().manual_seed(0)
    dense = copy.deepcopy(model).eval()
    for m in dense.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.copy_(0.5 + torch.rand(n, generator=gen))
            m.bias.copy_(0.1 * torch.randn(n, generator=gen))
            m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
    with torch.enable_grad():
        pruned = prune_once(dense, example, ratio, **kw).eval()
    kept = dict(pruned.named_modules())
    masked = copy.deepcopy(dense)
    for name, m in masked.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            survivors = kept[name].running_mean
            alive = torch.isin(m.running_mean, survivors)
            m.weight[~alive] = 0
            m.bias[~alive] = 0
    x = torch.randn(4, *example.shape[1:], generator=gen)
    want = masked(x)
    got = pruned(x)
    return float((got - want).abs().max() / want.abs().max())


_RATIOS: dict[float, tuple[float, float]] = {}  # FLOPs target -> (pruning ratio, FLOPs fraction)


def tp_arm(
    a: argparse.Namespace, ds, dense: nn.Module, target: float, iterative: bool
) -> tuple[dict[str, Any], nn.Module]:
    """Prune the dense network with Torch-Pruning to ``target`` of its FLOPs and fine-tune."""
    example = torch.zeros(1, *ds.input_shape)
    t0 = time.time()
    if target not in _RATIOS:  # the same for both arms (the same dense network)
        _RATIOS[target] = ratio_for(dense, example, target)
    ratio, frac = _RATIOS[target]
    model = copy.deepcopy(dense)
    if iterative:
        pruner = tp_pruner(model, example, ratio, steps=a.steps)
        fit(
            model,
            ds,
            a.finetune_epochs,
            a.lr,
            a.seed,
            prune_points=a.steps,
            prune=pruner.step,
            log=f"tp_iterative/{target}",
        )
    else:
        tp_pruner(model, example, ratio).step()
        fit(model, ds, a.finetune_epochs, a.lr, a.seed, log=f"tp_oneshot/{target}")
    return {
        "pruning_ratio": ratio,
        "flops_fraction_planned": frac,
        "widths": widths(model),
        "minutes": (time.time() - t0) / 60,
    }, model


# ------------------------------------------------------------------ dtp_search


def dtp_overrides(a: argparse.Namespace, target: float) -> list[str]:
    """The study's command line (everything but ``mode``)."""
    d = dataset_keys(a)
    pruning_epochs = max(a.finetune_epochs - a.dtp_finetune, 1)
    return [
        f"paths.root={a.work / f'dtp-{target}'}",
        "model=resnet20",
        f"model.checkpoint={a.work / 'dense.pt'}",
        "dataset=imagefolder",
        f"dataset.path={d['path']}",
        "dataset.name=cifar10",
        f"dataset.train_limit={d['train_limit']}",
        *([f"dataset.test_limit={d['test_limit']}"] if d["test_limit"] else []),
        f"dataset.mean=[{','.join(map(str, MEAN))}]",
        f"dataset.std=[{','.join(map(str, STD))}]",
        "dataset.augment=true",
        "dataset.in_memory=true",
        # The policy: AGP (gradual magnitude) on channels from the first step (the network
        # is trained), its final sparsity and pruning window searched.
        "policy=agp",
        "policy.granularity=channel",
        "policy.exclude_classifier=true",
        "policy.start_epoch=0",
        "~policy.space.start_epoch",
        "~policy.space.recover",
        "policy.space.final_sparsity.low=0.3",
        "policy.space.final_sparsity.high=0.95",
        f"policy.space.end_epoch.high={pruning_epochs}",
        # The same training as Torch-Pruning's fine-tuning: epochs, batch, lr, one cosine.
        f"train.epochs={pruning_epochs}",
        f"train.finetune_epochs={a.finetune_epochs - pruning_epochs}",
        f"train.batch_size={BATCH}",
        f"train.lr={a.lr}",
        "train.lr_schedule=cosine",
        "train.finetune_lr_schedule=continue",
        # The search: one objective under the FLOPs budget.
        f"cv.folds={a.folds}",
        f"search.n_trials={a.trials}",
        "search.objectives=[accuracy]",
        "search.directions=[maximize]",
        f"search.max_flops={target}",
        "search.sampler.n_startup_trials=" + str(max(1, min(4, a.trials // 3))),
        f"search.sampler.seed={a.seed}",
        "early_stop=none",
        "front.points=0",
        "refit.top_k=1",
        f"seed={a.seed}",
        f"threads={a.threads}",
        "console.progress=false",
        f"study.name=bench-tp-{target}",
        # The refit's own latency measure (not used here): a small batch in a smoke run.
        *(["export.batch_size=4"] if a.smoke else []),
    ]


def _cli(args: list[str], log: Path) -> None:
    proc = dtp_search(args, cwd=log.parent, log=log)
    if proc.returncode != 0:
        sys.exit(f"dtp_search failed ({proc.returncode}); see {log}:\n{log.read_text()[-3000:]}")


def dtp_arm(a: argparse.Namespace, target: float) -> tuple[dict[str, Any], nn.Module]:
    """The study, its refit, and the refit's exported compacted network."""
    import optuna

    from dtp_search.models.export import load_pruned

    root = a.work / f"dtp-{target}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    log = root / "cli.log"
    args = dtp_overrides(a, target)
    t0 = time.time()
    _cli([*args, "refit.enabled=false"], log)
    t1 = time.time()
    print(f"  dtp/{target}: study of {a.trials} trials, {(t1 - t0) / 60:.1f} min", flush=True)
    _cli([*args, "mode=refit"], log)
    t2 = time.time()
    print(f"  dtp/{target}: refit, {(t2 - t1) / 60:.1f} min", flush=True)
    study = optuna.load_study(
        study_name=f"bench-tp-{target}", storage=f"sqlite:///{root}/optuna.db"
    )
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    refit = study.user_attrs.get("refit", {})
    if not refit:
        sys.exit(f"the refit of the dtp study at {target} recorded nothing; see {log}")
    (trial, record), *_ = refit.items()
    found = sorted(root.rglob("compact.pt"))
    if len(found) != 1:
        sys.exit(f"expected one compact.pt under {root}, found {found}")
    model = load_pruned(found[0])
    best = next(t for t in study.trials if t.number == int(trial))
    return {
        "trial": int(trial),
        "trial_params": best.params,
        "cv_accuracy": best.values[0] if best.values else None,
        "trials_complete": len(complete),
        "trials": len(study.trials),
        "refit_test_accuracy": record["test_accuracy"],
        "refit_measures": record.get("measures", {}),
        "search_minutes": (t1 - t0) / 60,
        "refit_minutes": (t2 - t1) / 60,
        "widths": widths(model),
        "minutes": (t2 - t0) / 60,
    }, model


# ------------------------------------------------------------------ latency


@torch.inference_mode()
def latencies(
    models: dict[str, nn.Module], shape: Sequence[int], batch: int, warmup: int, repeats: int
) -> dict[str, float]:
    """Median ms per forward pass of every model at ``batch``, timed round-robin (one call
    of each per round), so that load from other processes falls on all of them alike."""
    x = torch.randn(batch, *shape).contiguous(memory_format=torch.channels_last)
    for m in models.values():
        m.eval().to(memory_format=torch.channels_last)
        for _ in range(warmup):
            m(x)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(repeats):
        for k, m in models.items():
            t0 = time.perf_counter()
            m(x)
            times[k].append(time.perf_counter() - t0)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


# ------------------------------------------------------------------ driver


def smoke_tree(root: Path) -> Path:
    """A tiny CIFAR-shaped JPEG tree: 10 classes, 6 training and 2 test images each, 32×32."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        for c in range(10):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{i}.jpg")
    return root


ARMS = ("dense", "tp_oneshot", "tp_iterative", "dtp")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10")
    ap.add_argument("--work", type=Path, default=ROOT / "dtp_runs" / "bench_torch_pruning")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--targets", default=",".join(map(str, TARGETS)), help="FLOPs fractions")
    ap.add_argument("--train-limit", type=int, default=4000, help="training images (stratified)")
    ap.add_argument("--test-limit", type=int, default=None, help="test images (default: all)")
    ap.add_argument("--dense-epochs", type=int, default=20)
    ap.add_argument("--dense-lr", type=float, default=0.1)
    ap.add_argument(
        "--finetune-epochs", type=int, default=5, help="every arm, after the checkpoint"
    )
    ap.add_argument("--lr", type=float, default=0.01, help="fine-tuning lr (all arms)")
    ap.add_argument("--steps", type=int, default=5, help="tp_iterative's pruning steps")
    ap.add_argument("--trials", type=int, default=12, help="dtp study trials per target")
    ap.add_argument("--folds", type=int, default=2, help="dtp study CV folds")
    ap.add_argument(
        "--dtp-finetune",
        type=int,
        default=1,
        help="of the fine-tuning epochs, dtp's frozen-mask ones",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--smoke", action="store_true", help="a tiny tree of its own, 1 epoch, 2 trials"
    )
    a = ap.parse_args(argv)
    tmp = None
    if a.smoke:
        tmp = tempfile.TemporaryDirectory(prefix="dtp-bench-tp-smoke-")
        a.data = smoke_tree(Path(tmp.name) / "tree")
        a.work = Path(tmp.name) / "work"
        a.train_limit, a.test_limit = 60, None
        a.dense_epochs, a.finetune_epochs, a.dtp_finetune = 1, 1, 0
        a.trials, a.folds, a.steps, a.threads = 2, 2, 2, 1
        a.targets = "0.5"
    a.data, a.work = a.data.expanduser().resolve(), a.work.expanduser().resolve()
    if not (a.data / "train").is_dir():
        sys.exit(f"no ImageFolder tree at {a.data} (expected train/<class>/*.jpg)")
    a.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    arms = a.arms.split(",")
    targets = [float(t) for t in a.targets.split(",")]
    out = a.work / "results.json"
    results: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    models_dir = a.work / "models"
    models_dir.mkdir(exist_ok=True)
    t_start = time.time()
    ds = load_data(a)
    shape = tuple(ds.input_shape)
    example = torch.zeros(1, *shape)
    print(
        f"ResNet-20, {ds.name}: {len(ds.train.labels)} training images, "
        f"{len(ds.test.labels)} test images; dense {a.dense_epochs} epochs (lr {a.dense_lr}), "
        f"every arm {a.finetune_epochs} epochs from the dense checkpoint (lr {a.lr}); "
        f"{a.threads} threads",
        flush=True,
    )

    def record(key: str, value: dict[str, Any], model: nn.Module) -> None:
        value["test_accuracy"] = test_accuracy(model, ds)
        value["flops"] = count_flops(model, shape)
        value["params"] = count_params(model)
        results[key] = value
        out.write_text(json.dumps(results, indent=1))
        torch.save(model, models_dir / f"{key.replace('/', '-')}.pt")
        print(f"{key}: {json.dumps(value)}", flush=True)

    def load(key: str) -> nn.Module:
        return torch.load(models_dir / f"{key.replace('/', '-')}.pt", weights_only=False)

    if "dense" not in results:
        t0 = time.time()
        dense = resnet20(ds)
        fit(dense, ds, a.dense_epochs, a.dense_lr, a.seed, log="dense")
        torch.save(dense.state_dict(), a.work / "dense.pt")
        record("dense", {"minutes": (time.time() - t0) / 60}, dense)
    dense = load("dense").to(memory_format=torch.contiguous_format)

    # Torch-Pruning on the option-A shortcut: its default and the fixed handling, checked.
    checks = {}
    for fix in (False, True):
        try:
            checks[fix] = f"{check_structural(dense, example, 0.5, fix_shortcut=fix):.2e}"
        except Exception as exc:  # the default may fail outright instead
            checks[fix] = f"error: {type(exc).__name__}: {exc}"
    print(
        "Torch-Pruning at ratio 0.5 against the channel-masked dense network (max |diff| / "
        f"max |logit|): default {checks[False]}; with ChannelPadPruner {checks[True]}",
        flush=True,
    )
    if not checks[True].startswith("0") and float(checks[True]) > 1e-4:
        sys.exit("the fixed Torch-Pruning handling does not match the masked network")
    results["tp_check"] = {"default": checks[False], "fixed": checks[True]}

    for t in targets:
        for arm in ("tp_oneshot", "tp_iterative", "dtp"):
            key = f"{arm}/{t}"
            if arm not in arms or key in results:
                continue
            if arm == "dtp":
                value, model = dtp_arm(a, t)
            else:
                value, model = tp_arm(a, ds, copy.deepcopy(dense), t, arm == "tp_iterative")
            record(key, value, model)
    report(a, results, targets, shape, load)
    print(f"wall time: {(time.time() - t_start) / 60:.1f} min", flush=True)
    if tmp is not None:
        tmp.cleanup()


def report(
    a: argparse.Namespace,
    results: dict[str, Any],
    targets: list[float],
    shape: Sequence[int],
    load: Callable[[str], nn.Module],
) -> None:
    """Latency of every finished model, side by side, then the table and the headline."""
    keys = ["dense"] + [
        f"{arm}/{t}" for t in targets for arm in ARMS[1:] if f"{arm}/{t}" in results
    ]
    models = {k: load(k) for k in keys}
    lat1 = latencies(models, shape, 1, warmup=2 if a.smoke else 20, repeats=5 if a.smoke else 100)
    lat128 = latencies(models, shape, 128, warmup=1 if a.smoke else 3, repeats=3 if a.smoke else 15)
    dense = results["dense"]
    print(
        "\n| arm | FLOPs target | test accuracy | FLOPs (M) | FLOPs / dense | params (k) "
        "| latency b1 (ms) | latency b128 (ms) | speed-up b128 |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for k in keys:
        r = results[k]
        arm, _, t = k.partition("/")
        print(
            f"| {arm} | {'—' if not t else f'{float(t):.2f}'} | {r['test_accuracy']:.4f} "
            f"| {r['flops'] / 1e6:.1f} | {r['flops'] / dense['flops']:.3f} "
            f"| {r['params'] / 1e3:.1f} | {lat1[k]:.2f} | {lat128[k]:.1f} "
            f"| {lat128['dense'] / lat128[k]:.2f}x |"
        )
    for t in targets:
        d = results.get(f"dtp/{t}")
        if d:
            print(
                f"dtp {t}: trial {d['trial']} {d['trial_params']} (CV {d['cv_accuracy']}, "
                f"{d['trials_complete']} of {d['trials']} trials complete; search "
                f"{d['search_minutes']:.1f} min, refit {d['refit_minutes']:.1f} min; "
                f"refit-logged test accuracy {d['refit_test_accuracy']:.4f})"
            )
    print(f"Torch-Pruning check: {results.get('tp_check')}")
    heads = []
    for t in targets:
        tp_best = max(
            (
                results[f"{arm}/{t}"]["test_accuracy"]
                for arm in ("tp_oneshot", "tp_iterative")
                if f"{arm}/{t}" in results
            ),
            default=math.nan,
        )
        d = results.get(f"dtp/{t}")
        acc = d["test_accuracy"] if d else math.nan
        heads.append(f"dtp - best TP at {t}: {100 * (acc - tp_best):+.1f} points (target >= 0)")
    t3 = min(targets)
    speed = lat128["dense"] / lat128[f"dtp/{t3}"] if f"dtp/{t3}" in lat128 else math.nan
    heads.append(f"dtp speed-up at {t3}, batch 128: {speed:.2f}x (target >= 1.8)")
    print("bench_torch_pruning: " + "; ".join(heads))


if __name__ == "__main__":
    main()
