"""Which prunable layers a pruner masks: ``include``/``exclude`` globs over layer names."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass


def _patterns(value: str | Iterable[str] | None, key: str) -> tuple[str, ...]:
    if value is None:  # an unset (null) config entry: no globs
        return ()
    if isinstance(value, str):  # one glob, not a sequence of one-letter globs
        value = (value,)
    try:
        out = tuple(value)
    except TypeError:
        raise ValueError(f"layers.{key} must be a list of globs, got {value!r}") from None
    for p in out:
        if not isinstance(p, str) or not p:
            raise ValueError(f"layers.{key} must be a list of non-empty globs, got {p!r}")
    return out


@dataclass(frozen=True)
class LayerSelection:
    """Which prunable layers a pruner masks; the others stay dense and untouched.

    ``include`` and ``exclude`` are ``fnmatch`` globs (case-sensitive) over the layer names
    of :func:`prunable_tensors`: module names as ``model.named_modules()`` gives them
    (``"features.*"``, ``"classifier.4"``; ``""`` is a model that is itself one layer), and
    ``"<attention>.in_proj"`` (or ``.q_proj``/``.k_proj``/``.v_proj``) for the input
    projection of an ``nn.MultiheadAttention`` (``"*.in_proj"`` selects them all, and
    ``"encoder.*"`` both projections of every attention under ``encoder``). A layer is selected when it matches an ``include``
    glob (or ``include`` is empty: every prunable layer) and no ``exclude`` glob.
    ``exclude_classifier`` leaves out the *classifier*, defined as the last prunable layer
    of the model in :func:`prunable_tensors` order (the output Linear of every builder in
    :mod:`dtp_search.models`, and of most user networks), whatever the globs say.

    A glob that matches no prunable layer is a mistake (a typo, or a container's name
    such as ``"features"`` instead of ``"features.*"``), as is a selection of no layer:
    :meth:`select` raises ``ValueError`` listing the prunable layers.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    exclude_classifier: bool = False

    def __post_init__(self) -> None:
        # Accept lists (and Hydra ListConfigs) but store tuples: the dataclass is frozen
        # and hashable.
        object.__setattr__(self, "include", _patterns(self.include, "include"))
        object.__setattr__(self, "exclude", _patterns(self.exclude, "exclude"))
        if not isinstance(self.exclude_classifier, bool):
            raise ValueError(
                f"exclude_classifier must be true or false, got {self.exclude_classifier!r}"
            )

    def select(self, names: Iterable[str]) -> list[str]:
        """The selected ones of the prunable layer ``names`` (in model order), in their order."""
        names = list(names)
        listing = f"prunable layers: {names}"
        for key, globs in (("include", self.include), ("exclude", self.exclude)):
            for glob in globs:
                if not any(fnmatch.fnmatchcase(n, glob) for n in names):
                    raise ValueError(
                        f"layers.{key} glob {glob!r} matches no prunable layer; {listing}"
                    )
        chosen = [
            n
            for n in names
            if (not self.include or any(fnmatch.fnmatchcase(n, g) for g in self.include))
            and not any(fnmatch.fnmatchcase(n, g) for g in self.exclude)
        ]
        if self.exclude_classifier and names:
            chosen = [n for n in chosen if n != names[-1]]
        if not chosen:
            raise ValueError(
                f"the layer selection (include={list(self.include)}, "
                f"exclude={list(self.exclude)}, exclude_classifier="
                f"{self.exclude_classifier}) selects no layer; {listing}"
            )
        return chosen
