"""TLS over any trio stream, driven through ``ssl.SSLObject`` and memory BIOs.

Theory of operation
-------------------
:class:`TlsStream` is l4proxy's replacement for :class:`trio.SSLStream` on every data
path: the gateway's listeners and its TLS upstreams, chunkd's TLS listener and the
client library (``ChunkClient.connect``), so both ends of each hop move data the same
way. (The control plane's HTTPS, :mod:`l4proxy.http`, keeps ``trio.SSLStream``: its
requests and answers are small, so large reads would not pay.) trio's stream hands back
one 16 KiB TLS record per ``receive_some`` and pays a trip through the scheduler for
each; a relay built on it reached 0.29x haproxy, and with our own client still on it the
client was the benchmarks' bottleneck. This one moves ciphertext in large pieces:
``receive_some`` reads up to ``read_size`` (256 KiB by default; the gateway's
``limits.read_size``) from the transport at once and returns *all* the plaintext that
decrypts from it (up to ``max_bytes``); ``send_all`` (and ``send_all_parts``) encrypts
the whole message and hands the transport its records in one go: one vectored
``sendmsg`` on a socket (:mod:`l4proxy._send`), one ``send_all`` on other streams. Both roles are the
same code: ``server_side`` and, on the client side, ``server_hostname`` (SNI and the
certificate's name check) and ``session`` (resumption) are all that differ.

State lives in three places: the :class:`ssl.SSLObject`, its incoming and outgoing
:class:`ssl.MemoryBIO`, and ``_ct``, ciphertext already read from the transport but not
yet written into the incoming BIO. Ciphertext is fed to the BIO one TLS record at a time
(the record headers are read for their lengths; at most :data:`BIO_SLICE`), and
plaintext is encrypted in slices of :data:`WRITE_SLICE`, draining the outgoing BIO after
each: an OpenSSL memory BIO never gives memory back, so feeding it 256 KiB once would pin
256 KiB to the session for its whole life. Whole records also mean that a read after a
feed decrypts a record instead of failing for want of its tail, which used to cost a
``SSLWantReadError`` per record. (Measured: a stream
that has only handshaken holds about 29 KiB; one that has moved bulk data about 80 KiB,
most of it OpenSSL's record buffers and the two BIOs at one record each.)

Concurrency: one task may receive while another sends (each side has a conflict guard
raising :class:`trio.BusyResourceError`). Every SSLObject call is synchronous and
non-blocking, so the two sides interleave freely between awaits. Only the receive side
(and, before it, the handshake) reads the transport; without renegotiation a write never
needs a read. :func:`server_context` and :func:`client_context` disable renegotiation,
and so does every other context l4proxy builds for a ``TlsStream`` (chunkd's, the
gateway's upstream one, the ``chunk`` CLI's). With a caller's context that allows it, a
write that OpenSSL cannot finish without reading (a TLS 1.2 renegotiation in progress)
breaks the stream rather than waiting for the receive side. Ordering of outgoing records
is the one hazard: bytes leave the outgoing BIO *only* while ``_send_lock`` is held, and
the holder sends them before releasing it and re-checks the BIO before letting go. A
receive that makes OpenSSL write (a TLS 1.3 KeyUpdate answer, an alert) flushes only if
the lock is free; otherwise the holder sends those bytes too.

Errors: a failed handshake first flushes the pending alert to the transport (trio's
``SSLStream`` drops it, so the peer sees a bare close), then raises
:class:`TlsHandshakeError`, a :class:`trio.BrokenResourceError`, ``from`` the
:class:`ssl.SSLError`. After the handshake, ssl and transport failures become
:class:`trio.BrokenResourceError` ``from`` the cause, and every later call raises it
again; after :meth:`TlsStream.aclose`, calls raise :class:`trio.ClosedResourceError`.
Cancelling ``receive_some`` while it waits for the transport loses nothing; cancelling a
send or the handshake breaks the stream (part of a record may have been written).

Closing: :meth:`TlsStream.aclose` sends close_notify (after a completed handshake, if the
stream is not broken and :meth:`~TlsStream.send_eof` has not sent it already), waits at
most ``close_timeout`` for the transport to take it, never waits for the peer's, and then
closes the transport; under ``trio.aclose_forcefully`` nothing is sent.
"""

from __future__ import annotations

import enum
import os
import ssl
import threading
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Literal, cast, overload

import trio
from cryptography import x509

from l4proxy._send import Buffer, send_all_parts
from l4proxy._sync import SendLock

__all__ = [
    "AEAD_CIPHERS_TLS12",
    "BIO_SLICE",
    "DEFAULT_CLOSE_TIMEOUT",
    "DEFAULT_READ_SIZE",
    "WRITE_SLICE",
    "TlsHandshakeError",
    "TlsStream",
    "client_context",
    "server_context",
]

#: how much ciphertext one ``receive_some`` asks the transport for
DEFAULT_READ_SIZE = 256 * 1024
#: ciphertext is written into the incoming BIO one TLS record at a time (bounds the BIO,
#: whose buffer never shrinks, to about one record per stream), and a record is never split
#: across writes unless the transport split it: so a read after a write finds a whole
#: record to decrypt instead of failing with ``SSLWantReadError`` half the time. A record
#: header claiming more than the largest legal record is fed this much at a time (OpenSSL
#: then refuses the record).
BIO_SLICE = 5 + (1 << 14) + 2048  # header + TLS 1.2's largest TLSCiphertext
_RECORD_HEADER = 5
_MAX_RECORD_BODY = BIO_SLICE - _RECORD_HEADER
#: plaintext is encrypted at most this much at a time before the outgoing BIO is drained
WRITE_SLICE = 16 * 1024
#: the longest ``aclose`` (and a failed handshake's alert) waits to send close_notify
DEFAULT_CLOSE_TIMEOUT = 1.0
#: TLS 1.2 cipher suites: ECDHE key exchange with AES-GCM or ChaCha20-Poly1305 only
#: (TLS 1.3 suites are all AEAD already)
AEAD_CIPHERS_TLS12 = "ECDHE+AESGCM:ECDHE+CHACHA20"

_PathLike = str | os.PathLike[str]


class TlsHandshakeError(trio.BrokenResourceError):
    """The TLS handshake failed; the stream is broken.

    Raised ``from`` the :class:`ssl.SSLError`.

    Attributes:
        reason: what OpenSSL reported, lower case, e.g. ``"peer did not return a
            certificate"`` or ``"certificate verify failed: unable to get local issuer
            certificate"``.
        alert: whether an alert (or any pending handshake bytes) was flushed to the peer
            after the failure.
    """

    def __init__(self, reason: str, *, alert: bool) -> None:
        super().__init__(f"TLS handshake failed: {reason}" + (" (alert sent)" if alert else ""))
        self.reason = reason
        self.alert = alert


class _State(enum.Enum):
    OK = "ok"
    BROKEN = "broken"
    CLOSED = "closed"


class _Guard:
    """Raise :class:`trio.BusyResourceError` when two tasks use one side at once."""

    __slots__ = ("_busy", "_what")

    def __init__(self, what: str) -> None:
        self._busy = False
        self._what = what

    def __enter__(self) -> None:
        if self._busy:
            raise trio.BusyResourceError(f"another task is already {self._what} on this stream")
        self._busy = True

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._busy = False


_scratch_local = threading.local()


def _scratch(size: int) -> bytearray:
    """This thread's decryption buffer, at least ``size`` bytes. ``_read_plaintext`` fills
    it and copies the plaintext out without yielding in between, so every stream of a
    thread can share it."""
    buf: bytearray | None = getattr(_scratch_local, "buf", None)
    if buf is None or len(buf) < size:
        buf = _scratch_local.buf = bytearray(size)
    return buf


def _reason(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str) and reason:
        return reason.lower().replace("_", " ")
    return str(exc) or type(exc).__name__


class TlsStream(trio.abc.HalfCloseableStream):
    """TLS (1.2/1.3) over ``transport``, as a trio stream, with large reads and writes.

    The handshake runs on the first ``receive_some``/``send_all``/``send_eof`` or an
    explicit :meth:`do_handshake` (put a ``trio.fail_after`` around it: the deadline is the
    caller's).

    Args:
        transport: the stream carrying the ciphertext (a TCP stream, a memory stream...).
            ``TlsStream`` owns it and closes it.
        context: :func:`server_context` or :func:`client_context` (or any context).
        server_side: the TLS role.
        server_hostname: the name to send in SNI and check the certificate against
            (client side).
        session: a previous connection's :attr:`session` to resume (client side).
        read_size: how much ciphertext to ask the transport for per read.
        close_timeout: how long :meth:`aclose` (and a failed handshake's alert) may wait
            to send.
        allow_ragged_eof: treat a transport EOF without close_notify as EOF rather than
            as a broken stream (a truncation attack is possible on protocols that are not
            self-delimiting; CWP frames are).

    Attributes:
        transport_stream: the underlying stream.
    """

    def __init__(self, transport: trio.abc.Stream, context: ssl.SSLContext, *, server_side: bool,
                 server_hostname: str | None = None, session: ssl.SSLSession | None = None,
                 read_size: int = DEFAULT_READ_SIZE, close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
                 allow_ragged_eof: bool = False) -> None:
        if read_size < 1:
            raise ValueError("read_size must be >= 1")
        if close_timeout < 0:
            raise ValueError("close_timeout must be >= 0")
        self.transport_stream = transport
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side,
                                     server_hostname=server_hostname, session=session)
        self._read_size = read_size
        self._close_timeout = close_timeout
        self._allow_ragged_eof = allow_ragged_eof
        self._state = _State.OK
        self._handshake_done = False
        self._handshake_lock = trio.Lock()
        self._send_lock = SendLock()  # no scheduler pass per send when free
        self._recv_guard = _Guard("receiving")
        self._send_guard = _Guard("sending")
        self._ct: memoryview | None = None  # ciphertext read but not yet fed to the BIO
        self._ct_off = 0
        self._rec_left = 0  # bytes of the current TLS record not yet fed to the BIO
        self._rec_head = b""  # the part of a record header seen so far (transport split it)
        self._transport_eof = False
        self._recv_eof = False
        self._sent_eof = False

    # --- passthroughs ------------------------------------------------------------------

    @property
    def ssl_object(self) -> ssl.SSLObject:
        """The underlying :class:`ssl.SSLObject` (an ``sni_callback`` receives this object;
        do not read or write through it)."""
        return self._ssl

    @property
    def context(self) -> ssl.SSLContext:
        """The SSL context this stream was made with."""
        return self._ssl.context

    @property
    def server_side(self) -> bool:
        """True for the server end."""
        return self._ssl.server_side

    @property
    def server_hostname(self) -> str | None:
        """The server name we sent in SNI (client side); None on the server side, where
        the client's SNI reaches the context's ``sni_callback`` (with :attr:`ssl_object`)."""
        return self._ssl.server_hostname

    @property
    def session(self) -> ssl.SSLSession | None:
        """The TLS session, to resume in a later client connection."""
        return self._ssl.session

    @property
    def session_reused(self) -> bool:
        """Whether the handshake resumed a previous session (the peer's certificate was
        then *not* verified again by OpenSSL: check it yourself)."""
        return bool(self._ssl.session_reused)

    @overload
    def getpeercert(self, binary_form: Literal[True] = True) -> bytes | None: ...
    @overload
    def getpeercert(self, binary_form: Literal[False]) -> dict[str, Any] | None: ...

    def getpeercert(self, binary_form: bool = True) -> bytes | dict[str, Any] | None:
        """The peer's certificate (DER by default), or None before the handshake or when
        the peer sent none. Note the default differs from :mod:`ssl` (DER, not a dict)."""
        if binary_form:
            return self._ssl.getpeercert(True)
        return self._ssl.getpeercert(False)

    def peer_certificate(self) -> x509.Certificate | None:
        """The peer's leaf certificate, parsed (None if there is none).

        Raises:
            ValueError: the DER does not parse (OpenSSL accepted it; cryptography may not).
        """
        der = self._ssl.getpeercert(True)
        return None if der is None else x509.load_der_x509_certificate(der)

    def selected_alpn_protocol(self) -> str | None:
        """The negotiated ALPN protocol, if any."""
        return self._ssl.selected_alpn_protocol()

    def version(self) -> str | None:
        """``"TLSv1.2"`` or ``"TLSv1.3"`` after the handshake, None before."""
        return self._ssl.version()

    def cipher(self) -> tuple[str, str, int] | None:
        """The negotiated cipher ``(name, protocol, secret bits)``."""
        return self._ssl.cipher()

    # --- state -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._state is _State.CLOSED:
            raise trio.ClosedResourceError("the TLS stream is closed")
        if self._state is _State.BROKEN:
            raise trio.BrokenResourceError("the TLS stream is broken")

    def _transport_failed(self, exc: BaseException) -> BaseException:
        """The exception to raise for a failed transport call (marks the stream broken)."""
        if self._state is _State.CLOSED:
            return trio.ClosedResourceError("the TLS stream was closed")
        self._state = _State.BROKEN
        if isinstance(exc, trio.BrokenResourceError):
            return trio.BrokenResourceError("the transport is broken")
        return trio.BrokenResourceError(f"the transport failed: {type(exc).__name__}")

    # --- moving ciphertext ---------------------------------------------------------------

    def _feed(self) -> bool:
        """Move the rest of the current TLS record (or the next whole record) of the read
        ciphertext into the incoming BIO (False: none left)."""
        ct = self._ct
        if ct is None:
            return False
        off = self._ct_off
        size = len(ct)
        if self._rec_left:  # the rest of a record the transport split
            end = off + self._rec_left
        elif size - off >= _RECORD_HEADER and not self._rec_head:
            end = off + _RECORD_HEADER + min(ct[off + 3] << 8 | ct[off + 4], _MAX_RECORD_BODY)
        else:
            end = self._split_header(ct, off, size)
        if end > size:
            self._rec_left = end - size
            end = size
        else:
            self._rec_left = 0
        self._incoming.write(ct[off:end])
        if end >= size:
            self._ct = None
            self._ct_off = 0
        else:
            self._ct_off = end
        return True

    def _split_header(self, ct: memoryview, off: int, size: int) -> int:
        """Where the record whose header the transport split ends (``size`` while the header
        is still incomplete)."""
        head = self._rec_head
        missing = _RECORD_HEADER - len(head)
        if size - off < missing:
            self._rec_head = head + ct[off:]
            return size
        head += ct[off:off + missing]
        self._rec_head = b""
        return off + missing + min(head[3] << 8 | head[4], _MAX_RECORD_BODY)

    async def _receive_ciphertext(self) -> None:
        """Read once from the transport into ``_ct`` (or record its EOF)."""
        try:
            data = await self.transport_stream.receive_some(self._read_size)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise self._transport_failed(exc) from exc
        if data:
            self._ct = memoryview(data)
            self._ct_off = 0
        else:
            self._transport_eof = True
            self._incoming.write_eof()

    async def _send_ciphertext(self, data: bytes | list[bytes]) -> None:
        """Send ``data`` (or its parts, in one vectored send where the transport is a
        socket) on the transport (the caller holds ``_send_lock``)."""
        try:
            if isinstance(data, list):
                await send_all_parts(self.transport_stream, data)
            else:
                await self.transport_stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise self._transport_failed(exc) from exc
        except BaseException:
            # cancelled (or worse) mid-send: some unknown part of a record went out
            if self._state is _State.OK:
                self._state = _State.BROKEN
            raise

    async def _drain_locked(self) -> None:
        """Send everything in the outgoing BIO, in order (the caller holds ``_send_lock``)."""
        while self._outgoing.pending:
            await self._send_ciphertext(self._outgoing.read())

    async def _flush(self) -> None:
        async with self._send_lock:
            await self._drain_locked()

    # --- handshake -----------------------------------------------------------------------

    async def do_handshake(self) -> None:
        """Run the TLS handshake if it has not run yet (idempotent).

        Raises:
            TlsHandshakeError: the handshake failed (after the alert was flushed).
            trio.BrokenResourceError: the transport failed, or an earlier handshake did.
            trio.ClosedResourceError: the stream was closed.
        """
        if self._handshake_done:
            self._check_open()
            await trio.lowlevel.checkpoint()
            return
        async with self._handshake_lock:
            self._check_open()
            if self._handshake_done:
                return
            try:
                await self._handshake()
            except BaseException:
                if self._state is _State.OK:
                    self._state = _State.BROKEN
                raise

    async def _handshake(self) -> None:
        while True:
            try:
                self._ssl.do_handshake()
            except ssl.SSLWantReadError:
                if self._feed():
                    continue
                await self._flush()
                await self._receive_ciphertext()
                continue
            except ssl.SSLError as exc:
                self._state = _State.BROKEN
                alert = await self._flush_alert()
                raise TlsHandshakeError(_reason(exc), alert=alert) from exc
            break
        self._handshake_done = True
        await self._flush()  # our last flight (and TLS 1.3 session tickets)

    async def _flush_alert(self) -> bool:
        """Best effort, bounded: send what OpenSSL queued when the handshake failed."""
        if not self._outgoing.pending:
            return False
        with trio.move_on_after(self._close_timeout):
            async with self._send_lock:
                data = self._outgoing.read()
                try:
                    await self.transport_stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return False
                return True
        return False

    # --- receiving -----------------------------------------------------------------------

    def _read_plaintext(self, max_bytes: int) -> bytes | None:
        """Decrypt what is buffered, up to ``max_bytes``.

        Returns:
            Plaintext; ``b""`` at a clean EOF; None when more ciphertext is needed.
        """
        sslobj = self._ssl
        ct_left = 0 if self._ct is None else len(self._ct) - self._ct_off
        available = sslobj.pending() + self._incoming.pending + ct_left
        if not available and not self._transport_eof:
            return None
        # plaintext never exceeds the ciphertext it came from; 1 byte probes an EOF.
        # Decrypted into this thread's scratch buffer and copied out once as bytes: no
        # zero-filled buffer per read, and no idle stream holds a buffer of its own.
        want = max(1, min(max_bytes, available))
        view = memoryview(_scratch(want))[:want]
        n = 0
        incoming = self._incoming
        try:
            while n < want:
                if self._ct is not None and not incoming.pending:
                    self._feed()  # the BIO is empty: feed the next record before reading
                try:
                    # with a buffer, read() returns a count (typeshed says bytes)
                    k = cast(int, sslobj.read(want - n, view[n:]))
                except ssl.SSLWantReadError:
                    if self._feed():
                        continue
                    break
                except ssl.SSLZeroReturnError:
                    k = 0
                if not k:  # close_notify
                    self._recv_eof = True
                    break
                n += k
        except ssl.SSLEOFError as exc:
            if not self._allow_ragged_eof:
                self._state = _State.BROKEN
                raise trio.BrokenResourceError("the peer closed without close_notify") from exc
            self._recv_eof = True
            self._outgoing.read()  # the alert OpenSSL queued for a peer that is gone
        except ssl.SSLError as exc:
            self._state = _State.BROKEN
            raise trio.BrokenResourceError(f"TLS error: {_reason(exc)}") from exc
        finally:
            out = bytes(view[:n]) if n else b""  # also after a ragged EOF (handled above)
            view.release()
        if n:
            return out
        return b"" if self._recv_eof else None

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Return the plaintext available now (waiting for some if there is none).

        Reads up to ``read_size`` ciphertext at a time and returns all the plaintext it
        yields, not one record. ``b""`` means the peer sent close_notify (or, with
        ``allow_ragged_eof``, closed the transport).

        Args:
            max_bytes: the most to return (default ``read_size``).

        Raises:
            trio.BrokenResourceError: a TLS or transport error (``from`` the cause), or a
                transport EOF without close_notify.
            trio.ClosedResourceError: the stream was closed.
            trio.BusyResourceError: another task is receiving.
            TlsHandshakeError: the implicit handshake failed.
        """
        with self._recv_guard:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_open()
            yielded = False
            if not self._handshake_done:
                await self.do_handshake()
                yielded = True
            if max_bytes is None:
                max_bytes = self._read_size
            elif max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
            if self._recv_eof:
                if not yielded:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return b""
            while True:
                self._check_open()
                data = self._read_plaintext(max_bytes)
                if self._outgoing.pending and not self._send_lock.locked():
                    # OpenSSL answered something (a KeyUpdate); if a sender holds the lock
                    # it sends these bytes after its own
                    yielded = True
                    try:
                        await self._flush()
                    except trio.BrokenResourceError:
                        if data is None:
                            raise
                        # the stream is broken now; hand out what was decrypted first
                if data is not None:
                    if not yielded:
                        await trio.lowlevel.cancel_shielded_checkpoint()
                    return data
                await self._receive_ciphertext()
                yielded = True

    # --- sending -------------------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt ``data`` and send its records in one go (a vectored ``sendmsg`` on a
        socket transport, one ``send_all`` on others).

        Raises:
            trio.BrokenResourceError: a TLS or transport error, or a cancelled send.
            trio.ClosedResourceError: the stream was closed, or :meth:`send_eof` was called.
            trio.BusyResourceError: another task is sending.
            TlsHandshakeError: the implicit handshake failed.
        """
        await self.send_all_parts((data,))

    async def send_all_parts(self, parts: Sequence[Buffer]) -> None:
        """:meth:`send_all` of the parts one after the other, as one stream of bytes, in
        one vectored send of their records (no join). The records are those of the joined
        bytes -- a part shorter than a record (a frame's header) shares one with what
        follows -- so the record sizes show no more of the message's structure than
        :meth:`send_all` would.

        Raises:
            As :meth:`send_all`.
        """
        with self._send_guard:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_open()
            if not self._handshake_done:
                await self.do_handshake()
            if self._sent_eof:
                raise trio.ClosedResourceError("send_eof was called on this stream")
            if not any(len(p) for p in parts):
                await trio.lowlevel.checkpoint()
                return
            async with self._send_lock:
                self._check_open()
                records: list[bytes] = []
                write, read = self._ssl.write, self._outgoing.read
                carry = b""  # the start of a record, from the end of the part before
                try:
                    for part in parts:
                        with memoryview(part) as view, view.cast("B") as octets:
                            off, size = 0, len(octets)
                            if carry:
                                off = min(WRITE_SLICE - len(carry), size)
                                carry += octets[:off]
                                if len(carry) < WRITE_SLICE:
                                    continue
                                write(carry)
                                records.append(read())
                                carry = b""
                            while size - off >= WRITE_SLICE:
                                write(octets[off:off + WRITE_SLICE])
                                records.append(read())
                                off += WRITE_SLICE
                            if off < size:
                                carry = bytes(octets[off:])
                    if carry:
                        write(carry)
                        records.append(read())
                except ssl.SSLError as exc:
                    self._state = _State.BROKEN
                    raise trio.BrokenResourceError(f"TLS error: {_reason(exc)}") from exc
                await self._send_ciphertext(records[0] if len(records) == 1 else records)
                del records
                await self._drain_locked()

    async def wait_send_all_might_not_block(self) -> None:
        """See :meth:`trio.abc.SendStream.wait_send_all_might_not_block`."""
        with self._send_guard:
            self._check_open()
            async with self._send_lock:
                await self.transport_stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        """Send close_notify; receiving may go on (TLS 1.3 half-close).

        Idempotent. The transport stays open until :meth:`aclose`.

        Raises:
            trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError:
                as :meth:`send_all`.
        """
        with self._send_guard:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_open()
            if not self._handshake_done:
                await self.do_handshake()
            if self._sent_eof:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return
            self._sent_eof = True
            async with self._send_lock:
                self._unwrap_once()
                await self._drain_locked()

    def _unwrap_once(self) -> None:
        """Queue our close_notify without waiting for the peer's."""
        try:
            self._ssl.unwrap()
        except ssl.SSLWantReadError:
            pass  # close_notify queued; the peer's has not arrived (we do not wait for it)
        except ssl.SSLError as exc:
            self._state = _State.BROKEN
            raise trio.BrokenResourceError(f"TLS error: {_reason(exc)}") from exc

    # --- closing -------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Send close_notify (best effort, at most ``close_timeout``), then close the
        transport. Idempotent; never hangs on a peer that does not read."""
        if self._state is _State.CLOSED:
            await trio.lowlevel.checkpoint()
            return
        polite = self._state is _State.OK and self._handshake_done and not self._sent_eof
        self._state = _State.CLOSED
        self._ct = None
        try:
            if polite:
                with trio.move_on_after(self._close_timeout):
                    async with self._send_lock:
                        try:
                            self._ssl.unwrap()
                        except ssl.SSLError:
                            pass  # SSLWantReadError: queued; anything else: nothing to send
                        data = self._outgoing.read()
                        if data:
                            await self.transport_stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except BaseException:
            await trio.aclose_forcefully(self.transport_stream)
            raise
        await self.transport_stream.aclose()


# --- contexts ------------------------------------------------------------------------------


def _harden(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ciphers(AEAD_CIPHERS_TLS12)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION


def server_context(cert: _PathLike, key: _PathLike, client_ca: _PathLike) -> ssl.SSLContext:
    """The context for a client-facing mTLS listener.

    TLS 1.2 and 1.3 only; for TLS 1.2 only ECDHE with AES-GCM or ChaCha20-Poly1305
    (:data:`AEAD_CIPHERS_TLS12`); no compression, no renegotiation, server cipher
    preference; a client certificate is required and must chain to ``client_ca`` under
    OpenSSL's strict X.509 checks (``VERIFY_X509_STRICT``). Session resumption (tickets
    and the session cache) stays on: resumed sessions skip OpenSSL's certificate checks,
    which is why :func:`~l4proxy.gateway.check_client` runs after every handshake. A TLS
    1.3 handshake sends one session ticket, not OpenSSL's default two: a client resumes
    with its latest ticket, and each ticket is work in the handshake's last flight
    (measured: 0.25-0.6 ms per connection).

    Args:
        cert: PEM server certificate (chain) file.
        key: PEM private key file of ``cert``.
        client_ca: PEM bundle of the CAs client certificates must chain to.

    Raises:
        ssl.SSLError, OSError: a file is missing or does not load.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.load_cert_chain(cert, key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_verify_locations(client_ca)
    ctx.num_tickets = 1
    return ctx


def client_context(ca: _PathLike, *, cert: _PathLike | None = None,
                   key: _PathLike | None = None) -> ssl.SSLContext:
    """The context for TLS to an upstream service: same protocol and cipher limits as
    :func:`server_context`; the server certificate must chain to ``ca`` and match the
    ``server_hostname`` given to :class:`TlsStream`.

    Args:
        ca: PEM bundle of the CAs the upstream's certificate may chain to.
        cert: an optional client certificate (PEM) to present upstream.
        key: its private key (default: in ``cert``).

    Raises:
        ssl.SSLError, OSError: a file is missing or does not load.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx)
    ctx.load_verify_locations(ca)
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx
