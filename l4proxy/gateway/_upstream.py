"""Reaching a target: the upstream connection and the stored credential.

The credential is read at every upstream connect (so a rotated file applies to the next
session), from a file that must be private (no group/other bits) or from an environment
variable; it is never logged, and errors name the source, never the value.
"""

from __future__ import annotations

import os
import ssl
import stat

import trio

from l4proxy.config import TargetConfig

from ._session import UpstreamUnavailable

__all__ = ["open_upstream", "read_credential", "upstream_ssl_context"]

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
    ctx = ssl.create_default_context(cafile=str(target.upstream_ca) if target.upstream_ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def open_upstream(target: TargetConfig, ctx: ssl.SSLContext | None = None) -> trio.abc.Stream:
    """Connect to the target (TCP, then TLS when configured). The caller bounds the time.

    Raises:
        OSError / trio.BrokenResourceError: unreachable, or the TLS handshake failed.
    """
    host, port = target.upstream
    tcp = await trio.open_tcp_stream(host, port)
    if not target.upstream_tls:
        return tcp
    tls = trio.SSLStream(tcp, ctx or upstream_ssl_context(target),
                         server_hostname=target.upstream_server_name or host)
    try:
        await tls.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(tls)
        raise
    return tls
