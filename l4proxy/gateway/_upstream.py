"""Reaching a target: the upstream connection and the stored credential.

The credential is read at every upstream connect (so a rotated file applies to the next
session), from a file that must be private (no group/other bits) or from an environment
variable; it is never logged, and errors name the source, never the value.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import stat

import trio

from l4proxy.config import TargetConfig
from l4proxy.tls import DEFAULT_READ_SIZE, TlsStream

from ._session import UpstreamUnavailable

__all__ = ["connect_tcp", "open_upstream", "read_credential", "upstream_ssl_context"]

#: a credential longer than this is not a credential
MAX_CREDENTIAL_BYTES = 4096


def read_credential(target: TargetConfig) -> str:
    """The target's credential.

    Raises:
        UpstreamUnavailable: missing, empty, too long, or (file) readable by others.
    """
    if target.credential_file is not None:
        path = target.credential_file
        try:
            st = path.stat()
            if not stat.S_ISREG(st.st_mode):
                raise UpstreamUnavailable(f"credential file {path} is not a regular file")
            if st.st_mode & 0o077:
                raise UpstreamUnavailable(f"credential file {path} is readable by group or "
                                          "others (chmod 600)")
            value = path.read_text("utf-8").strip()
        except OSError as exc:
            raise UpstreamUnavailable(f"cannot read credential file {path}: "
                                      f"{exc.strerror or type(exc).__name__}") from None
        except UnicodeDecodeError:
            raise UpstreamUnavailable(f"credential file {path} is not UTF-8") from None
        source = f"file {path}"
    elif target.credential_env is not None:
        value = os.environ.get(target.credential_env, "").strip()
        source = f"environment variable {target.credential_env}"
    else:
        raise UpstreamUnavailable(f"target {target.name!r} has no credential configured")
    if not value:
        raise UpstreamUnavailable(f"credential {source} is empty")
    if len(value.encode()) > MAX_CREDENTIAL_BYTES:
        raise UpstreamUnavailable(f"credential {source} is longer than {MAX_CREDENTIAL_BYTES} bytes")
    return value


def upstream_ssl_context(target: TargetConfig) -> ssl.SSLContext:
    """The context for a TLS upstream: the system's defaults (certificate and host name
    checked) with ``upstream_ca`` as the trust store when set, TLS 1.2 at least.

    Renegotiation is refused: :class:`~l4proxy.tls.TlsStream` sends without reading, so a
    renegotiation in progress would break the stream (see its theory of operation).
    """
    ctx = ssl.create_default_context(cafile=str(target.upstream_ca) if target.upstream_ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    return ctx


async def connect_tcp(host: str, port: int) -> trio.SocketStream:
    """``trio.open_tcp_stream``, with a short cut for an IP address: one socket and one
    connect, without the name resolution and happy-eyeballs machinery (measured: half a
    millisecond of CPU per session, on the path of every new connection).

    Raises:
        OSError: the connection failed.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return await trio.open_tcp_stream(host, port)
    family = trio.socket.AF_INET6 if address.version == 6 else trio.socket.AF_INET
    sock = trio.socket.socket(family, trio.socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def open_upstream(target: TargetConfig, ctx: ssl.SSLContext | None = None, *,
                        read_size: int = DEFAULT_READ_SIZE) -> trio.abc.Stream:
    """Connect to the target (TCP, then TLS when configured). The caller bounds the time.

    TLS runs on :class:`~l4proxy.tls.TlsStream` (large reads, as on the gateway's
    listeners), which is half-closeable: a tcp session's ``send_eof`` reaches a TLS
    upstream as close_notify, as it reaches a plain one as a TCP FIN.

    Args:
        target: the target to reach.
        ctx: its client context (default: :func:`upstream_ssl_context`).
        read_size: ciphertext read from the upstream at once (TLS only).

    Raises:
        OSError / trio.BrokenResourceError: unreachable, or the TLS handshake failed
            (:class:`~l4proxy.tls.TlsHandshakeError`, a ``BrokenResourceError``).
    """
    host, port = target.upstream
    tcp = await connect_tcp(host, port)
    if not target.upstream_tls:
        return tcp
    tls = TlsStream(tcp, ctx or upstream_ssl_context(target), server_side=False,
                    server_hostname=target.upstream_server_name or host, read_size=read_size)
    try:
        await tls.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(tls)
        raise
    return tls
