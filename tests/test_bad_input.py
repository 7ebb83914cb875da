"""Bad input gets a one-line error naming the key, the value and what is allowed, exit
status 2, no traceback — before any training, and with the study's stores untouched.

The table runs in this process, the way the command line does (``check_overrides``,
then ``run_study`` until it raises), which keeps it fast; :data:`END_TO_END` runs a case
of each kind through the command line's own steps (``__main__.run``: exit status, stderr,
no traceback), and :data:`IN_A_PROCESS` two of them through ``python -m dtp_search`` itself:
one refused before Hydra's app starts, one inside it."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from images import tree_with_a_bad_file
from inprocess import run_here

from dtp_search.__main__ import CONFIG_DIR, check_overrides, rewrite_aliases
from dtp_search.errors import DatasetError
from dtp_search.search.config import ConfigError
from dtp_search.search.study import run_study
from dtp_search.storage import check_reachable
from dtp_search.tracking import check_tracking_uri

TINY = [
    "cv.folds=2",
    "train.epochs=1",
    "train.finetune_epochs=0",
    "front.points=2",
    "console.progress=false",
    "refit.enabled=false",
    "search.n_trials=1",
]

# (overrides, fragment the one-line message must contain)
CASES = [
    (["model=foo"], "model='foo' is not a known model; allowed: ['custom', 'lenet300'"),
    (["dataset=foo"], "dataset='foo' is not a known dataset; allowed:"),
    (["policy=agpp"], "policy='agpp' is not a known policy; allowed: ['agp'"),
    (["search=bogus"], "search='bogus' is not a known search; allowed: ['bruteforce', 'nsga2'"),
    (["early_stop=bogus"], "early_stop='bogus' is not a known early_stop; allowed: ['median'"),
    (["pruner=bogus"], "early_stop='bogus' is not a known early_stop; allowed: ['median'"),
    (["+experiment=cifarr"], "experiment='cifarr' is not a known experiment"),
    (["trian.epochs=3"], "Could not override 'trian.epochs'"),
    (["train.epochs=[1"], "cannot read the override 'train.epochs=[1'"),
    (["~nokey"], "'nokey' does not exist"),
    (["cv.folds=1"], "cv.folds=1 is not allowed; allowed: an integer >= 2"),
    (["cv.folds=500"], "cv.folds=500 exceeds the smallest class"),
    (["search.n_trials=0"], "search.n_trials=0 is not allowed; allowed: an integer >= 1"),
    (["search.n_trials=many"], "search.n_trials='many' is not allowed; allowed: an integer >= 1"),
    (["seed=abc"], "seed='abc' is not allowed; allowed: an integer in [0, 4294967295]"),
    (["seed=-1"], "seed=-1 is not allowed; allowed: an integer in [0, 4294967295]"),
    (
        ["search.sampler.seed=x"],
        "search.sampler.seed='x' is not allowed; allowed: null or an integer",
    ),
    (["cv.folds=x"], "cv.folds='x' is not allowed; allowed: an integer >= 2"),
    (["threads=many"], "threads='many' is not allowed; allowed: null or an integer >= 1"),
    (["search.max_failures=x"], "search.max_failures='x' is not allowed; allowed: an integer >= 1"),
    (
        ["search.heartbeat_interval=0"],
        "search.heartbeat_interval=0 is not allowed; allowed: an integer >= 1",
    ),
    (
        ["search.grace_period=1.5"],
        "search.grace_period=1.5 is not allowed; allowed: an integer >= 1",
    ),
    (["search.max_retry=-1"], "search.max_retry=-1 is not allowed; allowed: an integer >= 0"),
    (["front.points=x"], "front.points='x' is not allowed; allowed: an integer >= 0"),
    (
        ["dataset.train_limit=0"],
        "dataset.train_limit=0 is not allowed; allowed: null or an integer >= 1",
    ),
    (["search.objectives=[speed]"], "search.objectives=['speed'] is not allowed"),
    (
        ["search.directions=[up,down]"],
        "search.directions=['up', 'down'] is not allowed; allowed: a non-empty list of ['maximize', 'minimize']",
    ),
    (
        ["search.min_sparsity=1.5"],
        "search.min_sparsity=1.5 is not allowed; allowed: null or a number in [0, 1)",
    ),
    (["study.storage=redis://localhost/0"], "allowed schemes: ['sqlite', 'postgresql'"),
    (["study.workers=2"], "study.workers=2 with study.storage="),
    (["study.workers=0"], "study.workers=0 is not allowed"),
    (
        ["study.storage=postgresql://u:p@127.0.0.1:1/db"],
        "study.storage='postgresql://u:***@127.0.0.1:1/db' cannot be opened (",
    ),
    (
        ["tracking.uri=http://127.0.0.1:1"],
        "tracking.uri='http://127.0.0.1:1' cannot be reached (Connection refused); start the tracking "
        "server",
    ),
    (["refit.top_k=0"], "refit.top_k=0 is not allowed"),
    (["refit.register=maybe"], "refit.register='maybe' is not allowed; allowed: true, false"),
    (["mode=bogus"], "mode='bogus' is not allowed; allowed:"),
    (["policy.final_sparsity=1.5"], "policy: final_sparsity must be in [0, 1), got 1.5"),
    (["model=lenet5", "model.padding=[0,0]"], "model=lenet5: model=lenet5 cannot take 8×8 inputs"),
    (
        ["dataset=cifar10", "dataset.path=/nonexistent/cifar"],
        "dataset.path='/nonexistent/cifar' does not exist",
    ),
    (["dataset=imagefolder"], "dataset.path is required for dataset=imagefolder"),
    (
        ["dataset=cifar10", "dataset.path=/nonexistent/cifar", "dataset.skip_bad_files=maybe"],
        "dataset.skip_bad_files='maybe' is not allowed; allowed: true, false",
    ),
    (["train.optimizer=lbfgs"], "train.optimizer='lbfgs' is not allowed; allowed: ['sgd', 'adam']"),
    (["train.epochs=abc"], "train.epochs='abc' is not allowed; allowed: an integer >= 0"),
    (["train.lr=-1"], "train.lr=-1.0 is not allowed; allowed: a number > 0"),
    (["train.momentum=1.5"], "train.momentum=1.5 is not allowed; allowed: a number in [0, 1)"),
    (["paths.root=/proc/dtp-nope"], "paths.root='/proc/dtp-nope' cannot be written"),
    (
        ["study.name=nan"],
        "study.name=nan is not allowed; allowed: a text, quoted when it looks like a number",
    ),
    (
        ["+search.space={train.lr: {type: float, low: 0.1, high: 0.01}}"],
        "search space key 'train.lr': empty range low=0.1 > high=0.01",
    ),
    (
        ["+search.space={train.lr: {type: bogus}}"],
        "search space key 'train.lr': type='bogus' is not allowed; allowed: ['float', 'int', 'categorical']",
    ),
    (["policy=constant", "policy.theta=-0.1"], "policy: theta must be >= 0, got -0.1"),
    (
        ["front.update_samples=0"],
        "front.update_samples=0 is not allowed; allowed: null or an integer >= 1",
    ),
    (
        ["front.max_sparsity=1.5"],
        "front.max_sparsity=1.5 is not allowed; allowed: a number in (0, 1)",
    ),
    (
        ["policy.on_collapse=fail"],
        "on_collapse='fail' is not allowed; allowed: ['restore', 'prune', 'penalize']",
    ),
    # A resume that would change what the study's trials mean (provenance.py).
    (
        ["policy=splicing"],
        "study.name='kept' was created with another configuration "
        "(policy.name: 'agp' -> 'splicing'",
    ),
    (["model=mlp"], "(model.name: 'lenet300' -> 'mlp'"),
    (["train.epochs=2"], "train.epochs: 1 -> 2"),
    (["dataset.train_limit=500"], "(dataset.digest: '"),
    (
        ["study.allow_changes=5"],
        "study.allow_changes=5 is not allowed; allowed: a list of config keys",
    ),
    (
        ["policy.min_keep=2.5"],
        "min_keep=2.5 is not allowed; allowed: a fraction in [0, 1) or a whole count",
    ),
    (
        ["search.objectives=[accuracy,speed]"],
        "search.objectives=['accuracy', 'speed'] is not allowed",
    ),
    (["policy.granularity=channel"], "allowed here: ['weight', 'neuron']"),
    (["policy.granularity=filter"], "granularity='filter'"),
    (["policy.criterion=hessian"], "policy.criterion='hessian'"),
    (["train.l1=-1"], "train.l1=-1.0 is not allowed; allowed: a number >= 0"),
    (["policy=choice", "policy.choices=[agp,bogus]"], "policy.choices=['agp', 'bogus']"),
    # The user's own network (model=custom; tests/user_nets.py is "the user's package").
    (["model=custom"], "model._target_ is required"),
    (["+model.width=3"], "model.width is not a setting; allowed keys of model:"),
    (
        ["model=custom", "model._target_=user_nets_nowhere.Net"],
        "model._target_='user_nets_nowhere.Net' cannot be imported (No module named 'user_nets_nowhere')",
    ),
    (
        ["model=custom", "model._target_=user_nets.broken"],
        "model._target_='user_nets.broken' raised RuntimeError: width must be even",
    ),
    (
        ["model=custom", "model._target_=user_nets.not_a_module"],
        "model._target_='user_nets.not_a_module' returned a str",
    ),
    (
        ["model=custom", "model._target_=user_nets.TinyConvNet", "+model.num_classes=7"],
        "model: the network's output has shape [2, 7] for an input batch of shape [2, 1, 8, 8]; "
        "allowed: [batch, num_classes] = [2, 10]",
    ),
    (
        ["model=custom", "model._target_=user_nets.TinyConvNet", "+model.in_channels=3"],
        "model: the network cannot take the dataset's input batch of shape [2, 1, 8, 8] (RuntimeError",
    ),
    # The user's own data (dataset=custom/torchvision; factories in tests/test_user_data.py).
    (
        ["dataset=custom", "dataset._target_=test_user_data.three_things"],
        "returned a tuple of 3 (Pairs, Pairs, Pairs); allowed: (train, test), two map-style datasets",
    ),
    (
        ["dataset=custom", "dataset._target_=test_user_data.labelled_beyond_classes"],
        "the test split holds the label 7",
    ),
    (
        ["dataset=torchvision", "dataset._target_=torchvision.datasets.NoSuchSet"],
        "dataset._target_='torchvision.datasets.NoSuchSet' cannot be imported",
    ),
    (
        ["dataset.name=fashionmnist"],
        "dataset.name='fashionmnist' names another dataset than dataset=digits loads",
    ),
    (
        ["model.checkpoint=/nonexistent/weights.pt"],
        "model.checkpoint='/nonexistent/weights.pt' does not exist",
    ),
]
# One case of each kind through the real command line: a Hydra-level error, a config
# check, a data check, a refused resume, a deprecated alias (which warns first) and the
# two probes of servers nobody listens on.
END_TO_END = [
    "model=foo",
    "cv.folds=1",
    "dataset=cifar10 dataset.path=/nonexistent/cifar",
    "policy=splicing",
    "pruner=bogus",
    "study.storage=postgresql://u:p@127.0.0.1:1/db",
    "tracking.uri=http://127.0.0.1:1",
]
# Run as a real process too (each start costs about 9 CPU-seconds of imports): a typo caught
# by the override check before Hydra's app starts, and a rule broken inside Hydra's app.
IN_A_PROCESS = ["model=foo", "cv.folds=1"]
# Cases that wait on the network: seconds each may take (the probes give up after 5 s;
# MLflow's own retries took over two minutes). Unreachable servers must be refused
# quickly, not after a long retry loop; these run in this process, so the bound is the
# probes' own, without an interpreter's start.
WITHIN = {
    "study.storage=postgresql://u:p@127.0.0.1:1/db": 60,
    "tracking.uri=http://127.0.0.1:1": 60,
}


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


@pytest.fixture(scope="module")
def study_root(tmp_path_factory) -> Path:
    """A folder whose study already holds one finished trial (run in this process)."""
    root = tmp_path_factory.mktemp("bad") / "runs"
    proc = run_here(root, "study.name=kept", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def _assert_refused(
    study_root: Path,
    overrides: list[str],
    fragment: str,
    *,
    env: dict[str, str] | None = None,
    within: float = 600,
    in_process: bool = False,
) -> str:
    """Run the CLI on the kept study with ``overrides``: exit 2, one ``error:`` line holding
    ``fragment``, no traceback, the stores byte for byte as they were. Returns the line.
    ``in_process``: the command line's path in this process (``inprocess.run_here``)
    instead of ``python -m dtp_search``."""
    stores = [study_root / "optuna.db", study_root / "mlflow.db"]
    before = [_digest(p) for p in stores]
    root = (
        [] if any(o.startswith("paths.root=") for o in overrides) else [f"paths.root={study_root}"]
    )
    start = time.monotonic()
    if in_process:
        assert root and env is None, "in_process: on the kept study's folder, this environment"
        proc = run_here(study_root, "study.name=kept", *TINY, *overrides)
    else:
        proc = subprocess.run(
            [sys.executable, "-m", "dtp_search", *root, "study.name=kept", *TINY, *overrides],
            capture_output=True,
            text=True,
            cwd=study_root.parent,
            timeout=within,
            env=None if env is None else {**os.environ, **env},
        )
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and fragment in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert [_digest(p) for p in stores] == before  # byte for byte
    assert elapsed < within
    return errors[0]


def _refused_in_process(study_root: Path, overrides: list[str], fragment: str) -> str:
    """What ``python -m dtp_search`` does with ``overrides`` on the kept study, in this
    process: the override check, then the run up to its error. The message holds
    ``fragment`` on one line and the stores are byte for byte as they were."""
    stores = [study_root / "optuna.db", study_root / "mlflow.db"]
    before = [_digest(p) for p in stores]
    root = (
        [] if any(o.startswith("paths.root=") for o in overrides) else [f"paths.root={study_root}"]
    )
    argv = rewrite_aliases([*root, "study.name=kept", *TINY, *overrides])
    message = check_overrides(argv)
    if message is None:
        with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
            cfg = compose("config", overrides=argv)
        with pytest.raises((ConfigError, DatasetError)) as err:
            run_study(cfg)
        message = str(err.value)
    assert fragment in message and "\n" not in message, message
    assert [_digest(p) for p in stores] == before  # byte for byte
    return message


@pytest.mark.parametrize(("overrides", "fragment"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_is_one_line_before_any_work_and_touches_nothing(study_root, overrides, fragment):
    _refused_in_process(study_root, overrides, fragment)


@pytest.mark.slow
@pytest.mark.parametrize("case", END_TO_END)
def test_bad_input_exits_2_with_one_line_and_no_traceback(study_root, case):
    ((overrides, fragment),) = [c for c in CASES if " ".join(c[0]) == case]
    _assert_refused(study_root, overrides, fragment, within=WITHIN.get(case, 600), in_process=True)


@pytest.mark.slow
@pytest.mark.parametrize("case", IN_A_PROCESS)
def test_bad_input_exits_2_from_a_real_process(study_root, case):
    ((overrides, fragment),) = [c for c in CASES if " ".join(c[0]) == case]
    _assert_refused(study_root, overrides, fragment)


@pytest.mark.slow
def test_a_corrupt_image_is_named_and_leaves_no_cache_entry(study_root, tmp_path):
    tree = tmp_path / "tree"
    bad = tree_with_a_bad_file(tree)
    cache = tmp_path / "cache"
    line = _assert_refused(
        study_root,
        ["dataset=imagefolder", f"dataset.path={tree}", f"paths.cache_dir={cache}"],
        f"cannot decode the image {bad} (",
        in_process=True,
    )
    assert "dataset.skip_bad_files=true" in line
    assert not list(cache.glob("imagefolder-*"))  # a failed decode caches nothing


@pytest.mark.slow
def test_a_failed_cifar10_download_says_why_and_how_to_work_offline(study_root, tmp_path):
    # A proxy nobody listens on: urllib (torchvision's download) fails at once, whether
    # or not this machine has network.
    proxy = "http://127.0.0.1:1"
    env = {
        "http_proxy": proxy,
        "https_proxy": proxy,
        "HTTP_PROXY": proxy,
        "HTTPS_PROXY": proxy,
        "no_proxy": "",
        "NO_PROXY": "",
    }
    data = tmp_path / "data"
    line = _assert_refused(
        study_root,
        ["dataset=cifar10", f"paths.data_dir={data}"],
        f"downloading CIFAR-10 into dataset.root={str(data)!r} failed (",
        env=env,
    )  # a process of its own: urllib caches its proxies
    assert "point dataset.path at a local ImageFolder copy, e.g. dataset.path=" in line


@pytest.mark.parametrize(
    ("blob", "fragment"),
    [
        (
            "other network",
            "does not fit the network (4 missing keys: net.3.weight, net.3.bias, "
            "net.5.weight and 1 more; 2 unexpected keys: head.weight, head.bias; 1 shape "
            "mismatches (checkpoint vs network): net.1.weight [300, 32] vs [300, 64])",
        ),
        ("no state", "holds no state_dict (found ['epoch'])"),
    ],
)
def test_a_checkpoint_that_does_not_fit_is_refused(study_root, tmp_path, blob, fragment):
    from torch import nn

    path = tmp_path / "weights.pt"
    if blob == "other network":  # lenet300's first layer, then another head
        net = nn.Sequential(nn.Flatten(), nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 10))
        state = {
            k.replace("1.", "net.1.", 1): v
            for k, v in net.state_dict().items()
            if k.startswith("1.")
        }
        state["net.1.weight"] = state["net.1.weight"][:, :32]
        state.update({"head.weight": net[3].weight, "head.bias": net[3].bias})
        torch.save(state, path)
    else:
        torch.save({"epoch": 3}, path)
    _refused_in_process(study_root, [f"model.checkpoint={path}"], fragment)


def test_probes_of_servers_nobody_listens_on_fail_fast_and_mask_the_password():
    start = time.monotonic()
    with pytest.raises(
        ConfigError, match=r"postgresql://u:\*\*\*@127\.0\.0\.1:1/db' cannot be opened"
    ):
        check_reachable("postgresql://u:s3cret@127.0.0.1:1/db")
    with pytest.raises(ConfigError, match=r"'http://u:\*\*\*@127\.0\.0\.1:1' cannot be reached"):
        check_tracking_uri("http://u:s3cret@127.0.0.1:1")
    assert time.monotonic() - start < 10
    check_reachable("sqlite:////tmp/optuna.db")  # files are not probed
    check_tracking_uri("sqlite:////tmp/mlflow.db")
