"""The internal CA: its files, short-lived client certificates, rotation, and leaf checks.

Theory of operation
-------------------
A CA directory (``certs/`` by default) holds everything the gateway needs to issue and
check identity (see :class:`CaFiles`)::

    ca.crt ca.key              the current CA (ECDSA P-256, CA:TRUE, pathlen 0, 5 years)
    server.crt server.key      the gateway's TLS server certificate (90 days)
    recording.key recording.pub  the Ed25519 key that signs session recordings
    trust_domain               the SPIFFE trust domain of every identity URI we mint
    bundle.pem                 the trust bundle: the current CA plus rotated CAs still needed
    old/                       rotated CA certificates and ``rotations.json``
    recording-keys/            ``<key id>.pub`` for every recording key ever used, and
                               ``history.json`` (when each became the active key)

Private keys are created 0600 and directories 0700. Every file is written to a fresh
temporary name (``O_CREAT | O_EXCL``), fsynced, then moved into place atomically; without
``force`` an existing file is never replaced (the move is a hard link, which fails if the
name exists), and :class:`CaExists` lists what is already there.

Everything else is pure: time is always an injected, timezone-aware ``datetime`` (UTC in
every certificate), and apart from the functions documented as writing files nothing
touches the disk.

Client certificates (:meth:`CertificateAuthority.mint_client`) carry only what a verified
ID token proved: a SPIFFE URI SAN, an email SAN when the token had a verified email, and
a non-critical extension :data:`L4PROXY_IDENTITY_OID` with provider, groups and the
token's replay key. They live at most :data:`MAX_LEAF_LIFETIME` and never past the CA.

Rotation keeps a rotated CA in the trust bundle for :data:`MAX_LEAF_LIFETIME` after the
rotation (every leaf it signed has expired by then), then drops it; the old CA's private
key is discarded at rotation (it must never sign again, and a key kept "for reference"
is only a liability). :func:`check_leaf` is the one definition of "an acceptable client
certificate", shared by the data path and the control API.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import ipaddress
import json
import os
import re
import secrets
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from ._csr import ClientPublicKey, check_public_key
from ._model import PROVIDER_NAME, Identity, identity_uri, parse_identity_uri

__all__ = [
    "BACKDATE",
    "BREAKGLASS_MAX_TTL",
    "BREAKGLASS_PROVIDER",
    "CA_LIFETIME",
    "DEFAULT_SERVER_NAMES",
    "IDENTITY_EXTENSION_VERSION",
    "L4PROXY_IDENTITY_OID",
    "MAX_LEAF_LIFETIME",
    "SERVER_LIFETIME",
    "CaError",
    "CaExists",
    "CaFiles",
    "CertificateAuthority",
    "LeafFacts",
    "check_leaf",
    "init_ca",
    "leaf_facts",
    "leaf_identity",
    "leaf_problems",
    "load_recording_keyring",
    "read_identity_extension",
    "read_recording_key_history",
    "recording_key_id",
    "rotate_ca",
    "rotate_recording_key",
    "trust_bundle",
    "write_trust_bundle",
]

#: Our own certificate extension (non-critical) carrying provider, groups and replay key.
#: An OID under ``2.25`` is a UUID read as an integer (ITU-T X.667), so it needs no
#: registration. This one is uuid4 918d1368-fb7c-465f-bdb3-3bd3c8ddc5ae, generated once
#: for l4proxy and fixed forever. Its value is the DER encoding of one UTF8String holding
#: canonical JSON (sorted keys, no spaces, UTF-8)::
#:
#:     {"groups":["eng"],"provider":"github","replay":"jti:abc","v":1}
L4PROXY_IDENTITY_OID = x509.ObjectIdentifier("2.25.193470566929208559730457637669364942254")
#: the ``v`` of the identity extension's JSON
IDENTITY_EXTENSION_VERSION = 1

#: the CA's lifetime (five years, one leap day included)
CA_LIFETIME = timedelta(days=5 * 365 + 1)
#: the gateway server certificate's lifetime
SERVER_LIFETIME = timedelta(days=90)
#: hard cap on any client certificate's lifetime; also how long a rotated CA stays trusted
MAX_LEAF_LIFETIME = timedelta(hours=24)
#: how far notBefore is back-dated, for clocks slightly behind ours
BACKDATE = timedelta(seconds=60)
#: the longest break-glass certificate, unless the caller asks for less
BREAKGLASS_MAX_TTL = timedelta(hours=1)
#: the provider name of break-glass identities (no configured provider may use it)
BREAKGLASS_PROVIDER = "breakglass"
#: server names of a fresh CA's server certificate
DEFAULT_SERVER_NAMES: tuple[str, ...] = ("localhost", "127.0.0.1")

#: SPIFFE trust domain characters
_TRUST_DOMAIN = re.compile(r"[a-z0-9]([a-z0-9._-]{0,253}[a-z0-9])?")
_DNS_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_BREAKGLASS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_MAX_SUBJECT_CHARS = 1024
_MAX_REPLAY_KEY_CHARS = 1024
_CN_MAX = 64
_ROTATIONS_VERSION = 1
#: what cryptography raises for certificate extensions it cannot parse
_EXTENSION_ERRORS = (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType)
_KNOWN_CRITICAL = frozenset({ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE,
                             ExtensionOID.EXTENDED_KEY_USAGE, ExtensionOID.SUBJECT_ALTERNATIVE_NAME})


class CaError(Exception):
    """The CA directory is missing, corrupt or inconsistent, or the CA cannot sign."""


class CaExists(CaError):
    """Refusing to overwrite existing CA files without ``force``.

    Attributes:
        paths: the files that already exist.
    """

    def __init__(self, paths: Iterable[Path]) -> None:
        self.paths = tuple(paths)
        listed = ", ".join(str(p) for p in self.paths)
        super().__init__(f"refusing to overwrite existing CA files without force: {listed}")


# --- the directory layout ------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class CaFiles:
    """The paths of a CA directory (see the module docstring)."""

    dir: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    recording_key: Path
    recording_pub: Path
    trust_domain: Path
    bundle: Path
    old_dir: Path
    rotations: Path
    recording_keys: Path
    recording_history: Path

    @classmethod
    def at(cls, dir: Path | str) -> CaFiles:
        """The layout under ``dir`` (nothing is read or created)."""
        d = Path(dir)
        return cls(dir=d, ca_cert=d / "ca.crt", ca_key=d / "ca.key", server_cert=d / "server.crt",
                   server_key=d / "server.key", recording_key=d / "recording.key",
                   recording_pub=d / "recording.pub", trust_domain=d / "trust_domain",
                   bundle=d / "bundle.pem", old_dir=d / "old", rotations=d / "old" / "rotations.json",
                   recording_keys=d / "recording-keys",
                   recording_history=d / "recording-keys" / "history.json")

    def managed(self) -> tuple[Path, ...]:
        """The files :func:`init_ca` would replace (the keyring is only ever added to)."""
        return (self.ca_cert, self.ca_key, self.server_cert, self.server_key, self.recording_key,
                self.recording_pub, self.trust_domain, self.bundle, self.rotations)


# --- time ------------------------------------------------------------------------------------


def _utc(now: datetime, what: str = "now") -> datetime:
    if not isinstance(now, datetime) or now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"{what} must be a timezone-aware datetime")
    return now.astimezone(UTC)


def _ceil_second(t: datetime) -> datetime:
    return t if t.microsecond == 0 else t.replace(microsecond=0) + timedelta(seconds=1)


def _floor_second(t: datetime) -> datetime:
    return t.replace(microsecond=0)


def _iso(t: datetime) -> str:
    """RFC 3339 UTC: ``2030-01-01T12:00:00Z`` (a fraction only when there is one)."""
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _parse_iso(text: object) -> datetime:
    if not isinstance(text, str):
        raise ValueError("timestamp must be a string")
    return _utc(datetime.fromisoformat(text.replace("Z", "+00:00")), "timestamp")


# --- files -------------------------------------------------------------------------------------


def _make_dir(path: Path) -> None:
    """Create ``path`` (and parents) with mode 0700; an existing directory is left as is."""
    try:
        path.mkdir(parents=True, mode=0o700)
    except FileExistsError:
        if not path.is_dir():
            raise CaError(f"{path} exists and is not a directory") from None
        return
    os.chmod(path, 0o700)  # mkdir's mode is subject to the umask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_file(path: Path, data: bytes, *, private: bool, replace: bool) -> None:
    """Write ``data`` atomically: a fresh temporary file (0600 or 0644), fsync, then a move.

    Without ``replace`` an existing ``path`` is never touched (:class:`CaExists`).
    """
    mode = 0o600 if private else 0o644
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            os.fchmod(fd, mode)  # exactly this mode, whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic and refuses an existing name
            except FileExistsError:
                raise CaExists([path]) from None
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                    raise
                if path.exists() or path.is_symlink():  # no hard links here: check, then move
                    raise CaExists([path]) from None
                os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(path.parent)


def _read(path: Path, *, private: bool = False) -> bytes:
    try:
        if private:
            st = os.stat(path)
            if st.st_mode & 0o077:
                raise CaError(f"{path} is accessible by group or others (chmod 600)")
            if not stat.S_ISREG(st.st_mode):
                raise CaError(f"{path} is not a regular file")
        return path.read_bytes()
    except FileNotFoundError:
        raise CaError(f"{path} is missing") from None
    except OSError as exc:
        raise CaError(f"cannot read {path}: {exc.strerror}") from exc


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _private_pem(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _public_pem(key: ed25519.Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _load_cert(path: Path) -> x509.Certificate:
    data = _read(path)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CaError(f"{path} is not a PEM certificate") from exc
    if len(certs) != 1:
        raise CaError(f"{path} must hold exactly one certificate, not {len(certs)}")
    return certs[0]


def _load_private_key(path: Path) -> object:
    data = _read(path, private=True)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # never include the file's contents
        raise CaError(f"{path} is not an unencrypted PEM private key") from exc


def _load_recording_public(path: Path) -> ed25519.Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(_read(path))
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CaError(f"{path} is not a PEM public key") from exc
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise CaError(f"{path} is not an Ed25519 public key")
    return key


def _spki(key: Any) -> bytes:
    der: bytes = key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return der


# --- names and validation -------------------------------------------------------------------


def _check_trust_domain(trust_domain: str) -> str:
    if not isinstance(trust_domain, str) or not _TRUST_DOMAIN.fullmatch(trust_domain):
        raise ValueError("trust domain must be 1..255 characters of a-z, 0-9, '.', '-', '_' "
                         "(lower case), starting and ending with a letter or digit")
    return trust_domain


def _server_sans(server_names: Sequence[str]) -> list[x509.GeneralName]:
    if isinstance(server_names, str):
        raise ValueError("server_names must be a sequence of names, not one string")
    if not server_names:
        raise ValueError("at least one server name is required")
    sans: list[x509.GeneralName] = []
    for name in server_names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            continue
        except ValueError:
            pass
        labels = name.split(".")
        if (len(name) > 253 or not name.isascii()
                or not all(_DNS_LABEL.fullmatch(label) for label in labels)):
            raise ValueError(f"not a DNS name or IP address: {name!r} (use the A-label form of "
                             "international names)")
        sans.append(x509.DNSName(name.lower()))
    if len(set(sans)) != len(sans):
        raise ValueError("server names repeat")
    return sans


def _cn(text: str) -> x509.NameAttribute[str]:
    return x509.NameAttribute(NameOID.COMMON_NAME, text[:_CN_MAX])


def _check_ttl(ttl: timedelta, what: str = "ttl") -> None:
    if not isinstance(ttl, timedelta):
        raise ValueError(f"{what} must be a timedelta")
    if ttl <= timedelta(0):
        raise ValueError(f"{what} must be positive")
    if ttl > MAX_LEAF_LIFETIME:
        raise ValueError(f"{what} of {ttl} exceeds the hard cap of {MAX_LEAF_LIFETIME}")


# --- the identity extension -----------------------------------------------------------------


def _der_utf8string(text: str) -> bytes:
    data = text.encode("utf-8")
    n = len(data)
    if n < 0x80:
        length = bytes([n])
    else:
        size = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(size)]) + size
    return b"\x0c" + length + data


def _parse_der_utf8string(der: bytes) -> str:
    """Strict DER: tag UTF8String, minimal definite length, nothing after the value."""
    if len(der) < 2 or der[0] != 0x0C:
        raise ValueError("not a DER UTF8String")
    first = der[1]
    if first < 0x80:
        n, offset = first, 2
    else:
        k = first & 0x7F
        if not 1 <= k <= 4 or len(der) < 2 + k or der[2] == 0:
            raise ValueError("bad DER length")
        n, offset = int.from_bytes(der[2:2 + k], "big"), 2 + k
        if n < 0x80:
            raise ValueError("non-minimal DER length")
    if len(der) != offset + n:
        raise ValueError("DER length does not match the value")
    return der[offset:].decode("utf-8")


def _identity_json(provider: str, groups: Iterable[str], replay_key: str) -> str:
    doc = {"groups": sorted(set(groups)), "provider": provider, "replay": replay_key,
           "v": IDENTITY_EXTENSION_VERSION}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def read_identity_extension(cert: x509.Certificate) -> dict[str, Any] | None:
    """Parse the :data:`L4PROXY_IDENTITY_OID` extension of ``cert``.

    Returns:
        ``{"groups": [str, ...], "provider": str, "replay": str, "v": 1}``, or None when
        the certificate has no such extension.

    Raises:
        ValueError: the extension is present but critical, not a DER UTF8String, not
            canonical JSON, or not of the documented shape and version.
    """
    try:
        ext = cert.extensions.get_extension_for_oid(L4PROXY_IDENTITY_OID)
    except x509.ExtensionNotFound:
        return None
    except _EXTENSION_ERRORS as exc:
        raise ValueError("malformed certificate extensions") from exc
    if ext.critical:
        raise ValueError("the l4proxy identity extension must not be critical")
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise ValueError("the l4proxy identity extension has an unexpected type")
    try:
        text = _parse_der_utf8string(value.value)
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError("the l4proxy identity extension is not a UTF8String of JSON") from exc
    if not isinstance(doc, dict) or set(doc) != {"groups", "provider", "replay", "v"}:
        raise ValueError("the l4proxy identity extension has unexpected fields")
    if doc["v"] != IDENTITY_EXTENSION_VERSION or isinstance(doc["v"], bool):
        raise ValueError("unsupported l4proxy identity extension version")
    groups, provider, replay = doc["groups"], doc["provider"], doc["replay"]
    if (not isinstance(groups, list) or not all(isinstance(g, str) for g in groups)
            or not isinstance(provider, str) or not isinstance(replay, str)):
        raise ValueError("the l4proxy identity extension has fields of the wrong type")
    if _identity_json(provider, groups, replay) != text:
        raise ValueError("the l4proxy identity extension is not canonical JSON")
    return doc


# --- leaf checks ----------------------------------------------------------------------------


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def check_leaf(cert: x509.Certificate, *, ca_bundle: Sequence[x509.Certificate], trust_domain: str,
               now: datetime) -> list[str]:
    """Every reason ``cert`` is not an acceptable l4proxy client certificate at ``now``.

    The checks (beyond what TLS libraries do, which may skip some of them): signed by a
    CA of ``ca_bundle`` that is itself valid at ``now``; ``now`` within the validity
    window; basicConstraints present with CA:FALSE; key usage (if present) allows
    digitalSignature; extended key usage includes clientAuth; exactly one URI SAN, an
    identity URI of ``trust_domain``; the identity extension present, well formed and
    naming the same provider; no critical extension we do not know.

    It is :func:`leaf_facts` (what does not depend on the time) then
    :func:`leaf_problems` (the rest, at ``now``): a caller that sees the same certificate
    again may keep the facts.

    Args:
        cert: the peer's leaf certificate.
        ca_bundle: the trusted CAs (see :func:`trust_bundle`).
        trust_domain: the trust domain identities must belong to.
        now: the current time (timezone-aware).

    Returns:
        Human-readable problems (they name no secrets); empty when the certificate is
        acceptable.
    """
    return leaf_problems(cert, leaf_facts(cert, ca_bundle=ca_bundle, trust_domain=trust_domain),
                         now=now)


@dataclass(frozen=True, slots=True)
class LeafFacts:
    """What :func:`check_leaf` finds about a certificate that does not depend on the time:
    a pure function of the certificate, the CA bundle and the trust domain."""

    #: the CAs of the bundle whose signature the certificate carries
    issuers: tuple[x509.Certificate, ...]
    #: the problems of its extensions (CA:FALSE, clientAuth, identity URI and extension...)
    problems: tuple[str, ...]


def leaf_facts(cert: x509.Certificate, *, ca_bundle: Sequence[x509.Certificate],
               trust_domain: str) -> LeafFacts:
    """The time-independent half of :func:`check_leaf` (the signature checks and the
    extensions: most of its cost)."""
    issuers = tuple(ca for ca in ca_bundle if _issued_by(cert, ca))
    try:
        problems = tuple(_extension_problems(cert, trust_domain))
    except _EXTENSION_ERRORS:
        problems = ("malformed certificate extensions",)
    return LeafFacts(issuers=issuers, problems=problems)


def leaf_problems(cert: x509.Certificate, facts: LeafFacts, *, now: datetime) -> list[str]:
    """:func:`check_leaf`'s answer at ``now`` from the certificate's :func:`leaf_facts`
    (the issuing CA valid now, ``now`` within the validity window)."""
    now = _utc(now)
    problems: list[str] = []
    if not facts.issuers:
        problems.append("not signed by a CA in the trust bundle")
    elif not any(ca.not_valid_before_utc <= now <= ca.not_valid_after_utc for ca in facts.issuers):
        problems.append("the issuing CA is not valid now")
    if now < cert.not_valid_before_utc:
        problems.append(f"not valid before {_iso(cert.not_valid_before_utc)}")
    if now > cert.not_valid_after_utc:
        problems.append(f"expired at {_iso(cert.not_valid_after_utc)}")
    problems.extend(facts.problems)
    return problems


def _extension_problems(cert: x509.Certificate, trust_domain: str) -> list[str]:
    problems: list[str] = []
    exts = cert.extensions
    for ext in exts:
        if ext.critical and ext.oid not in _KNOWN_CRITICAL:
            problems.append(f"unknown critical extension {ext.oid.dotted_string}")
    try:
        if exts.get_extension_for_class(x509.BasicConstraints).value.ca:
            problems.append("basicConstraints CA:TRUE: a CA certificate is not a client certificate")
    except x509.ExtensionNotFound:
        problems.append("no basicConstraints extension (CA:FALSE required)")
    with contextlib.suppress(x509.ExtensionNotFound):
        if not exts.get_extension_for_class(x509.KeyUsage).value.digital_signature:
            problems.append("key usage lacks digitalSignature")
    try:
        if ExtendedKeyUsageOID.CLIENT_AUTH not in exts.get_extension_for_class(x509.ExtendedKeyUsage).value:
            problems.append("extended key usage lacks clientAuth")
    except x509.ExtensionNotFound:
        problems.append("no extended key usage extension (clientAuth required)")
    uris: list[str] = []
    with contextlib.suppress(x509.ExtensionNotFound):
        san = exts.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    parsed = parse_identity_uri(trust_domain, uris[0]) if len(uris) == 1 else None
    if len(uris) > 1:
        problems.append("more than one URI SAN")
    elif parsed is None:
        problems.append(f"no identity URI SAN in trust domain {trust_domain}")
    try:
        doc = read_identity_extension(cert)
    except ValueError as exc:
        problems.append(str(exc))
    else:
        if doc is None:
            problems.append("no l4proxy identity extension")
        elif parsed is not None and doc["provider"] != parsed[0]:
            problems.append("the identity extension and the URI SAN name different providers")
    return problems


def leaf_identity(cert: x509.Certificate, *, trust_domain: str) -> Identity | None:
    """The identity a client certificate carries (call :func:`check_leaf` first).

    Returns:
        The identity from the URI SAN, the email SAN and the identity extension's groups,
        or None if the certificate carries no well-formed identity of ``trust_domain``.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        doc = read_identity_extension(cert)
    except (x509.ExtensionNotFound, *_EXTENSION_ERRORS):
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    parsed = parse_identity_uri(trust_domain, uris[0]) if len(uris) == 1 else None
    if parsed is None or doc is None or doc["provider"] != parsed[0]:
        return None
    emails = san.get_values_for_type(x509.RFC822Name)
    return Identity(provider=parsed[0], subject=parsed[1], email=emails[0] if len(emails) == 1 else None,
                    groups=tuple(doc["groups"]))


# --- certificate builders ---------------------------------------------------------------------


def _ca_name(trust_domain: str, ski: x509.SubjectKeyIdentifier) -> x509.Name:
    # the OU tells rotated CAs of one trust domain apart by name too
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "l4proxy"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"CA key {ski.digest.hex()[:16]}"),
        _cn(f"l4proxy CA {trust_domain}"),
    ])


def _build_ca(key: ec.EllipticCurvePrivateKey, trust_domain: str, now: datetime) -> x509.Certificate:
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    name = _ca_name(trust_domain, ski)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_ceil_second(now - BACKDATE))
        .not_valid_after(_floor_second(now + CA_LIFETIME))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )


def _leaf_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                         crl_sign=False, encipher_only=False, decipher_only=False)


def _server_names_of(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names = list(san.get_values_for_type(x509.DNSName))
    names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return names


# --- the CA ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _OldCa:
    certificate: x509.Certificate
    rotated_at: datetime
    retain_until: datetime


class CertificateAuthority:
    """A loaded CA directory: mints client, server and break-glass certificates.

    Build one with :meth:`load` (or :func:`init_ca` first). Minting is pure; only
    :meth:`issue_server` writes files.
    """

    def __init__(self, *, files: CaFiles, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey,
                 trust_domain: str, recording_key: ed25519.Ed25519PrivateKey,
                 old_cas: Sequence[_OldCa] = ()) -> None:
        self._files = files
        self._certificate = certificate
        self._key = key
        self._trust_domain = _check_trust_domain(trust_domain)
        self._recording_key = recording_key
        self._old_cas = tuple(old_cas)
        self._ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())

    def __repr__(self) -> str:  # never the key
        return f"<CertificateAuthority {self._trust_domain} serial={self._certificate.serial_number:x}>"

    @classmethod
    def load(cls, dir: Path | str) -> CertificateAuthority:
        """Load and cross-check a CA directory.

        Raises:
            CaError: a required file (``ca.crt``, ``ca.key``, ``trust_domain``,
                ``recording.key``, and the rotated CAs ``old/rotations.json`` names) is
                missing or corrupt, a private key is readable by group or others, a key
                does not match its certificate or public key, or ``ca.crt`` is not a CA.
        """
        files = CaFiles.at(dir)
        missing = [p for p in (files.ca_cert, files.ca_key, files.trust_domain, files.recording_key)
                   if not p.exists()]
        if missing:
            raise CaError("CA directory incomplete, missing: " + ", ".join(str(p) for p in missing))
        certificate = _load_cert(files.ca_cert)
        key = _load_private_key(files.ca_key)
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise CaError(f"{files.ca_key} is not an ECDSA P-256 key")
        if _spki(key.public_key()) != _spki(certificate.public_key()):
            raise CaError(f"{files.ca_key} does not match {files.ca_cert}")
        try:
            bc = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
        except (x509.ExtensionNotFound, *_EXTENSION_ERRORS):
            bc = None
        if bc is None or not bc.ca:
            raise CaError(f"{files.ca_cert} is not a CA certificate")
        trust_domain = _read_trust_domain(files)
        recording_key = _load_private_key(files.recording_key)
        if not isinstance(recording_key, ed25519.Ed25519PrivateKey):
            raise CaError(f"{files.recording_key} is not an Ed25519 private key")
        if files.recording_pub.exists():
            pub = _load_recording_public(files.recording_pub)
            if pub.public_bytes_raw() != recording_key.public_key().public_bytes_raw():
                raise CaError(f"{files.recording_key} does not match {files.recording_pub}")
        return cls(files=files, certificate=certificate, key=key, trust_domain=trust_domain,
                   recording_key=recording_key, old_cas=_read_old_cas(files))

    # -- what it is --

    @property
    def files(self) -> CaFiles:
        """The paths of the CA directory."""
        return self._files

    @property
    def certificate(self) -> x509.Certificate:
        """The current CA certificate."""
        return self._certificate

    @property
    def trust_domain(self) -> str:
        """The trust domain of every identity this CA mints."""
        return self._trust_domain

    @property
    def recording_key(self) -> ed25519.Ed25519PrivateKey:
        """The current recording signing key."""
        return self._recording_key

    @property
    def recording_key_id(self) -> str:
        """The current recording key's id (see :func:`recording_key_id`)."""
        return recording_key_id(self._recording_key.public_key())

    def bundle(self, *, now: datetime) -> list[x509.Certificate]:
        """The trust bundle at ``now``: the current CA, then rotated CAs still retained."""
        return _prune(self._certificate, self._old_cas, _utc(now))

    def bundle_pem(self, *, now: datetime) -> bytes:
        """:meth:`bundle` as concatenated PEM (what ``GET /v1/ca`` serves)."""
        return b"".join(_cert_pem(c) for c in self.bundle(now=now))

    # -- minting --

    def _check_valid(self, now: datetime) -> None:
        cert = self._certificate
        if now < cert.not_valid_before_utc:
            raise CaError(f"the CA is not valid before {_iso(cert.not_valid_before_utc)}")
        if now >= cert.not_valid_after_utc:
            raise CaError(f"the CA expired at {_iso(cert.not_valid_after_utc)}; rotate it")

    def _window(self, now: datetime, lifetime: timedelta) -> tuple[datetime, datetime]:
        not_before = max(_ceil_second(now - BACKDATE), self._certificate.not_valid_before_utc)
        not_after = min(_floor_second(now + lifetime), self._certificate.not_valid_after_utc)
        if not_after <= now:
            raise CaError("the CA expires too soon to issue a certificate")
        return not_before, not_after

    def _leaf_builder(self, *, public_key: Any, subject: x509.Name, now: datetime,
                      lifetime: timedelta) -> x509.CertificateBuilder:
        not_before, not_after = self._window(now, lifetime)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_leaf_key_usage(), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._ski),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        )

    def mint_client(self, *, public_key: ClientPublicKey, identity: Identity, replay_key: str,
                    ttl: timedelta, now: datetime) -> x509.Certificate:
        """Mint a short-lived mTLS client certificate for a verified identity.

        The certificate: CA:FALSE (critical); key usage digitalSignature only (critical);
        extended key usage clientAuth only; SAN URI :func:`identity_uri` plus an email SAN
        when ``identity.email`` is set; subject CN ``identity.name`` (first 64 characters);
        random serial; notBefore ``now - 60 s``; notAfter ``now + ttl`` but never past the
        CA's notAfter; authority and subject key identifiers; and the non-critical
        :data:`L4PROXY_IDENTITY_OID` extension (provider, groups, replay key).

        Args:
            public_key: the client's key (from :func:`load_csr`); re-checked here.
            identity: who the verified token proves (never anything from the CSR).
            replay_key: the token's replay key (recorded in the certificate for audit).
            ttl: the lifetime, at most :data:`MAX_LEAF_LIFETIME` (clamp to per-provider
                maximums before calling).
            now: the current time (timezone-aware).

        Returns:
            The signed certificate.

        Raises:
            ValueError: ``ttl`` not positive or above the hard cap; a naive ``now``; an
                invalid provider name, empty or oversized subject or replay key, or an
                email that cannot be an RFC 822 name.
            CsrRejected: the public key's algorithm is not allowed.
            CaError: the CA is not valid at ``now``.
        """
        now = _utc(now)
        _check_ttl(ttl)
        check_public_key(public_key)
        if not PROVIDER_NAME.fullmatch(identity.provider):
            raise ValueError("invalid provider name in identity")
        if not identity.subject or len(identity.subject) > _MAX_SUBJECT_CHARS:
            raise ValueError(f"identity subject must be 1..{_MAX_SUBJECT_CHARS} characters")
        if not isinstance(replay_key, str) or not 0 < len(replay_key) <= _MAX_REPLAY_KEY_CHARS:
            raise ValueError(f"replay key must be 1..{_MAX_REPLAY_KEY_CHARS} characters")
        if not all(isinstance(g, str) for g in identity.groups):
            raise ValueError("identity groups must be strings")
        self._check_valid(now)
        sans: list[x509.GeneralName] = [
            x509.UniformResourceIdentifier(identity_uri(self._trust_domain, identity.provider,
                                                        identity.subject)),
        ]
        if identity.email is not None:
            email = identity.email
            if not email.isascii() or email.count("@") != 1 or any(c in email for c in " <>\r\n\t"):
                raise ValueError("identity email cannot be an RFC 822 name (ASCII user@domain required)")
            sans.append(x509.RFC822Name(email))
        extension = _der_utf8string(_identity_json(identity.provider, identity.groups, replay_key))
        builder = (
            self._leaf_builder(public_key=public_key, subject=x509.Name([_cn(identity.name)]), now=now,
                               lifetime=ttl)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.UnrecognizedExtension(L4PROXY_IDENTITY_OID, extension), critical=False)
        )
        return builder.sign(self._key, hashes.SHA256())

    def issue_breakglass(self, *, name: str, public_key: ClientPublicKey, ttl: timedelta, now: datetime,
                         max_ttl: timedelta = BREAKGLASS_MAX_TTL,
                         groups: Sequence[str] = ()) -> tuple[x509.Certificate, bool]:
        """Mint a break-glass client certificate locally, for when the IdP is down.

        The identity is ``breakglass/<name>``; the replay key is ``breakglass:<random>``.
        The caller audits the issuance.

        Args:
            name: who it is for: 1..64 of letters, digits, ``._@-``.
            public_key: the holder's public key.
            ttl: the requested lifetime; clamped to ``max_ttl``.
            now: the current time (timezone-aware).
            max_ttl: the break-glass maximum (default 1 h; at most the hard cap).
            groups: groups to grant.

        Returns:
            ``(certificate, clamped)``; ``clamped`` is true when ``ttl`` was above ``max_ttl``.

        Raises:
            ValueError: a bad name, a non-positive ``ttl`` or a bad ``max_ttl``.
            CsrRejected, CaError: as :meth:`mint_client`.
        """
        if not isinstance(name, str) or not _BREAKGLASS_NAME.fullmatch(name):
            raise ValueError("break-glass name must be 1..64 of letters, digits, '.', '_', '@', '-'")
        _check_ttl(max_ttl, "max_ttl")
        if not isinstance(ttl, timedelta) or ttl <= timedelta(0):
            raise ValueError("ttl must be a positive timedelta")
        clamped = ttl > max_ttl
        identity = Identity(provider=BREAKGLASS_PROVIDER, subject=name, groups=tuple(sorted(set(groups))))
        cert = self.mint_client(public_key=public_key, identity=identity,
                                replay_key=f"breakglass:{secrets.token_hex(16)}",
                                ttl=min(ttl, max_ttl), now=now)
        return cert, clamped

    def build_server_certificate(self, *, server_names: Sequence[str], now: datetime
                                 ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """A fresh server key and certificate (pure; :meth:`issue_server` writes them).

        The certificate: ECDSA P-256, :data:`SERVER_LIFETIME` (never past the CA), SANs
        from ``server_names`` (IP addresses as IPAddress, others as DNSName), extended
        key usage serverAuth, CA:FALSE and digitalSignature (both critical).

        Raises:
            ValueError: no names, or a name that is neither a DNS name nor an IP address.
            CaError: the CA is not valid at ``now``.
        """
        now = _utc(now)
        sans = _server_sans(server_names)
        self._check_valid(now)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "l4proxy"),
                             _cn(str(server_names[0]))])
        cert = (
            self._leaf_builder(public_key=key.public_key(), subject=subject, now=now,
                               lifetime=SERVER_LIFETIME)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return key, cert

    def issue_server(self, *, server_names: Sequence[str] | None = None, now: datetime,
                     force: bool = True) -> x509.Certificate:
        """Renew ``server.crt`` and ``server.key`` under this CA (writes both files).

        Args:
            server_names: DNS names and IP addresses; default the current server
                certificate's names (or :data:`DEFAULT_SERVER_NAMES` if there is none).
            now: the current time (timezone-aware).
            force: replace existing files (the default: renewing is the point).

        Returns:
            The new server certificate.

        Raises:
            CaExists: a server file exists and ``force`` is false.
            ValueError, CaError: as :meth:`build_server_certificate`.
        """
        files = self._files
        if not force:
            existing = [p for p in (files.server_cert, files.server_key) if p.exists()]
            if existing:
                raise CaExists(existing)
        if server_names is None:
            server_names = _current_server_names(files)
        key, cert = self.build_server_certificate(server_names=server_names, now=now)
        _write_file(files.server_key, _private_pem(key), private=True, replace=force)
        _write_file(files.server_cert, _cert_pem(cert), private=False, replace=force)
        return cert


def _current_server_names(files: CaFiles) -> list[str]:
    if files.server_cert.exists():
        try:
            names = _server_names_of(_load_cert(files.server_cert))
        except (CaError, *_EXTENSION_ERRORS):
            names = []
        if names:
            return names
    return list(DEFAULT_SERVER_NAMES)


def _read_trust_domain(files: CaFiles) -> str:
    try:
        text = _read(files.trust_domain).decode("ascii").strip()
        return _check_trust_domain(text)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CaError(f"{files.trust_domain} does not hold a valid trust domain") from exc


# --- rotation records and the trust bundle --------------------------------------------------


def _read_rotations(files: CaFiles) -> list[dict[str, str]]:
    if not files.rotations.exists():
        return []
    try:
        doc = json.loads(_read(files.rotations))
        if not isinstance(doc, dict) or doc.get("v") != _ROTATIONS_VERSION:
            raise ValueError("unsupported version")
        entries = doc["rotations"]
        if not isinstance(entries, list):
            raise ValueError("rotations must be a list")
        out: list[dict[str, str]] = []
        for e in entries:
            if not isinstance(e, dict) or not all(isinstance(e.get(k), str) for k in
                                                  ("serial", "file", "rotated_at", "retain_until")):
                raise ValueError("bad rotation entry")
            if not re.fullmatch(r"ca-[0-9a-f]{1,64}\.crt", e["file"]):
                raise ValueError("bad file name in rotation entry")
            _parse_iso(e["rotated_at"])
            _parse_iso(e["retain_until"])
            out.append({k: e[k] for k in ("serial", "file", "rotated_at", "retain_until")})
        return out
    except (ValueError, KeyError) as exc:
        raise CaError(f"{files.rotations} is corrupt") from exc


def _write_rotations(files: CaFiles, entries: list[dict[str, str]]) -> None:
    doc = {"v": _ROTATIONS_VERSION, "rotations": entries}
    data = (json.dumps(doc, sort_keys=True, indent=2) + "\n").encode()
    _write_file(files.rotations, data, private=False, replace=True)


def _read_old_cas(files: CaFiles) -> list[_OldCa]:
    return [_OldCa(certificate=_load_cert(files.old_dir / e["file"]),
                   rotated_at=_parse_iso(e["rotated_at"]), retain_until=_parse_iso(e["retain_until"]))
            for e in _read_rotations(files)]


def _prune(current: x509.Certificate, old_cas: Iterable[_OldCa], now: datetime) -> list[x509.Certificate]:
    kept = [o for o in old_cas if now < o.retain_until and now <= o.certificate.not_valid_after_utc]
    kept.sort(key=lambda o: o.rotated_at, reverse=True)
    return [current, *(o.certificate for o in kept)]


def trust_bundle(dir: Path | str, now: datetime) -> list[x509.Certificate]:
    """The trust bundle of a CA directory at ``now`` (reads files; no private key needed).

    Returns:
        The current CA first, then every rotated CA still within its retention
        (:data:`MAX_LEAF_LIFETIME` after its rotation) and not itself expired, newest first.

    Raises:
        CaError: ``ca.crt``, ``old/rotations.json`` or a rotated CA file is missing or corrupt.
    """
    files = CaFiles.at(dir)
    return _prune(_load_cert(files.ca_cert), _read_old_cas(files), _utc(now))


def write_trust_bundle(dir: Path | str, *, now: datetime) -> list[x509.Certificate]:
    """Rewrite ``bundle.pem`` as :func:`trust_bundle` at ``now`` (drops expired entries).

    Raises:
        CaError: as :func:`trust_bundle`.
    """
    bundle = trust_bundle(dir, now)
    _write_file(CaFiles.at(dir).bundle, b"".join(_cert_pem(c) for c in bundle), private=False, replace=True)
    return bundle


# --- recording keys -----------------------------------------------------------------------


def recording_key_id(public_key: ed25519.Ed25519PublicKey) -> str:
    """A recording key's id: SHA-256 hex of the raw 32-byte Ed25519 public key."""
    return hashlib.sha256(public_key.public_bytes_raw()).hexdigest()


def load_recording_keyring(dir: Path | str) -> dict[str, ed25519.Ed25519PublicKey]:
    """Every recording public key ever used, by key id (``recording-keys/<id>.pub``).

    Raises:
        CaError: the keyring is missing, or a file is corrupt or named for another key.
    """
    files = CaFiles.at(dir)
    if not files.recording_keys.is_dir():
        raise CaError(f"{files.recording_keys} is missing")
    keyring: dict[str, ed25519.Ed25519PublicKey] = {}
    for path in sorted(files.recording_keys.glob("*.pub")):
        key = _load_recording_public(path)
        key_id = recording_key_id(key)
        if path.stem != key_id:
            raise CaError(f"{path} holds the key with id {key_id}, not {path.stem}")
        keyring[key_id] = key
    return keyring


def read_recording_key_history(dir: Path | str) -> list[tuple[str, datetime]]:
    """``(key id, activated at)`` for each recording key, oldest first.

    An auditor can check that a recording was signed by the key active when it was made.

    Raises:
        CaError: ``recording-keys/history.json`` is corrupt.
    """
    files = CaFiles.at(dir)
    if not files.recording_history.exists():
        return []
    try:
        doc = json.loads(_read(files.recording_history))
        if not isinstance(doc, dict) or doc.get("v") != 1 or not isinstance(doc.get("keys"), list):
            raise ValueError("unsupported history")
        return [(str(e["key_id"]), _parse_iso(e["activated_at"])) for e in doc["keys"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise CaError(f"{files.recording_history} is corrupt") from exc


def _install_recording_key(files: CaFiles, key: ed25519.Ed25519PrivateKey, now: datetime, *,
                           replace: bool) -> str:
    """Add ``key`` to the keyring and history, then make it the current recording key."""
    public = key.public_key()
    key_id = recording_key_id(public)
    entry = files.recording_keys / f"{key_id}.pub"
    if not entry.exists():
        _write_file(entry, _public_pem(public), private=False, replace=False)
    history = [(k, t) for k, t in read_recording_key_history(files.dir) if k != key_id]
    history.append((key_id, now))
    doc = {"v": 1, "keys": [{"key_id": k, "activated_at": _iso(t)} for k, t in history]}
    _write_file(files.recording_history, (json.dumps(doc, indent=2) + "\n").encode(), private=False,
                replace=True)
    _write_file(files.recording_key, _private_pem(key), private=True, replace=replace)
    _write_file(files.recording_pub, _public_pem(public), private=False, replace=replace)
    return key_id


def _keep_current_recording_pub(files: CaFiles) -> None:
    """Make sure the current recording public key is in the keyring before replacing it."""
    if not files.recording_pub.exists():
        return
    try:
        public = _load_recording_public(files.recording_pub)
    except CaError:
        return  # unreadable: there is nothing to keep
    entry = files.recording_keys / f"{recording_key_id(public)}.pub"
    if not entry.exists():
        _write_file(entry, _public_pem(public), private=False, replace=False)


def rotate_recording_key(dir: Path | str, *, now: datetime) -> str:
    """Start a new recording key; the old public key stays in the keyring (writes files).

    Returns:
        The new key id.

    Raises:
        CaError: the CA directory has no recording key or keyring to rotate.
    """
    now = _utc(now)
    files = CaFiles.at(dir)
    if not files.recording_keys.is_dir() or not files.recording_key.exists():
        raise CaError(f"no recording key to rotate in {files.dir} (run init first)")
    _keep_current_recording_pub(files)
    return _install_recording_key(files, ed25519.Ed25519PrivateKey.generate(), now, replace=True)


# --- init and rotation ----------------------------------------------------------------------


def init_ca(dir: Path | str, *, trust_domain: str, server_names: Sequence[str] = DEFAULT_SERVER_NAMES,
            now: datetime, force: bool = False) -> CaFiles:
    """Create a CA directory: CA, server certificate, recording key, keyring, trust bundle.

    With ``force`` an existing CA is replaced outright: its certificate is not kept in the
    trust bundle, and every previously rotated CA stops being trusted at ``now`` (a forced
    init is what you do after a compromise). Recording public keys are never removed.

    Args:
        dir: the CA directory (created 0700 if missing).
        trust_domain: the SPIFFE trust domain of minted identities.
        server_names: the server certificate's DNS names and IP addresses.
        now: the current time (timezone-aware).
        force: replace existing files.

    Returns:
        The paths written.

    Raises:
        CaExists: a CA file exists and ``force`` is false (nothing is written).
        ValueError: a bad trust domain or server name, or a naive ``now``.
    """
    now = _utc(now)
    _check_trust_domain(trust_domain)
    _server_sans(server_names)  # validate before writing anything
    files = CaFiles.at(dir)
    existing = [p for p in files.managed() if p.exists() or p.is_symlink()]
    if existing and not force:
        raise CaExists(existing)
    for d in (files.dir, files.old_dir, files.recording_keys):
        _make_dir(d)
    rotations: list[dict[str, str]] = []
    if force:
        with contextlib.suppress(CaError):  # unreadable records: nothing to distrust
            rotations = _read_rotations(files)
    for e in rotations:  # distrust every older CA now
        e["retain_until"] = _iso(min(_parse_iso(e["retain_until"]), now))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _build_ca(ca_key, trust_domain, now)
    recording_key = ed25519.Ed25519PrivateKey.generate()
    ca = CertificateAuthority(files=files, certificate=ca_cert, key=ca_key, trust_domain=trust_domain,
                              recording_key=recording_key)
    server_key, server_cert = ca.build_server_certificate(server_names=server_names, now=now)

    _write_file(files.ca_key, _private_pem(ca_key), private=True, replace=force)
    _write_file(files.ca_cert, _cert_pem(ca_cert), private=False, replace=force)
    _write_file(files.server_key, _private_pem(server_key), private=True, replace=force)
    _write_file(files.server_cert, _cert_pem(server_cert), private=False, replace=force)
    if force:
        _keep_current_recording_pub(files)
    _install_recording_key(files, recording_key, now, replace=force)
    _write_file(files.trust_domain, f"{trust_domain}\n".encode(), private=False, replace=force)
    _write_rotations(files, rotations)
    _write_file(files.bundle, _cert_pem(ca_cert), private=False, replace=force)
    return files


def rotate_ca(dir: Path | str, *, now: datetime) -> CaFiles:
    """Replace the CA with a new one, keeping the old one trusted while its leaves live.

    The old certificate moves to ``old/ca-<serial hex>.crt`` and is recorded in
    ``old/rotations.json``; it stays in the trust bundle until ``now +``
    :data:`MAX_LEAF_LIFETIME`. The old private key is discarded. The server certificate
    is re-issued under the new CA with the same names, and ``bundle.pem`` is rewritten.

    Running gateways must reload the CA (:meth:`CertificateAuthority.load`): one that
    kept minting with the old key would issue leaves that outlive the old CA's retention.

    Returns:
        The paths.

    Raises:
        CaError: the CA directory does not load (see :meth:`CertificateAuthority.load`).
    """
    now = _utc(now)
    files = CaFiles.at(dir)
    old = CertificateAuthority.load(files.dir)
    server_names = _current_server_names(files)

    key = ec.generate_private_key(ec.SECP256R1())
    cert = _build_ca(key, old.trust_domain, now)
    new = CertificateAuthority(files=files, certificate=cert, key=key, trust_domain=old.trust_domain,
                               recording_key=old.recording_key, old_cas=old._old_cas)
    server_key, server_cert = new.build_server_certificate(server_names=server_names, now=now)

    _make_dir(files.old_dir)
    serial = f"{old.certificate.serial_number:x}"
    name = f"ca-{serial}.crt"
    _write_file(files.old_dir / name, _cert_pem(old.certificate), private=False, replace=True)
    rotations = [e for e in _read_rotations(files) if e["file"] != name]
    rotations.append({"serial": serial, "file": name, "rotated_at": _iso(now),
                      "retain_until": _iso(now + MAX_LEAF_LIFETIME)})
    _write_rotations(files, rotations)  # the old CA is trusted before the new one is live
    _write_file(files.ca_key, _private_pem(key), private=True, replace=True)
    _write_file(files.ca_cert, _cert_pem(cert), private=False, replace=True)
    _write_file(files.server_key, _private_pem(server_key), private=True, replace=True)
    _write_file(files.server_cert, _cert_pem(server_cert), private=False, replace=True)
    write_trust_bundle(files.dir, now=now)
    return files
