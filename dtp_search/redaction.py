"""Database passwords kept out of everything a run writes or prints.

A URL such as ``study.storage=postgresql://dtp:PASSWORD@db/optuna`` on the command line
would otherwise be copied by Hydra into its run folder (``.hydra/overrides.yaml``,
``hydra.yaml``), onto the command lines of ``study.workers`` child processes (readable by
every user through ``ps``), and into messages and tracebacks. :func:`hide_passwords`
moves each such password into an environment variable of this process before Hydra sees
the command line and leaves an OmegaConf ``${oc.env:...}`` reference in its place: the
resolved config still connects with it, child processes inherit it through their
environment (``/proc/<pid>/environ`` is readable by the owner only), and what Hydra
writes holds the reference, not the password. The rest masks what may still carry one:
any text (:func:`redact`), every logging handler (:func:`redact_logging`), and the files
of Hydra's run folder (:func:`scrub_files`).

PostgreSQL's own ways (``PGPASSWORD``, ``~/.pgpass``, service files) keep the password
off the command line altogether; see docs/distributed.md.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import unquote

from omegaconf import DictConfig, OmegaConf

# Environment variables that carry the passwords moved off the command line.
PASSWORD_ENV = "DTP_SEARCH_PASSWORD_"
MASK = "***"

# ``scheme://`` and the URL's authority (user:password@host:port), as urlsplit reads it:
# up to the first ``/``, ``?`` or ``#``; the password runs from the first ``:`` of the
# user information to its last ``@``. Quotes, brackets, commas and whitespace end it,
# since on a command line or in a message they end the URL.
_AUTHORITY = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<netloc>[^/?#\s'\"\[\](),]*)")
# A password that Hydra's override grammar would read as written (no escapes, quotes or
# interpolation); others are left on the command line and masked where they are written.
_PLAIN = re.compile(r"[^\\'\"${}\s]+")


def _split_authority(netloc: str) -> tuple[str, str, str] | None:
    """``(user + ':', password, '@' + host)`` of an authority that has a password."""
    userinfo, at, host = netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    if not at or not colon or not password:
        return None
    return user + colon, password, at + host


def mask_urls(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***`` (the URL's user
    and host kept, as :func:`dtp_search.storage.mask_url` writes a single URL)."""

    def mask(m: re.Match) -> str:
        parts = _split_authority(m["netloc"])
        if parts is None or parts[1] == MASK:
            return m[0]
        return m["scheme"] + parts[0] + MASK + parts[2]

    return _AUTHORITY.sub(mask, text)


def hide_passwords(argv: list[str]) -> list[str]:
    """``argv`` with the password of each URL in an override replaced by a reference to
    an environment variable of this process (``DTP_SEARCH_PASSWORD_<KEY>``) set to it.

    An override that already refers to one (a worker's command line) is left as it is.
    """
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq or arg.startswith("-"):
            out.append(arg)
            continue
        name = PASSWORD_ENV + re.sub(r"\W", "_", key.lstrip("+~")).upper()
        found = 0

        def to_env(m: re.Match, name: str = name) -> str:
            nonlocal found
            parts = _split_authority(m["netloc"])
            if parts is None or not _PLAIN.fullmatch(parts[1]):
                return m[0]
            variable = name if not found else f"{name}_{found}"
            found += 1
            os.environ[variable] = parts[1]
            return m["scheme"] + parts[0] + "${oc.env:" + variable + "}" + parts[2]

        out.append(key + eq + _AUTHORITY.sub(to_env, value))
    return out


def known_passwords(cfg: DictConfig | None = None) -> set[str]:
    """The passwords this run knows of: those :func:`hide_passwords` moved into the
    environment, and those of the URLs in ``cfg`` (a preset or an interpolation can put
    one there), each as written and percent-decoded."""
    found = {v for k, v in os.environ.items() if k.startswith(PASSWORD_ENV) and v}
    if cfg is not None:
        try:
            text = OmegaConf.to_yaml(cfg, resolve=True)
        except Exception:  # an interpolation that fails is reported by the run itself
            text = ""
        for m in _AUTHORITY.finditer(text):
            parts = _split_authority(m["netloc"])
            if parts is not None and parts[1] != MASK:
                found.add(parts[1])
    return found | {unquote(p) for p in found}


def redact(text: str, passwords: Iterable[str] = ()) -> str:
    """``text`` with URL passwords masked (:func:`mask_urls`) and every known password
    replaced by ``***`` wherever it stands (a driver's message may repeat one alone)."""
    text = mask_urls(text)
    # Longest first: one password may contain another.
    for password in sorted({p for p in passwords if len(p) >= 3}, key=len, reverse=True):
        text = text.replace(password, MASK)
    return text


class _RedactFilter(logging.Filter):
    """Rewrites each record's message (and its traceback) with :func:`redact`. Logging's
    filters may change a record; this is how a handler's output is edited without
    replacing its formatter."""

    def __init__(self, passwords: set[str]) -> None:
        super().__init__()
        self.passwords = passwords

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage(), self.passwords), None
        if record.exc_info:
            record.exc_text = redact(
                logging.Formatter().formatException(record.exc_info), self.passwords
            )
            record.exc_info = None
        return True


def redact_logging(passwords: set[str]) -> None:
    """Mask passwords in everything logged from now on, whichever handler writes it:
    Hydra's console and ``<job>.log``, Optuna's own stderr handler, any other."""
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if not any(isinstance(f, _RedactFilter) for f in handler.filters):
                handler.addFilter(_RedactFilter(passwords))


def scrub_files(paths: Iterable[Path], passwords: set[str]) -> None:
    """Make each file readable by its owner only and mask the passwords in it: Hydra's
    run folder (its ``.hydra/*.yaml`` and ``<job>.log``) says where the databases are,
    and a password given some way :func:`hide_passwords` cannot move (a preset, a
    quoted value with escapes) is written there as it stands."""
    for path in paths:
        if not path.is_file():
            continue
        path.chmod(0o600)
        text = path.read_text(errors="surrogateescape")
        masked = redact(text, passwords)
        if masked != text:
            path.write_text(masked, errors="surrogateescape")
