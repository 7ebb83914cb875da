"""The trial record: the names under which a trial, a refit and a study are written.

One table for every writer and every reader — the Optuna user attributes of a trial and
of the study, the MLflow metrics of a trial run, dtp_search's MLflow tags — so that no
module spells a name of its own. Stored studies keep the names they were written with:
a name here is added, never renamed.
"""

from __future__ import annotations

# MLflow metrics of a trial run, per epoch: per fold as ``fold_<k>/<name>``, and their
# mean over the folds under the name itself (the mean has no learning rate).
EPOCH_METRICS = ("loss", "val_accuracy", "sparsity", "threshold", "lr", "recovered")
MEAN_EPOCH_METRICS = ("loss", "val_accuracy", "sparsity", "threshold", "recovered")


def cv(measure: str) -> str:
    """The cross-validated mean of ``measure`` (``accuracy``, ``sparsity``, a cost): an
    MLflow metric of the trial run and an Optuna user attribute of the trial."""
    return f"cv_{measure}"


def cv_std(measure: str) -> str:
    """The standard deviation over the folds of ``measure`` (see :func:`cv`)."""
    return f"cv_{measure}_std"


CV_ACCURACY = cv("accuracy")
CV_ACCURACY_STD = cv_std("accuracy")
CV_SPARSITY = cv("sparsity")
CV_SPARSITY_STD = cv_std("sparsity")
CV_FOLDS = "cv_folds"  # the fold results behind the CV means: cv.folds · cv.repeats

# Optuna user attributes of a trial.
POLICY = "policy"  # the policy's name
TRIAL = "trial"  # its own number (a re-queued trial's copy names the one it repeats)
LINEAGE = "lineage"  # the first trial of a retry chain: it names the checkpoint
WORKER = "worker"  # host:pid of the process that ran it
RESUMED_FROM = "resumed_from"  # the checkpoint a retry resumed from, in words
MLFLOW_RUN_ID = "mlflow_run_id"
FRONT = "front"  # fold 0's [x, accuracy] points, x on the study's axis
FLOORED_LAYERS = "floored_layers"  # layers that ended at the min_keep floor
MIN_KEEP_RESTORED = "min_keep_restored"  # {layer: times the floor overrode the policy}
DOMINATED_BY = "dominated_by"  # the trial whose point stopped this one early
FAIL_REASON = "fail_reason"  # also an MLflow tag
PRUNE_REASON = "prune_reason"  # also an MLflow tag

# Optuna user attributes of the study.
OBJECTIVES = "objectives"  # search.objectives, as the study began with them
REFIT = "refit"  # {trial: its refit's run id, test accuracy, sparsity, measures, ...}
CHECKPOINT_BASELINE = "checkpoint_baseline"  # model.checkpoint's test accuracy, not pruned
CONFIG_CHANGES = "config_changes"  # the allowed changes of the defining config, in order


# MLflow tags only (dtp_search.<name>, see :func:`tag`); the attributes above are tags too.
RETRY_OF = "retry_of"  # a retry's run: the trial it repeats
RUNG = "rung"  # 0 = stopped at the reduced budget, 1 = ran the full budget (also an attribute)
RUNG_REASON = "rung_reason"
MODEL_URI = "model_uri"  # a refit run: its logged MLflow model


def tag(name: str) -> str:
    """dtp_search's MLflow tag ``name`` (``dtp_search.<name>``)."""
    return f"dtp_search.{name}"
