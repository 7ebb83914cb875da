"""The dense warm-start cache: a trial that takes its dense epochs from the cache gets
exactly the result it would have trained itself (CPU), and only trials that would train
the same dense epochs share them."""

import pytest
import torch
from omegaconf import OmegaConf

from dtp_search.data import load_dataset
from dtp_search.models import build_model
from dtp_search.pruning import build_policy
from dtp_search.search.config import build_pruner
from dtp_search.settings import DatasetSettings, FrontSettings, Settings, TrainSettings
from dtp_search.training import FoldHooks, WarmStart, cross_validate
from dtp_search.training.warmstart import WarmStartCache

DIGITS = {"kind": "digits", "name": "digits"}


@pytest.fixture(scope="module")
def ds():
    return load_dataset(OmegaConf.create(DIGITS))


def run(
    ds, policy: dict, settings: TrainSettings, cache: WarmStartCache | None = None, on_epoch=None
):
    model_cfg = OmegaConf.create({"arch": "mlp", "hidden": [32, 16]})
    example = torch.zeros(1, *ds.input_shape)
    return cross_validate(
        ds,
        folds=2,
        seed=1,
        make_model=lambda: build_model(model_cfg, ds.input_shape, 10),
        make_pruner=lambda m: build_pruner(m, OmegaConf.create(policy), example),
        settings=settings,
        front=FrontSettings(points=3),
        hooks=FoldHooks(on_epoch=on_epoch),
        warm_start=None if cache is None else WarmStart(cache, context=DIGITS),
    )


def same(a, b) -> None:
    for fa, fb in zip(a.folds, b.folds, strict=True):
        assert fa.accuracy == fb.accuracy and fa.sparsity == fb.sparsity
        assert [(r.loss, r.val_accuracy, r.sparsity) for r in fa.history] == [
            (r.loss, r.val_accuracy, r.sparsity) for r in fb.history
        ]
        assert [(p.sparsity, p.accuracy) for p in fa.front] == [
            (p.sparsity, p.accuracy) for p in fb.front
        ]


AGP = {"name": "agp", "final_sparsity": 0.8, "start_epoch": 2, "end_epoch": 3, "update_every": 5}
SETTINGS = TrainSettings(epochs=4, finetune_epochs=1, lr=0.05, batch_size=128)


def test_cached_dense_epochs_reproduce_the_uncached_trial(ds, tmp_path):
    cache = WarmStartCache(tmp_path)
    plain = run(ds, AGP, SETTINGS)
    stored = run(ds, AGP, SETTINGS, cache)
    assert (cache.stores, cache.hits) == (2, 0)  # one state per fold
    assert [f.warm_start_epochs for f in stored.folds] == [0, 0]
    epochs = []
    warm = run(ds, AGP, SETTINGS, cache, on_epoch=lambda k, r: epochs.append((k, r.epoch)))
    assert (cache.stores, cache.hits) == (2, 2)
    assert [f.warm_start_epochs for f in warm.folds] == [2, 2]
    assert epochs == [(k, e) for k in range(2) for e in range(1, 6)]  # curves stay whole
    same(plain, stored)
    same(plain, warm)


def test_policies_that_differ_after_the_dense_epochs_share_them(ds, tmp_path):
    cache = WarmStartCache(tmp_path)
    run(ds, AGP, SETTINGS, cache)
    other = {**AGP, "final_sparsity": 0.5, "scope": "layer"}
    warm = run(ds, other, SETTINGS, cache)
    assert cache.hits == 2
    same(run(ds, other, SETTINGS), warm)
    # Another policy with the same dense warm-up shares it too.
    scheduled = {
        "name": "scheduled",
        "theta_start": 0.0,
        "theta_end": 0.05,
        "start_epoch": 2,
        "end_epoch": 3,
        "update_every": 5,
    }
    run(ds, scheduled, SETTINGS, cache)
    assert cache.hits == 4


@pytest.mark.parametrize(
    "change",
    [
        {"settings": TrainSettings(epochs=4, finetune_epochs=1, lr=0.02, batch_size=128)},
        {"settings": TrainSettings(epochs=5, finetune_epochs=1, lr=0.05, batch_size=128)},
        {"policy": {**AGP, "start_epoch": 1}},
        {"policy": {**AGP, "criterion": "taylor"}},
    ],
)
def test_anything_the_dense_epochs_depend_on_misses_the_cache(ds, tmp_path, change):
    cache = WarmStartCache(tmp_path)
    run(ds, AGP, SETTINGS, cache)
    run(ds, change.get("policy", AGP), change.get("settings", SETTINGS), cache)
    assert cache.hits == 0 and cache.stores == 4


def test_dense_epochs_per_policy():
    assert (
        build_policy(
            "agp", {"final_sparsity": 0.9, "start_epoch": 2.5, "end_epoch": 5}
        ).dense_epochs(10)
        == 2
    )
    assert (
        build_policy("agp", {"final_sparsity": 0.9, "start_epoch": 0, "end_epoch": 5}).dense_epochs(
            10
        )
        == 0
    )
    assert build_policy("oneshot_global", {"amount": 0.9}).dense_epochs(10) == 10
    assert build_policy("soft_threshold", {"start_epoch": 3}).dense_epochs(10) == 0


def test_oneshot_global_trains_its_dense_network_once(ds, tmp_path):
    cache = WarmStartCache(tmp_path)
    first = run(ds, {"name": "oneshot_global", "amount": 0.9}, SETTINGS, cache)
    second = run(ds, {"name": "oneshot_global", "amount": 0.5}, SETTINGS, cache)
    assert cache.hits == 2 and [f.warm_start_epochs for f in second.folds] == [4, 4]
    assert first.sparsity > second.sparsity
    same(run(ds, {"name": "oneshot_global", "amount": 0.5}, SETTINGS), second)


def test_a_post_pruning_studys_refits_train_their_dense_epochs_once(tmp_path):
    """Post-pruning (the threshold applied after the last epoch) keeps every trial dense
    to the end: the first refit trains those epochs, the others take them from the
    cache (refit runs' warm_start_epochs), and their test figures still differ by θ."""
    import mlflow
    from hydra import compose, initialize_config_dir
    from inprocess import isolated, premake_store

    from dtp_search.__main__ import CONFIG_DIR
    from dtp_search.search.study import run_study

    argv = [
        f"paths.root={tmp_path}",
        "policy=constant",
        "policy.start_epoch=${train.epochs}",
        "+policy.space.start_epoch={type: categorical, choices: ['${train.epochs}']}",
        "search.n_trials=2",
        "refit.trials=all",
        "cv.folds=2",
        "train.epochs=2",
        "train.finetune_epochs=0",
        "front.points=0",
        "early_stop=none",
        "console.progress=false",
        "threads=1",
        "seed=2",
    ]
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=argv)
    premake_store(tmp_path)  # an empty MLflow store: the run creates its experiment and runs
    with isolated():  # MLflow's global tracking URI (and MLFLOW_TRACKING_URI) set back after
        study = run_study(cfg)
        refits = study.user_attrs["refit"]
        assert len(refits) == 2
        mlflow.set_tracking_uri(cfg.tracking.uri)
        warmed = sorted(
            mlflow.get_run(r["run_id"]).data.metrics["warm_start_epochs"] for r in refits.values()
        )
    assert warmed == [0.0, 2.0]
    assert len({r["sparsity"] for r in refits.values()}) == 2


def test_data_edited_in_place_misses_the_cache(ds, tmp_path):
    """The same dataset config with other file contents (another content digest, as
    config.make_warm_start passes it) trains its dense epochs anew."""
    from dtp_search.search.config import make_warm_start

    s = Settings(dataset=DatasetSettings(**DIGITS))
    s.paths.warm_start = str(tmp_path)
    before = make_warm_start(s, "digest-before")
    after = make_warm_start(s, "digest-after")
    for warm in (before, after):
        cross_validate(
            ds,
            folds=2,
            seed=1,
            make_model=lambda: build_model(
                OmegaConf.create({"arch": "mlp", "hidden": [32, 16]}), ds.input_shape, 10
            ),
            make_pruner=lambda m: build_pruner(
                m, OmegaConf.create(AGP), torch.zeros(1, *ds.input_shape)
            ),
            settings=SETTINGS,
            front=FrontSettings(points=3),
            warm_start=warm,
        )
    assert before.cache.hits == 0 and after.cache.hits == 0
    assert len(list(tmp_path.glob("*.pt"))) == 4  # two states per data content
