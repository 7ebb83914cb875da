"""The search: a study of prune-and-train trials, run by Optuna.

``config`` turns the composed Hydra config into typed settings and the Optuna parts;
``space`` samples a trial's config; ``trial`` cross-validates it; ``early_stop`` and
``fidelity`` stop a trial early; ``study`` runs (and resumes) the study, ``workers`` its
processes, ``refit`` the chosen trials on the whole training split; ``provenance``
keeps a study's config from drifting; ``preflight`` checks the machine and the data first.
"""
