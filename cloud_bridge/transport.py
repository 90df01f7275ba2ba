"""How the bridge reaches the cloud: one protocol, two transports, one error family.

The push and pull loops talk to a :class:`CloudTransport` and only ever see two kinds of
failure: :class:`CloudDataError` (the server refused this batch for what is in it; bisect
it and park the bad row) and :class:`CloudUnavailable` (anything else: network, timeouts,
5xx, refused sign-in, missing permissions; back off and retry the same batch later). A
statement timeout is a :class:`CloudUnavailable` with ``code`` 57014: the bridge then
pushes smaller batches.
:func:`open_transport` picks the transport from the URL scheme of ``[cloud] url``.
"""

from __future__ import annotations

from typing import Any, Protocol

from daemon.config import CloudConfig

#: SQLSTATE ``query_canceled``: the server's ``statement_timeout`` (Supabase gives the
#: ``authenticated`` role 8 s) or our own command timeout ended the call.
STATEMENT_TIMEOUT = "57014"


class CloudError(Exception):
    """Root of every error raised by ``cloud_bridge``."""


class CloudDataError(CloudError):
    """The server rejected the request because of the data it carried.

    ``code`` is the SQLSTATE (e.g. ``23514`` for a check violation) when one was given.
    """

    def __init__(self, message: str, *, code: str | None = None) -> None:
        self.code = code
        super().__init__(message)


class CloudUnavailable(CloudError):
    """The cloud could not be reached or would not serve us now; try again later.

    ``code`` is the SQLSTATE when the database answered with one.
    """

    def __init__(self, message: str, *, code: str | None = None) -> None:
        self.code = code
        super().__init__(message)

    @property
    def timed_out(self) -> bool:
        """Whether the call was cancelled for taking too long (a smaller batch may fit)."""
        return self.code == STATEMENT_TIMEOUT


class CloudConfigError(CloudError):
    """The cloud settings cannot work (missing key, unsupported URL); a person must fix them."""

    def __init__(self, setting: str, reason: str) -> None:
        self.setting = setting
        self.reason = reason
        super().__init__(f"cloud.{setting}: {reason}")


class CloudTransport(Protocol):
    """The calls the bridge makes; both transports behave the same for the same data."""

    name: str

    async def merge(self, batch: dict[str, Any]) -> dict[str, Any]:
        """``merge_inventory(batch)``: returns ``{"items_changed", "movements_inserted"}``."""
        ...

    async def pull(self, fleet: str, cursor: str | None, max_rows: int) -> dict[str, Any]:
        """``pull_changes``: returns ``{"changes": [...], "cursor": str, "more": bool}``."""
        ...

    async def close(self) -> None:
        """Release connections; idempotent."""
        ...


def open_transport(config: CloudConfig) -> CloudTransport:
    """The transport for ``config.url``; connects lazily, on the first call.

    Raises :class:`CloudConfigError` when the settings cannot work (checked here, so the
    daemon reports it once at start rather than on every retry).
    """
    url = config.url
    if not url:
        raise CloudConfigError("url", "not set")
    kind = transport_kind(url)
    if kind == "postgres":
        from .postgres import PostgresTransport  # noqa: PLC0415 - asyncpg only when used

        return PostgresTransport(url)
    if kind == "rest":
        from .rest import RestTransport  # noqa: PLC0415 - aiohttp session only when used

        return RestTransport.from_config(config)
    raise CloudConfigError("url", f"unsupported scheme in {url.split('://', 1)[0]!r}")


def transport_kind(url: str) -> str | None:
    """``"postgres"`` or ``"rest"``: the transport a URL selects, ``None`` for neither."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgres"
    if url.startswith(("https://", "http://")):
        return "rest"
    return None
