"""train.distill: the loss maths on hand-made logits, the frozen teacher, the check that a
teacher exists, and one tiny distilled fold on digits."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from dtp_search.data import TensorBatches, load_dataset
from dtp_search.errors import ConfigError
from dtp_search.models import build_model
from dtp_search.pruning import AGPThreshold, DynamicPruner
from dtp_search.settings import DistillSettings, FrontSettings, TrainSettings, check
from dtp_search.training import FoldTrainer, WarmStart, check_teacher, evaluate
from dtp_search.training.distill import distillation_loss, load_teacher, make_teacher
from dtp_search.training.teacher import teacher_recipe
from dtp_search.training.warmstart import WarmStartCache


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q, strict=True))


def _softmax(z: list[float], t: float) -> list[float]:
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def test_distillation_loss_is_the_hinton_mix_of_ce_and_t2_kl():
    s = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 1.0]])
    t = torch.tensor([[1.0, 1.0, 0.0], [3.0, -1.0, 0.0]])
    hard = torch.tensor(0.7)
    T, alpha = 2.0, 0.25
    # by hand: the batch mean of KL(softmax(t/T) || softmax(s/T)), times T²
    kl = (
        _kl(_softmax([1.0, 1.0, 0.0], T), _softmax([2.0, 0.0, -1.0], T))
        + _kl(_softmax([3.0, -1.0, 0.0], T), _softmax([0.5, 0.5, 1.0], T))
    ) / 2
    got = distillation_loss(s, t, hard, alpha, T)
    assert float(got) == pytest.approx((1 - alpha) * 0.7 + alpha * T * T * kl, rel=1e-6)
    # α = 0: the hard loss alone; a student equal to its teacher: no soft term.
    assert float(distillation_loss(s, t, hard, 0.0, T)) == pytest.approx(0.7)
    assert float(distillation_loss(t, t, hard, 1.0, T)) == pytest.approx(0.0, abs=1e-7)
    # the soft term pulls the student's logits towards the teacher's
    s2 = s.clone().requires_grad_(True)
    distillation_loss(s2, t, torch.tensor(0.0), 1.0, T).backward()
    p_s, p_t = torch.softmax(s / T, 1), torch.softmax(t / T, 1)
    assert torch.allclose(s2.grad, T * (p_s - p_t) / 2, atol=1e-6)  # T²·(p_s − p_t)/(T·batch)


def test_distill_settings_are_checked_with_the_key_named():
    check(TrainSettings(distill=DistillSettings(alpha=1.0)))
    for bad, key in ((DistillSettings(alpha=1.5), "alpha"), (DistillSettings(temperature=0), "t")):
        with pytest.raises(ValueError, match=f"train.distill.{key}"):
            check(TrainSettings(distill=bad), "train.")


def test_teacher_is_a_frozen_copy_with_its_own_masks_and_no_hooks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    pruner = DynamicPruner(model, AGPThreshold(0.5, end_epoch=1), min_keep=0)
    calls = []
    model[0].register_forward_hook(lambda *a: calls.append(1))
    model.train()
    teacher = make_teacher(model)
    x = torch.randn(5, 4)
    model.eval()
    assert torch.equal(teacher(x), model(x)) and len(calls) == 1  # the teacher's call: no hook
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        next(iter(pruner.masks.values())).mask.zero_()  # the student's masks: not the teacher's
    assert not torch.equal(teacher(x), model(x))


def test_check_teacher_needs_dense_epochs_or_a_checkpoint():
    train = TrainSettings(epochs=4, distill=DistillSettings(alpha=0.5))
    at_once = AGPThreshold(0.9, end_epoch=4, start_epoch=0)
    with pytest.raises(ConfigError, match=r"train.distill.alpha=0.5 .*allowed: .*start_epoch"):
        check_teacher(train, at_once, None)
    check_teacher(train, at_once, "/trained.pt")  # the user's weights are the teacher
    check_teacher(train, AGPThreshold(0.9, end_epoch=4, start_epoch=1), None)
    check_teacher(TrainSettings(epochs=4), at_once, None)  # off
    trained = TrainSettings(epochs=4, distill=DistillSettings(alpha=0.5, teacher_epochs=4))
    check_teacher(trained, at_once, None)  # a teacher trained first


def _fold(ds, distill: DistillSettings, warm_start=None):
    torch.manual_seed(0)
    model = build_model(OmegaConf.create({"arch": "mlp", "hidden": [32]}), ds.input_shape, 10)
    pruner = DynamicPruner(model, AGPThreshold(0.8, end_epoch=2, start_epoch=1, update_every=2))
    idx = np.arange(len(ds.train.labels))
    train = TensorBatches(
        ds.train, idx[:512], batch_size=64, mean=ds.mean, std=ds.std, shuffle=True
    )
    val = TensorBatches(ds.train, idx[512:], batch_size=512, mean=ds.mean, std=ds.std)
    s = TrainSettings(epochs=3, finetune_epochs=1, lr=0.1, distill=distill)
    snapshots = []
    trainer = FoldTrainer(
        model,
        pruner,
        train,
        val,
        s,
        FrontSettings(points=0),
        on_epoch=lambda r: snapshots.append({k: v.clone() for k, v in model.state_dict().items()}),
        warm_start=warm_start,
    )
    return trainer, trainer.run(), snapshots


def test_a_distilled_fold_trains_from_the_network_at_the_end_of_its_dense_epochs():
    ds = load_dataset(OmegaConf.create({"kind": "digits", "name": "digits"}))
    plain, plain_result, _ = _fold(ds, DistillSettings())
    kd, kd_result, snapshots = _fold(ds, DistillSettings(alpha=0.7, temperature=3.0))
    assert plain.teacher is None
    # The dense epoch (start_epoch=1) trains on CE alone: the same as the plain fold.
    assert kd_result.history[0].loss == plain_result.history[0].loss
    assert kd_result.history[1].loss != plain_result.history[1].loss
    # The teacher is the dense network after epoch 1 (masks folded in: all ones then).
    after_dense = snapshots[0]
    for name, w in kd.teacher.state_dict().items():
        key = (
            name
            if name in after_dense
            else name.replace(".weight", ".parametrizations.weight.original")
        )
        assert torch.equal(w, after_dense[key]), name
    assert kd_result.sparsity == pytest.approx(0.8, abs=0.01)
    assert kd_result.accuracy > 0.6  # ten classes: it learned, pruned at 80 %


def test_a_trained_teacher_is_the_starting_network_trained_dense_once_per_fold(tmp_path):
    """teacher_epochs=E: the teacher is trained E dense epochs on the fold before the
    student, leaves the student's batches and random states alone, and is cached."""
    ds = load_dataset(OmegaConf.create({"kind": "digits", "name": "digits"}))
    _, plain_result, _ = _fold(ds, DistillSettings())
    warm = WarmStart(WarmStartCache(tmp_path), context="digits")
    distill = DistillSettings(alpha=0.7, temperature=3.0, teacher_epochs=3, teacher_lr=0.05)
    kd, kd_result, _ = _fold(ds, distill, warm)
    # the student's dense epoch is the plain fold's: the teacher's training took nothing
    # from the batch order or torch's random state
    assert kd_result.history[0].loss == plain_result.history[0].loss
    assert kd.teacher is kd.dense_teacher and not kd.teacher.training
    assert evaluate(kd.teacher, kd.val) == kd_result.teacher_accuracy > 0.8  # chance: 0.1
    assert plain_result.teacher_accuracy is None
    assert warm.cache.stores == 2  # the dense warm start and the teacher
    again, again_result, _ = _fold(ds, distill, warm)
    assert warm.cache.hits == 2 and warm.cache.stores == 2  # both from the cache
    for name, w in kd.teacher.state_dict().items():
        assert torch.equal(w, again.teacher.state_dict()[name]), name
    assert again_result.accuracy == kd_result.accuracy
    assert again_result.teacher_accuracy == kd_result.teacher_accuracy
    # another teacher recipe is another teacher
    _fold(ds, DistillSettings(alpha=0.7, teacher_epochs=3, teacher_lr=0.02), warm)
    assert warm.cache.stores == 3


def test_the_teacher_recipe_is_the_folds_with_its_own_epochs_lr_and_schedule():
    s = TrainSettings(
        epochs=10, finetune_epochs=2, lr=0.2, lr_schedule="cosine", l1=1e-4,
        distill=DistillSettings(alpha=0.5, teacher_epochs=7),
    )  # fmt: skip
    r = teacher_recipe(s)
    assert (r.epochs, r.finetune_epochs, r.lr, r.lr_schedule, r.l1) == (7, 0, 0.2, "cosine", 0)
    assert r.distill == DistillSettings() and r.weight_decay == s.weight_decay
    s.distill.teacher_lr, s.distill.teacher_lr_schedule = 0.05, "onecycle"
    assert (teacher_recipe(s).lr, teacher_recipe(s).lr_schedule) == (0.05, "onecycle")
    with pytest.raises(ValueError, match=r"train\.distill\.teacher_lr_schedule"):
        check(TrainSettings(distill=DistillSettings(teacher_lr_schedule="linear")), "train.")


def test_a_teacher_file_is_loaded_into_the_masked_copy_and_a_misfit_names_the_key(tmp_path):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    path = tmp_path / "dense.pt"
    torch.save(dense.state_dict(), path)
    torch.manual_seed(1)
    student = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    DynamicPruner(student, AGPThreshold(0.5, end_epoch=1), min_keep=0)
    teacher = load_teacher(student, str(path))
    x = torch.randn(6, 4)
    assert torch.equal(teacher(x), dense(x)) and not torch.equal(teacher(x), student(x))
    torch.save(nn.Linear(4, 3).state_dict(), tmp_path / "other.pt")
    with pytest.raises(ConfigError, match=r"train.distill.teacher=.*does not fit"):
        load_teacher(student, str(tmp_path / "other.pt"))
    at_once = AGPThreshold(0.9, end_epoch=4, start_epoch=0)
    given = TrainSettings(epochs=4, distill=DistillSettings(alpha=0.5, teacher=str(path)))
    check_teacher(given, at_once, None)  # a given teacher needs no dense epochs
    missing = TrainSettings(distill=DistillSettings(alpha=0.5, teacher=str(tmp_path / "no.pt")))
    with pytest.raises(ConfigError, match=r"train.distill.teacher=.*does not exist"):
        check_teacher(missing, at_once, None)


def test_run_params_leave_out_what_a_switched_off_feature_or_superseded_key_says():
    from omegaconf import OmegaConf

    from dtp_search.search.params import run_params

    cfg = OmegaConf.create(
        {
            "seed": 0,
            "cv": {"folds": 3, "repeats": 2},
            "train": {"l1": 0.0, "l1_bias": False, "distill": {"alpha": 0.0, "temperature": 4.0}},
            "policy": {"name": "agp", "scope": "global", "allocation": "erk"},
        }
    )
    params = run_params(cfg)
    assert "train.distill.alpha" in params and "policy.allocation" in params
    for gone in ("train.distill.temperature", "train.l1_bias", "policy.scope", "cv.repeats"):
        assert gone not in params
    cfg.train.distill.alpha, cfg.policy.allocation = 0.5, None
    params = run_params(cfg)
    assert params["train.distill.temperature"] == 4.0 and params["policy.scope"] == "global"
    assert "policy.allocation" not in params


def test_the_config_check_refuses_distillation_without_a_teacher_before_any_training():
    from test_objectives import _cfg

    from dtp_search.search.config import check_config

    with pytest.raises(ConfigError, match=r"^train.distill.alpha=0.5 needs a trained dense"):
        check_config(_cfg("train.distill.alpha=0.5", "policy.start_epoch=0"))
    check_config(_cfg("train.distill.alpha=0.5", "policy.start_epoch=1"))
    with pytest.raises(ConfigError, match=r"train.distill.alpha=1.5 is not allowed"):
        check_config(_cfg("train.distill.alpha=1.5"))


def test_a_study_trains_one_teacher_per_fold_and_logs_its_accuracy(tmp_path):
    """Two distilled trials with different learning rates share the fold's trained
    teacher (one per fold, from the warm-start cache) and log its mean accuracy."""
    from inprocess import study_here

    argv = [
        f"paths.root={tmp_path}",
        "policy=agp",
        "policy.start_epoch=0",  # no dense epoch: the trained teacher makes it allowed
        "search.n_trials=2",
        "~policy.space",  # the policy fixed: only the student's learning rate varies
        "+search.space={train.lr: {type: float, low: 0.03, high: 0.1}}",
        "refit.enabled=false",
        "cv.folds=2",
        "train.epochs=2",
        "train.finetune_epochs=1",
        "train.distill.alpha=0.5",
        "train.distill.teacher_epochs=2",
        "train.distill.teacher_lr=0.05",
        "front.points=0",
        "early_stop=none",
        "console.progress=false",
        "threads=1",
    ]
    cfg, study = study_here(argv)
    trials = study.trials
    assert len(trials) == 2 and len({t.params["train.lr"] for t in trials}) == 2
    teacher = [t.user_attrs["cv_teacher_accuracy"] for t in trials]
    assert teacher[0] == teacher[1] > 0.5  # the same two teachers, trained (chance: 0.1)
    files = list(Path(cfg.paths.warm_start).glob("*.pt"))
    assert len(files) == 2  # one teacher per fold, no dense epochs to cache
