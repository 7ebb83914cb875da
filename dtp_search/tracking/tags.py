"""The tags that mark dtp_search's experiments and runs in MLflow (their roles, the study
and the Optuna trial they belong to), read back to find and filter them."""

ROLE_TAG, STUDY_TAG = "dtp_search.role", "dtp_search.study"
TRIAL_TAG, STATE_TAG = "optuna.trial_number", "optuna.trial_state"
REFIT_TAG, SAMPLED_TAG = "dtp_search.refit_of", "dtp_search.sampled"
# The UI's experiment kind: "custom_model_development" is its model-training workflow (MLflow
# 3.17's UI reads it only where its GenAI | Model training switch is hidden; elsewhere the
# URL's workflowType or the browser's remembered choice decides).
KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
