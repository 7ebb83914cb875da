"""dtp_search: search for the best dynamic-threshold-pruning policy with Optuna, tracked in MLflow."""

__version__ = "0.1.0"
__all__ = ["load_pruned"]


def __getattr__(name: str):
    # Lazy, so that `import dtp_search.pruning` stays a plain-PyTorch import.
    if name == "load_pruned":
        from dtp_search.models.export import load_pruned

        return load_pruned
    raise AttributeError(f"module 'dtp_search' has no attribute {name!r}")
