"""Refuse a tracking server that does not answer, before any data is loaded or any trial
starts."""

from __future__ import annotations

from dtp_search.errors import ConfigError, reason
from dtp_search.storage import PROBE_TIMEOUT, mask_url

_GATEWAY_ERRORS = (502, 503, 504)  # a proxy's answer for a server behind it that is down


def check_tracking_uri(uri: str, timeout: float = PROBE_TIMEOUT) -> None:
    """Refuse an ``http(s)://`` tracking URI where no server answers within ``timeout``
    seconds, before any data is loaded or any trial starts.

    MLflow's client retries a failed request with backoff for over two minutes and then
    raises its own traceback. Its MLFLOW_HTTP_REQUEST_MAX_RETRIES/_TIMEOUT variables would
    shorten that, but for the whole run, where retries are what carry a study over a
    server restart; so one plain GET of the server's ``/health`` is sent here instead.
    Any HTTP answer (even 401 or 404) or a TLS error means something listens there, and
    MLflow's own client (with its credentials and certificates) takes it from there; only
    a connection that fails or times out is reported.
    """
    import http.client
    import ssl
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.scheme.lower() not in ("http", "https"):
        return
    # Without user:password@ (urllib would read it as part of the host name).
    netloc = parts.netloc.rpartition("@")[2]
    probe = urlunsplit(
        parts._replace(
            netloc=netloc, path=parts.path.rstrip("/") + "/health", query="", fragment=""
        )
    )
    try:
        # urllib, like MLflow's requests, honours http_proxy/https_proxy/no_proxy.
        with urllib.request.urlopen(probe, timeout=timeout):
            return
    except urllib.error.HTTPError as exc:
        # A gateway (proxy, load balancer) answering for a server that is down: MLflow
        # retries these for minutes, as it does a refused connection.
        if exc.code not in _GATEWAY_ERRORS:
            return
        text = f"HTTP {exc.code} {exc.reason}"
    except (OSError, ValueError, http.client.HTTPException) as exc:  # refused, timeout, bad port
        if isinstance(getattr(exc, "reason", exc), ssl.SSLError):
            return
        text = reason(exc)
    raise ConfigError(
        f"tracking.uri={mask_url(uri)!r} cannot be reached ({text}); start the "
        "tracking server (mlflow server --host 0.0.0.0 --port 5000 ...) or use a "
        "local store, e.g. tracking.uri=sqlite:////abs/mlflow.db"
    )
