"""The gateway's own check of a client certificate, on every connection.

Theory of operation
-------------------
OpenSSL verifies the chain during a *full* handshake only: a resumed TLS session (a
session ticket or a cached session id) brings back the peer certificate it had when the
session was made, unchecked, so a certificate that expired since, or was locked, would
get back in. :func:`check_client` is therefore run after every handshake, resumed or not,
with the time injected. It is pure: no I/O and no clock of its own.

It delegates "an acceptable l4proxy client certificate" to
:func:`l4proxy.identity.check_leaf` (the one definition, shared with the control API),
maps the problems it reports to a :class:`RejectCode` (a problem it does not know maps to
:attr:`RejectCode.MALFORMED`, so a new check fails closed), then adds what only the data
path needs: a maximum lifetime and the caller's lock lookup.

When a certificate has several problems the code is the first of: ``malformed``,
``foreign_ca`` (not signed by a trusted CA), ``ca_leaf``, ``no_client_auth``,
``trust_domain``, ``not_yet_valid``, ``expired``, ``foreign_ca`` (the issuing CA is not
valid now), ``lifetime``, ``locked``; the reason lists every problem the leaf check found.
Reasons name no secrets.

:class:`CheckCache` is :func:`check_client` for certificates seen before: it keeps, per
certificate (its exact DER bytes), what the checks found that does not depend on the
time -- the parsed certificate, which CAs signed it, its extension problems, its identity
-- and redoes the rest on every connection: the issuing CA valid now, the validity window,
the lifetime, the locks. Same answers, without the signature verifications and extension
parsing (most of the check's cost: about a millisecond per connection, measured). It
belongs to one CA bundle and trust domain: the gateway makes a new one with every
configuration it loads.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from cryptography import x509

from l4proxy.identity import BACKDATE, Identity, LeafFacts, leaf_facts, leaf_identity, leaf_problems

if TYPE_CHECKING:
    from l4proxy.store import LockSet

__all__ = ["CheckCache", "ClientCheck", "ClientRejected", "LockLookup", "RejectCode", "check_client",
           "lock_lookup"]

#: ``locked(identity, serial)``: a reason when the identity, one of its groups or the
#: certificate serial is locked, else None
LockLookup = Callable[[Identity, int], "str | None"]


def lock_lookup(locks: LockSet | None, *, now: float) -> LockLookup:
    """:func:`check_client`'s ``locked`` callback over the state store's active locks
    (None: no locks loaded, nothing is locked)."""

    def locked(identity: Identity, serial: int) -> str | None:
        if locks is None:
            return None
        lock = locks.match(identity.name, identity.groups, serial, now=now)
        return None if lock is None else f"lock {lock.id}: {lock.reason or 'no reason given'}"

    return locked


class RejectCode(enum.StrEnum):
    """Why a client certificate was refused (for metrics and logs)."""

    #: the current time is past notAfter (also on a resumed session)
    EXPIRED = "expired"
    #: the current time is before notBefore
    NOT_YET_VALID = "not_yet_valid"
    #: basicConstraints missing or CA:TRUE
    CA_LEAF = "ca_leaf"
    #: no clientAuth extended key usage, or a key usage without digitalSignature
    NO_CLIENT_AUTH = "no_client_auth"
    #: not signed by a CA of the trust bundle, or the issuing CA is not valid now
    FOREIGN_CA = "foreign_ca"
    #: notAfter - notBefore longer than allowed
    LIFETIME = "lifetime"
    #: no identity URI SAN of our trust domain
    TRUST_DOMAIN = "trust_domain"
    #: the identity, one of its groups or the serial is locked
    LOCKED = "locked"
    #: anything else (unparsable or unknown critical extensions, a bad identity
    #: extension, several URI SANs, a problem this module does not know)
    MALFORMED = "malformed"


#: how :func:`check_leaf` words its problems (message prefixes) -> our codes, in the order
#: they win when a certificate has several (a problem not listed is ``malformed`` and wins)
_LEAF_PROBLEMS: tuple[tuple[str, RejectCode], ...] = (
    ("not signed by a CA in the trust bundle", RejectCode.FOREIGN_CA),
    ("basicConstraints CA:TRUE", RejectCode.CA_LEAF),
    ("no basicConstraints extension", RejectCode.CA_LEAF),
    ("extended key usage lacks clientAuth", RejectCode.NO_CLIENT_AUTH),
    ("no extended key usage extension", RejectCode.NO_CLIENT_AUTH),
    ("key usage lacks digitalSignature", RejectCode.NO_CLIENT_AUTH),
    ("no identity URI SAN in trust domain", RejectCode.TRUST_DOMAIN),
    ("not valid before ", RejectCode.NOT_YET_VALID),
    ("expired at ", RejectCode.EXPIRED),
    # our CA never issues past its own window, so this comes with one of the two above
    # unless the bundle changed; on its own it means "not a CA we trust now"
    ("the issuing CA is not valid now", RejectCode.FOREIGN_CA),
)


class ClientRejected(Exception):
    """A client certificate was refused.

    Attributes:
        reason: what was wrong, for logs (no secrets).
        code: a :class:`RejectCode` (a ``str``).
    """

    def __init__(self, reason: str, code: RejectCode | str) -> None:
        super().__init__(f"{code}: {reason}")
        self.reason = reason
        self.code = RejectCode(code)


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientCheck:
    """An accepted client certificate.

    Attributes:
        identity: who it proves (provider/subject, email, groups).
        serial: the certificate serial (lock by it; print as lower-case hex).
        not_after: when it expires (aware UTC): the session must end by then.
    """

    identity: Identity
    serial: int
    not_after: datetime


def _rank(problem: str) -> tuple[int, RejectCode]:
    for rank, (prefix, code) in enumerate(_LEAF_PROBLEMS):
        if problem.startswith(prefix):
            return rank + 1, code
    return 0, RejectCode.MALFORMED


def check_client(cert: x509.Certificate, *, ca_bundle: Sequence[x509.Certificate], trust_domain: str,
                 max_lifetime: timedelta, now: datetime, locked: LockLookup) -> ClientCheck:
    """Check a client certificate the way the gateway requires, on every connection.

    Checks: everything :func:`~l4proxy.identity.check_leaf` checks (signed by a CA of
    ``ca_bundle`` valid at ``now``, ``now`` within the validity window, CA:FALSE,
    clientAuth, one identity URI of ``trust_domain``, a well-formed identity extension,
    no unknown critical extension); then a lifetime of at most ``max_lifetime`` (counted
    as notAfter - notBefore - :data:`~l4proxy.identity.BACKDATE`, since our CA back-dates
    notBefore by that much: a certificate minted with ``ttl <= max_lifetime`` passes);
    then ``locked(identity, serial)``.

    Args:
        cert: the peer's leaf certificate (e.g. :meth:`l4proxy.tls.TlsStream.peer_certificate`).
        ca_bundle: the CAs trusted now (``CertificateAuthority.bundle(now=...)``).
        trust_domain: our SPIFFE trust domain.
        max_lifetime: the longest certificate lifetime accepted.
        now: the current time (timezone-aware).
        locked: the lock lookup: a reason string when the identity, any of its groups or
            the serial is locked, else None.

    Returns:
        The accepted identity, serial and expiry.

    Raises:
        ClientRejected: the certificate is refused; ``code`` says why.
        ValueError: ``now`` is naive or ``max_lifetime`` is not positive (caller bugs).
    """
    facts = leaf_facts(cert, ca_bundle=ca_bundle, trust_domain=trust_domain)
    return _decide(cert, facts, None, trust_domain=trust_domain, max_lifetime=max_lifetime,
                   now=now, locked=locked)


def _decide(cert: x509.Certificate, facts: LeafFacts, identity: Identity | None, *,
            trust_domain: str, max_lifetime: timedelta, now: datetime,
            locked: LockLookup) -> ClientCheck:
    """:func:`check_client` from the certificate's facts (and its identity, if known)."""
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    if max_lifetime <= timedelta(0):
        raise ValueError("max_lifetime must be positive")
    now = now.astimezone(UTC)
    problems = leaf_problems(cert, facts, now=now)
    if problems:
        _, code = min(_rank(p) for p in problems)
        raise ClientRejected("; ".join(problems), code)
    not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    lifetime = not_after - not_before - BACKDATE
    if lifetime > max_lifetime:
        raise ClientRejected(f"lifetime {not_after - not_before} exceeds the maximum of "
                             f"{max_lifetime} (+{BACKDATE} back-dating)", RejectCode.LIFETIME)
    if identity is None:
        identity = leaf_identity(cert, trust_domain=trust_domain)
    if identity is None:  # pragma: no cover - check_leaf refuses such certificates
        raise ClientRejected("no identity in the certificate", RejectCode.MALFORMED)
    serial = cert.serial_number
    lock_reason = locked(identity, serial)
    if lock_reason is not None:
        raise ClientRejected(f"{identity.name} (serial {serial:x}) is locked: {lock_reason}",
                             RejectCode.LOCKED)
    return ClientCheck(identity=identity, serial=serial, not_after=not_after)


class CheckCache:
    """:func:`check_client` by DER, keeping what does not depend on the time (see the
    module doc) for the ``size`` certificates used most recently.

    Args:
        ca_bundle: the CAs trusted (as for :func:`check_client`).
        trust_domain: our SPIFFE trust domain.
        size: how many certificates to remember (each about 2-3 KiB).
    """

    def __init__(self, *, ca_bundle: Sequence[x509.Certificate], trust_domain: str,
                 size: int = 1024) -> None:
        if size < 1:
            raise ValueError("size must be positive")
        self.ca_bundle = tuple(ca_bundle)
        self.trust_domain = trust_domain
        self.size = size
        self._entries: OrderedDict[bytes, tuple[x509.Certificate, LeafFacts, Identity | None]] = \
            OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def check(self, der: bytes, *, max_lifetime: timedelta, now: datetime,
              locked: LockLookup) -> tuple[x509.Certificate, ClientCheck]:
        """The parsed certificate and :func:`check_client`'s answer for it.

        Raises:
            ClientRejected: as :func:`check_client`; also for DER that does not parse
                (``malformed``).
            ValueError: as :func:`check_client` (caller bugs).
        """
        entry = self._entries.get(der)
        if entry is None:
            try:
                cert = x509.load_der_x509_certificate(der)
            except ValueError:
                raise ClientRejected("the certificate does not parse", RejectCode.MALFORMED) from None
            facts = leaf_facts(cert, ca_bundle=self.ca_bundle, trust_domain=self.trust_domain)
            identity = (leaf_identity(cert, trust_domain=self.trust_domain)
                        if not facts.problems else None)
            entry = (cert, facts, identity)
            self._entries[der] = entry
            if len(self._entries) > self.size:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(der)
        cert, facts, identity = entry
        return cert, _decide(cert, facts, identity, trust_domain=self.trust_domain,
                             max_lifetime=max_lifetime, now=now, locked=locked)
