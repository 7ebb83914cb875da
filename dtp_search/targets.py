"""``_target_``: the dotted path by which a config names the user's own code (a network
factory, a dataset class or factory), after Hydra's ``instantiate`` convention."""

from __future__ import annotations

import importlib
from typing import Any

from dtp_search.errors import ConfigError

__all__ = ["locate"]

IMPORTABLE = "a dotted path importable from PYTHONPATH"


def locate(
    path: str, key: str, *, error: type[ValueError] = ConfigError, allowed: str = IMPORTABLE
) -> Any:
    """The object a dotted ``path`` names (``torchvision.models.resnet18``,
    ``mypackage.nets.MyNet``): the longest importable module prefix, then attributes.

    Raises ``error`` (:class:`~dtp_search.errors.ConfigError` by default) as one line
    ``<key>='<path>' cannot be imported (<why>); allowed: <allowed>``. Hydra's
    ``get_object`` does the same lookup, but its errors run over several lines and wrap
    the ``ModuleNotFoundError`` that says what is missing.
    """
    parts = str(path).split(".")

    def fail(why: str) -> ValueError:
        return error(f"{key}={path!r} cannot be imported ({why}); allowed: {allowed}")

    if not all(parts):
        raise fail("not a dotted path")
    missing = None
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # Only the module asked for being absent means "try a shorter prefix"; a module
            # that exists but cannot import a dependency of its own is the answer.
            if exc.name is not None and not module_name.startswith(exc.name):
                raise fail(str(exc)) from exc
            missing = missing or exc
            continue
        except Exception as exc:  # the module itself raised on import
            raise fail(f"{type(exc).__name__}: {exc}") from exc
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                raise fail(
                    f"module {getattr(obj, '__name__', module_name)!r} has no attribute {attr!r}"
                )
            obj = getattr(obj, attr)
        return obj
    raise fail(str(missing))
