"""The gateway: the only part of l4proxy that owns client-facing sockets.

* :class:`Gateway` (``_server.py``): listeners, our certificate checks, routing, access,
  the session registry, locks, reload and drain;
* ``run_cwp_session`` / ``run_tcp_session`` (``_session.py``): one session each;
* the hooks (``_hooks.py``): the one place for per-request policy, response transforms
  and the recorder;
* :class:`TlsStream`, :func:`server_context`, :func:`client_context` (from
  :mod:`l4proxy.tls`, re-exported so ``from l4proxy.gateway import TlsStream`` still works);
* :func:`check_client` (``_certcheck.py``): the certificate check after every handshake
  (:class:`CheckCache`: the same, keeping per certificate what does not depend on the time),
  resumed sessions included.
"""

from l4proxy.tls import (
    AEAD_CIPHERS_TLS12,
    BIO_SLICE,
    DEFAULT_CLOSE_TIMEOUT,
    DEFAULT_READ_SIZE,
    WRITE_SLICE,
    TlsHandshakeError,
    TlsStream,
    client_context,
    server_context,
)

from ._certcheck import (
    CheckCache,
    ClientCheck,
    ClientRejected,
    LockLookup,
    RejectCode,
    check_client,
    lock_lookup,
)
from ._hooks import (
    ALLOW,
    AllowAll,
    Decision,
    NoObserver,
    NoTransform,
    Policy,
    ResponseTransform,
    SessionInfo,
    SessionObserver,
    observe_server_parts,
)
from ._server import Gateway, GatewayConfigError, GatewayState, may_connect, route
from ._session import (
    SessionControl,
    SessionEnded,
    SessionHooks,
    UpstreamUnavailable,
    run_cwp_session,
    run_tcp_session,
)

__all__ = [
    "AEAD_CIPHERS_TLS12",
    "ALLOW",
    "BIO_SLICE",
    "DEFAULT_CLOSE_TIMEOUT",
    "DEFAULT_READ_SIZE",
    "WRITE_SLICE",
    "AllowAll",
    "CheckCache",
    "ClientCheck",
    "ClientRejected",
    "Decision",
    "Gateway",
    "GatewayConfigError",
    "GatewayState",
    "LockLookup",
    "NoObserver",
    "NoTransform",
    "Policy",
    "RejectCode",
    "ResponseTransform",
    "SessionControl",
    "SessionEnded",
    "SessionHooks",
    "SessionInfo",
    "SessionObserver",
    "TlsHandshakeError",
    "TlsStream",
    "UpstreamUnavailable",
    "check_client",
    "client_context",
    "lock_lookup",
    "may_connect",
    "observe_server_parts",
    "route",
    "run_cwp_session",
    "run_tcp_session",
    "server_context",
]
