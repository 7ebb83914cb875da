"""dtp_search: hyperparameter search for dynamic threshold pruning."""

__version__ = "0.1.0"
