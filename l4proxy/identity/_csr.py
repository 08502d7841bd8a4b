"""Certificate signing requests: what we take from a client's CSR, and what we refuse.

Theory of operation: a CSR contributes exactly one thing to a certificate, its public key,
and only after the CSR proves possession of the matching private key (its self-signature
verifies). Its subject, its requested extensions and any attributes are ignored entirely:
the identity in a certificate comes from a verified ID token, never from the client.

Before cryptography parses anything the input is bounded (at most 16 KiB) and must be
exactly one PEM ``CERTIFICATE REQUEST`` block with nothing but whitespace around it. The
public key must be one of the algorithms in :data:`ALLOWED_KEYS`. Every refusal raises
:class:`CsrRejected` (a ``ValueError``) whose message says precisely what was wrong; the
messages never echo the input.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

__all__ = [
    "ALLOWED_KEYS",
    "MAX_CSR_BYTES",
    "ClientPublicKey",
    "CsrKey",
    "CsrRejected",
    "check_public_key",
    "key_binding",
    "load_csr",
]

#: the largest CSR we read, in bytes (a 4096-bit RSA CSR in PEM is about 1.7 KiB)
MAX_CSR_BYTES = 16 * 1024

#: RSA modulus sizes we accept, in bits (inclusive)
RSA_MIN_BITS = 2048
RSA_MAX_BITS = 4096

#: human-readable list of the public keys a client certificate may carry
ALLOWED_KEYS = ("EC P-256", "EC P-384", "Ed25519", f"RSA {RSA_MIN_BITS}..{RSA_MAX_BITS}")

_ALLOWED_CURVES: dict[str, str] = {"secp256r1": "EC P-256", "secp384r1": "EC P-384"}

#: signature hashes too weak to prove possession of a key
_WEAK_HASHES = ("md5", "sha1")

#: the public keys a client certificate may carry
ClientPublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey

_PEM_BEGIN = re.compile(rb"-----BEGIN ([^-\r\n]{0,64})-----")
_PEM_END = re.compile(rb"-----END ([^-\r\n]{0,64})-----")
_CSR_LABEL = b"CERTIFICATE REQUEST"


class CsrRejected(ValueError):
    """The CSR was refused; the message says why (and never repeats the input)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CsrKey:
    """The one thing a CSR contributes: a public key whose possession it proved.

    Attributes:
        public_key: the client's public key (one of :data:`ALLOWED_KEYS`).
        key_type: a short description such as ``"EC P-256"`` or ``"RSA 2048"``.
        binding: SHA-256 hex of the DER SubjectPublicKeyInfo; ties a certificate (and a
            retried enrollment) to this key.
    """

    public_key: ClientPublicKey
    key_type: str
    binding: str


def key_binding(public_key: ClientPublicKey) -> str:
    """SHA-256 hex of ``public_key``'s DER SubjectPublicKeyInfo."""
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def check_public_key(public_key: object) -> str:
    """Check that ``public_key`` may be certified; return its short description.

    Args:
        public_key: any public key object from ``cryptography``.

    Returns:
        ``"EC P-256"``, ``"EC P-384"``, ``"Ed25519"`` or ``"RSA <bits>"``.

    Raises:
        CsrRejected: the key's algorithm, curve or size is not allowed.
    """
    return _classify(public_key)[1]


def _classify(public_key: object) -> tuple[ClientPublicKey, str]:
    allowed = ", ".join(ALLOWED_KEYS)
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        kind = _ALLOWED_CURVES.get(public_key.curve.name)
        if kind is None:
            raise CsrRejected(f"EC curve {public_key.curve.name} is not allowed: {allowed} required")
        return public_key, kind
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return public_key, "Ed25519"
    if isinstance(public_key, rsa.RSAPublicKey):
        bits = public_key.key_size
        if not RSA_MIN_BITS <= bits <= RSA_MAX_BITS:
            raise CsrRejected(f"RSA key of {bits} bits: {RSA_MIN_BITS}..{RSA_MAX_BITS} required")
        return public_key, f"RSA {bits}"
    if isinstance(public_key, dsa.DSAPublicKey):
        raise CsrRejected(f"DSA keys are not allowed: {allowed} required")
    if isinstance(public_key, ed448.Ed448PublicKey):
        raise CsrRejected(f"Ed448 keys are not allowed: {allowed} required")
    raise CsrRejected(f"{type(public_key).__name__} keys are not allowed: {allowed} required")


def load_csr(pem: bytes | str) -> CsrKey:
    """Read a client's CSR and return the public key it proves possession of.

    Only the public key is taken. The CSR's subject, extensions and attributes are
    ignored entirely: identity never comes from the CSR.

    Args:
        pem: exactly one PEM ``CERTIFICATE REQUEST`` block (surrounding whitespace
            allowed), at most :data:`MAX_CSR_BYTES` bytes.

    Returns:
        The verified public key and its binding.

    Raises:
        CsrRejected: too large, not exactly one CSR PEM block, not a valid PKCS#10
            request, a signature that does not verify (or uses MD5/SHA-1), or a public
            key outside :data:`ALLOWED_KEYS`.
    """
    if isinstance(pem, str):
        if len(pem) > MAX_CSR_BYTES:
            raise CsrRejected(f"CSR larger than {MAX_CSR_BYTES // 1024} KiB")
        try:
            data = pem.encode("ascii")
        except UnicodeEncodeError:
            raise CsrRejected("CSR contains non-ASCII characters") from None
    elif isinstance(pem, bytes | bytearray | memoryview):
        data = bytes(pem)
    else:
        raise CsrRejected("CSR must be PEM text")
    if len(data) > MAX_CSR_BYTES:
        raise CsrRejected(f"CSR larger than {MAX_CSR_BYTES // 1024} KiB")
    _check_single_block(data)

    try:
        csr = x509.load_pem_x509_csr(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CsrRejected("CSR is not a valid PKCS#10 certificate request") from exc
    try:
        public_key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CsrRejected("CSR public key is of an unsupported type") from exc
    # check the key first: a refused algorithm gets its specific message
    key, kind = _classify(public_key)
    try:
        algorithm = csr.signature_hash_algorithm
        valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CsrRejected("CSR signature algorithm is not supported") from exc
    if isinstance(algorithm, hashes.HashAlgorithm) and algorithm.name in _WEAK_HASHES:
        raise CsrRejected(f"CSR signed with {algorithm.name.upper()}: SHA-256 or stronger required")
    if not valid:
        raise CsrRejected("CSR signature is invalid")
    return CsrKey(public_key=key, key_type=kind, binding=key_binding(key))


def _check_single_block(data: bytes) -> None:
    begins = _PEM_BEGIN.findall(data)
    ends = _PEM_END.findall(data)
    if not begins:
        raise CsrRejected("no PEM block found (expected -----BEGIN CERTIFICATE REQUEST-----)")
    if len(begins) > 1 or len(ends) > 1:
        raise CsrRejected("more than one PEM block: send exactly one CERTIFICATE REQUEST")
    if begins[0] != _CSR_LABEL:
        raise CsrRejected("PEM block is not a CERTIFICATE REQUEST")
    if not ends or ends[0] != _CSR_LABEL:
        raise CsrRejected("PEM block is not terminated by -----END CERTIFICATE REQUEST-----")
    start = data.index(b"-----BEGIN ")
    end_marker = b"-----END " + _CSR_LABEL + b"-----"
    stop = data.index(end_marker) + len(end_marker)
    if stop <= start:
        raise CsrRejected("PEM END line comes before its BEGIN line")
    if data[:start].strip() or data[stop:].strip():
        raise CsrRejected("unexpected text outside the PEM block")
