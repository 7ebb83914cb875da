"""A fold checkpointed after any epoch and resumed in a fresh model gives exactly the
result of the uninterrupted run (CPU), for every kind of policy state."""

import io

import pytest
import torch
from omegaconf import OmegaConf

from dtp_search.data import load_dataset
from dtp_search.models import build_model
from dtp_search.search.config import build_pruner
from dtp_search.settings import DistillSettings, FrontSettings, TrainSettings
from dtp_search.training import FoldHooks, cross_validate
from dtp_search.training.checkpoint import TrialCheckpoint


class Stop(Exception):
    pass


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # what a retry does: no pickled code


POLICIES = {
    "agp": {
        "name": "agp",
        "final_sparsity": 0.8,
        "start_epoch": 0.0,
        "end_epoch": 2,
        "update_every": 5,
        "criterion": "taylor",
    },
    "splicing": {"name": "splicing", "c": 0.5, "gamma": 0.01, "power": 1.0, "seed": 3},
    "feedback": {"name": "feedback", "step": 0.3, "update_every": 5},
    "soft_threshold": {"name": "soft_threshold", "s_init": -3.0},
    "random": {"name": "random", "sparsity": 0.5, "start_epoch": 1.0},
    "agp_neuron": {
        "name": "agp",
        "final_sparsity": 0.5,
        "end_epoch": 2,
        "update_every": 5,
        "granularity": "neuron",
        "scope": "layer",
        "criterion": "activation",
    },
    "agp_distill": {"name": "agp", "final_sparsity": 0.8, "start_epoch": 1, "end_epoch": 2},
    "agp_distill_trained": {"name": "agp", "final_sparsity": 0.8, "start_epoch": 1, "end_epoch": 2},
    # Recovery, under one OneCycle schedule that runs on through fine-tuning.
    "agp_recover_onecycle": {
        "name": "agp",
        "final_sparsity": 0.8,
        "end_epoch": 2,
        "update_every": 5,
        "recover": True,
    },
}
SCHEDULES = {
    "agp_recover_onecycle": {"lr_schedule": "onecycle", "finetune_lr_schedule": "continue"},
    # the teacher (taken after the dense epoch) travels in the checkpoint
    "agp_distill": {"distill": DistillSettings(alpha=0.5, temperature=2.0)},
    # a teacher trained first: trained again (alike) when a state from before it took
    # over is resumed, carried in the checkpoint after
    "agp_distill_trained": {"distill": DistillSettings(alpha=0.5, teacher_epochs=2)},
}


@pytest.mark.parametrize("policy", list(POLICIES))
def test_resume_from_any_epoch_reproduces_the_uninterrupted_run(policy):
    ds = load_dataset(OmegaConf.create({"kind": "digits", "name": "digits"}))
    model_cfg = OmegaConf.create({"arch": "mlp", "hidden": [32, 16]})
    policy_cfg = OmegaConf.create(POLICIES[policy])
    settings = TrainSettings(
        epochs=3, finetune_epochs=2, lr=0.05, batch_size=128, **SCHEDULES.get(policy, {})
    )
    example = torch.zeros(1, *ds.input_shape)

    def run(resume=None, **hooks):
        return cross_validate(
            ds,
            folds=2,
            seed=1,
            make_model=lambda: build_model(model_cfg, ds.input_shape, 10),
            make_pruner=lambda m: build_pruner(m, policy_cfg, example),
            settings=settings,
            front=FrontSettings(points=3),
            hooks=FoldHooks(**hooks),
            resume=resume,
        )

    full = run()
    # Stop mid-pruning, in fine-tuning, and at the end of the pruning phase.
    for stop_fold, stop_epoch in ((0, 1), (0, 4), (1, 2), (1, 3)):
        saved = {}

        def on_checkpoint(state, stop_fold=stop_fold, stop_epoch=stop_epoch, saved=saved):
            saved["state"] = _roundtrip(state)
            if state["fold"] == stop_fold and state["train"]["epoch"] == stop_epoch:
                raise Stop

        with pytest.raises(Stop):
            run(on_checkpoint=on_checkpoint)
        replayed = []
        resumed = run(
            resume=saved["state"], on_epoch=lambda k, r, out=replayed: out.append((k, r.epoch))
        )
        assert replayed == [(k, e) for k in range(2) for e in range(1, 6)]
        for a, b in zip(full.folds, resumed.folds, strict=True):
            assert a.accuracy == b.accuracy and a.sparsity == b.sparsity
            assert [r.loss for r in a.history] == [r.loss for r in b.history]
            assert [(p.sparsity, p.accuracy) for p in a.front] == [
                (p.sparsity, p.accuracy) for p in b.front
            ]


def test_trial_checkpoint_is_atomic_keyed_and_cleared(tmp_path):
    ckpt = TrialCheckpoint(tmp_path / "s", lineage=4, config_key="abc")
    assert ckpt.load() is None
    ckpt.save({"fold": 1, "train": {"epoch": 2, "w": torch.ones(3)}, "folds": []})
    assert list((tmp_path / "s").iterdir()) == [ckpt.path]  # no temporary file left over
    state = ckpt.load()
    assert state["fold"] == 1 and torch.equal(state["train"]["w"], torch.ones(3))
    # A retry under another config (the user changed an override) must not resume.
    assert TrialCheckpoint(tmp_path / "s", lineage=4, config_key="other").load() is None
    ckpt.clear()
    assert not ckpt.path.exists()


@pytest.mark.parametrize("schedule", ["cosine", "onecycle", "step", "constant"])
def test_lr_schedules_span_their_phase_or_both(schedule):
    ds = load_dataset(OmegaConf.create({"kind": "digits", "name": "digits"}))
    model_cfg = OmegaConf.create({"arch": "mlp", "hidden": [16]})
    example = torch.zeros(1, *ds.input_shape)

    def lrs(**kw):
        settings = TrainSettings(
            epochs=4, finetune_epochs=2, lr=0.1, batch_size=256, lr_schedule=schedule, **kw
        )
        result = cross_validate(
            ds,
            folds=2,
            seed=0,
            make_model=lambda: build_model(model_cfg, ds.input_shape, 10),
            make_pruner=lambda m: build_pruner(m, OmegaConf.create({"name": "dense"}), example),
            settings=settings,
            front=FrontSettings(points=0),
        )
        return [r.lr for r in result.folds[0].history]

    prune = lrs()[:4]
    if schedule == "constant":
        assert prune == [0.1] * 4
    elif schedule == "step":  # x0.1 after half, x0.01 after three quarters of the phase
        assert prune == pytest.approx([0.1, 0.01, 0.001, 0.001])
    elif schedule == "cosine":
        assert prune[0] > prune[1] > prune[2] > prune[3] == pytest.approx(0.0, abs=1e-12)
    else:  # warm-up from lr / 25 to the peak at 30 % of the phase, then annealed
        assert 0.1 / 25 < prune[0] <= 0.1 and prune[0] > prune[1] > prune[2] > prune[3]
    # "continue": the pruning phase's schedule spans both phases, one optimizer throughout.
    both = lrs(finetune_lr_schedule="continue")
    separate = lrs(finetune_lr_schedule="constant", finetune_lr_scale=0.5)
    # "rewind": fine-tuning replays the pruning phase's schedule from its start
    assert lrs(finetune_lr_schedule="rewind")[4:] == pytest.approx(prune[:2], rel=1e-12)
    assert separate[4:] == pytest.approx([0.05, 0.05])
    if schedule == "constant":
        assert both == [0.1] * 6
    else:
        assert both[3] > both[5] and both[:4] != prune
