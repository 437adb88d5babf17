"""Reaching the tracking store: a server that does not answer is found before a job starts
(:func:`connect` probes it with a short timeout) and named in one :class:`TrackingUnavailable`
error, rather than by MLflow's retries after the first epoch."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from recdistill.tracking.config import TrackingConfig, resolve_tracking_uri

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

#: Seconds a tracking server has to answer :func:`probe` before a job gives up on it.
PROBE_TIMEOUT_S = 5.0


class TrackingUnavailable(ConnectionError):
    """The tracking server at the configured URI does not answer (the command line prints it
    as one line, like a bad config)."""


def probe(uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Check that the tracking server at an ``http(s)://`` ``uri`` answers within ``timeout_s``.

    Any HTTP answer will do (a server behind a login answers 401); other URIs (a local sqlite
    or file store) are not probed.

    Raises:
        TrackingUnavailable: no answer (connection refused, unknown host, timeout), naming ``uri``.
    """
    import urllib.error
    import urllib.request

    if urlparse(uri).scheme not in ("http", "https"):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return  # it answered
    except OSError as err:  # URLError, socket timeouts
        reason = getattr(err, "reason", err)
        raise TrackingUnavailable(
            f"the MLflow tracking server {uri} does not answer ({reason}); start it, or point "
            "--tracking-uri, MLFLOW_TRACKING_URI or tracking.tracking_uri at one that runs"
        ) from None


def connect(config: TrackingConfig, override: str | None = None) -> MlflowClient:
    """Point MLflow at the resolved tracking URI (creating a local store's folder, probing a
    server: :func:`probe`); a client.

    Raises:
        TrackingUnavailable: the tracking server does not answer.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(config, override)
    probe(uri)
    if uri.startswith("sqlite:///"):
        Path(urlparse(uri).path).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)
