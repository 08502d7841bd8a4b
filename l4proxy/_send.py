"""Sending a message made of several buffers without joining them first.

The data path's messages come in parts: a frame's 12-byte header and its payload (a
piece of up to ``limits.read_size`` handed out by the codec without a copy), or the TLS
records that ``TlsStream`` encrypts one 16 KiB slice at a time. Joining them costs a copy
of every relayed byte (measured: about 0.14 s of CPU per GB here, per copy); a vectored
``sendmsg`` hands the kernel the parts as they are, in one system call.

:func:`send_all_parts` is ``stream.send_all(b"".join(parts))`` with the same errors: a
vectored send on a :class:`trio.SocketStream`, :meth:`l4proxy.tls.TlsStream.send_all_parts`
on a TLS stream (duck-typed: any stream with a ``send_all_parts`` method), and the joined
bytes on any other stream. The caller serialises its sends (the data path holds a
:class:`~l4proxy._sync.SendLock`), as it must for ``send_all`` too; unlike
``SocketStream.send_all``, two tasks sending at once are not detected here.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence

import trio

__all__ = ["send_all_parts"]

Buffer = bytes | bytearray | memoryview


def _iov_max() -> int:
    """The most buffers one sendmsg takes (POSIX guarantees 16; Linux allows 1024)."""
    try:
        return max(16, min(1024, os.sysconf("SC_IOV_MAX")))
    except (AttributeError, ValueError, OSError):
        return 16


_IOV_MAX = _iov_max()


async def send_all_parts(stream: trio.abc.SendStream, parts: Sequence[Buffer]) -> None:
    """Send ``parts`` in order as one byte stream (see the module doc).

    Raises:
        trio.BrokenResourceError, trio.ClosedResourceError: as ``stream.send_all``.
    """
    if type(stream) is trio.SocketStream and hasattr(stream.socket, "sendmsg"):
        await _sendmsg_all(stream, parts)
        return
    send_parts = getattr(stream, "send_all_parts", None)
    if send_parts is not None:
        await send_parts(parts)
        return
    await stream.send_all(parts[0] if len(parts) == 1 else b"".join(parts))


async def _sendmsg_all(stream: trio.SocketStream, parts: Sequence[Buffer]) -> None:
    sock = stream.socket
    if sock.did_shutdown_SHUT_WR:
        raise trio.ClosedResourceError("can't send data after sending EOF")
    # sizes in bytes: a memoryview of another format counts items, so cast it
    pending: list[Buffer] = [p if type(p) is bytes else memoryview(p).cast("B") for p in parts]
    pending = [p for p in pending if len(p)]
    if not pending:
        if sock.fileno() == -1:
            raise trio.ClosedResourceError("socket was already closed")
        await trio.lowlevel.checkpoint()
        return
    try:
        while pending:
            sent = await sock.sendmsg(pending[:_IOV_MAX])
            for i, part in enumerate(pending):  # drop what went out, keep the rest
                size = len(part)
                if sent < size:
                    pending = [memoryview(part)[sent:], *pending[i + 1:]]
                    break
                sent -= size
            else:
                pending = []
    except OSError as exc:  # what SocketStream.send_all raises for the same failures
        if exc.errno in (errno.EBADF, errno.ENOTSOCK):
            raise trio.ClosedResourceError("this socket was already closed") from None
        raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
