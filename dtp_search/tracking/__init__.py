"""MLflow tracking: one parent run per study, one nested child run per Optuna trial.

Uses ``MlflowClient`` with explicit run ids instead of the fluent ``mlflow.start_run``
stack, so that the parent run can be re-opened on resume, and so that several worker
processes can log to the same study without sharing any global "active run".

Layout in MLflow (experiment = ``tracking.experiment``, tagged as a model-training
experiment, ``mlflow.experimentKind=custom_model_development``; MLflow 3.17's UI reads that
only where its GenAI | Model training switch is hidden, so the links dtp_search writes
carry ``workflowType=machine_learning``):

* parent run ``<study name>`` — tags ``dtp_search.role=study``, ``dtp_search.study``;
  artifacts ``pareto_front.json`` (a table), ``pareto_front.png``; metrics
  ``n_complete``, ``pareto_size``, ``pareto_hypervolume`` (step = complete trials).
* child run ``trial-<n>`` — tags ``mlflow.parentRunId``, ``dtp_search.role=trial``,
  ``optuna.trial_number``, ``optuna.trial_state``, ``dtp_search.sampled`` (the sampled
  keys); params = the trial's own configuration (:func:`dtp_search.search.params.run_params`),
  the whole resolved config as ``config.yaml``; the dataset as a run input; per-epoch
  metrics ``fold_<k>/{loss,val_accuracy,sparsity,threshold,lr,recovered}`` and fold means
  (step = epoch); the accuracy-versus-sparsity front as ``front.json`` (a table),
  ``front.png``, the image ``front`` (the chart view's image grid) and the metric history
  ``front/accuracy`` whose step is 1000 × sparsity, so that MLflow's own line chart
  overlays the fronts of every trial. When the study's second objective is a cost
  (``flops``, ``params``, ``latency``: fractions of the dense network's), the fronts are
  drawn against it instead (:func:`front_x`): step = 1000 × that fraction.
* child run ``refit-<n>`` — tag ``dtp_search.role=refit`` (its MLflow status says how it
  ended), the trial's ``cv_*`` metrics, ``test_accuracy``, the test front as
  ``front/test_accuracy`` and the model, named ``<study>-refit-<n>``, whose figures
  (``test_accuracy``, ``sparsity``, the measures) are logged linked to it; its description
  (``mlflow.note.content``) holds the two lines that load it. The study run's description
  lists the refits (:mod:`dtp_search.tracking.notes`).
"""

from dtp_search.tracking.dataset import DatasetInfo, describe_dataset
from dtp_search.tracking.front_axis import AXIS_LABELS, FRONT_STEPS, front_x, row_key
from dtp_search.tracking.plots import plot_layer_sparsity, plot_pareto, plot_trial_front
from dtp_search.tracking.probe import check_tracking_uri
from dtp_search.tracking.study_run import StudyTracker
from dtp_search.tracking.tags import STATE_TAG
from dtp_search.tracking.trial_run import TrialRun
from dtp_search.tracking.view import print_runs_urls, runs_url, study_filter, view_key

__all__ = [
    "AXIS_LABELS",
    "FRONT_STEPS",
    "STATE_TAG",
    "DatasetInfo",
    "StudyTracker",
    "TrialRun",
    "check_tracking_uri",
    "describe_dataset",
    "front_x",
    "plot_layer_sparsity",
    "plot_pareto",
    "plot_trial_front",
    "print_runs_urls",
    "row_key",
    "runs_url",
    "study_filter",
    "view_key",
]
