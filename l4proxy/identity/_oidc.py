"""Verifying OIDC ID tokens: pure code, the clock passed in, no I/O.

Theory of operation: :func:`verify_id_token` takes a compact JWS, the provider's
configuration and the provider's current key set, and either returns a
:class:`VerifiedToken` or raises :class:`TokenRejected` with a specific ``reason`` (for the
log) and a generic public message (for the client). The steps, in order:

1. size cap (before anything is parsed) and an ASCII check;
2. the *unverified* header is read only for ``alg`` and ``kid``; header parameters that
   name or carry a key (``jwk``, ``jku``, ``x5u``, ``x5c``), ``crit`` and ``b64`` are
   refused, and so is a ``typ`` other than ``JWT``;
3. ``alg`` must be in the provider's allow-list and in ours (RS256, PS256, ES256, EdDSA);
   the key is looked up by ``kid`` in the provider's JWKS (never taken from the token) and
   must be able to verify ``alg`` (an RSA key never verifies ES256, and no symmetric key
   is ever in a key set, so HMAC-with-the-public-key confusion cannot happen);
4. pyjwt's JWS layer checks the signature only (``PyJWS.decode_complete``); it never sees
   the claims, so none of its lenient claim handling applies;
5. the payload is parsed by us (duplicate claim names and NaN/Infinity refused) and every
   claim is checked here, strictly typed: ``iss``, ``aud``/``azp``, ``exp``, ``iat``,
   ``nbf``, lifetime and age, the subject claim, ``jti``, ``email``/``email_verified``,
   groups and claim mappings, and the provider's enrollment constraints
   (``allowed_email_domains``, ``allowed_groups``, ``bound_claims``).

Rejection reasons may quote claim values (shortened, ``repr``-escaped) but never the token.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from l4proxy.config._model import ProviderConfig
from l4proxy.identity._model import Identity, VerifiedToken

if TYPE_CHECKING:  # the key set lives with the fetching code; _oidc stays free of trio
    from l4proxy.identity._jwks import Jwk, JwkSet

__all__ = [
    "SUPPORTED_ALGORITHMS",
    "NotPermitted",
    "TokenRejected",
    "UnknownKeyId",
    "key_supports",
    "verify_id_token",
]

#: the asymmetric algorithms we ever accept (a provider may narrow this list)
SUPPORTED_ALGORITHMS: frozenset[str] = frozenset({"RS256", "PS256", "ES256", "EdDSA"})

#: header parameters that would let the token choose or carry its own key, or change how
#: the JWS is processed; a token carrying any of them is refused outright
_FORBIDDEN_HEADER_PARAMS = ("jwk", "jku", "x5u", "x5c", "crit", "b64")

#: accepted ``typ`` header values (compared case-insensitively); absent is fine too
_ACCEPTED_TYP = frozenset({"jwt", "application/jwt"})

#: longest subject we accept (OIDC Core caps ``sub`` at 255 ASCII characters)
MAX_SUBJECT_CHARS = 255
MAX_EMAIL_CHARS = 254

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

_JWS = jwt.PyJWS(algorithms=sorted(SUPPORTED_ALGORITHMS))


class TokenRejected(Exception):
    """An ID token was refused.

    ``str()`` is the generic :attr:`public_message` (safe to send to the client); the
    specific :attr:`reason` is for the log. Neither contains the token.
    """

    public_message = "invalid token"

    def __init__(self, reason: str) -> None:
        super().__init__(self.public_message)
        self.reason = reason


class NotPermitted(TokenRejected):
    """The token is genuine, but its holder is not among those who may enroll
    (``bound_claims``, ``allowed_email_domains``, ``allowed_groups``). Raised only after
    the signature, issuer, audience and times were verified."""

    public_message = "not permitted to enroll"


class UnknownKeyId(TokenRejected):
    """The header's ``kid`` is not in the key set: refetch the JWKS (rate-limited), retry once."""

    def __init__(self, reason: str, *, kid: str) -> None:
        super().__init__(reason)
        self.kid = kid


def _show(value: object, limit: int = 64) -> str:
    """A claim or header value for a log line: ``repr``-escaped and shortened."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def key_supports(jwk: Jwk, alg: str) -> bool:
    """Whether ``jwk`` may verify ``alg``: the key type must fit the algorithm (RSA for
    RS256/PS256, EC P-256 for ES256, Ed25519 for EdDSA) and, when the JWK declares an
    ``alg``, it must be that one."""
    if jwk.alg is not None and jwk.alg != alg:
        return False
    key = jwk.key
    if alg in ("RS256", "PS256"):
        return isinstance(key, rsa.RSAPublicKey)
    if alg == "ES256":
        return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
    if alg == "EdDSA":
        return isinstance(key, ed25519.Ed25519PublicKey)
    return False


def _header(token: str, provider: ProviderConfig) -> tuple[str, str]:
    """Size-check the token and read ``(alg, kid)`` from its unverified header."""
    if not isinstance(token, str):
        raise TokenRejected("token is not a string")
    if not token.isascii():
        raise TokenRejected("token is not ASCII")
    if len(token) > provider.max_token_bytes:
        raise TokenRejected(f"token is {len(token)} bytes, more than {provider.max_token_bytes}")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise TokenRejected(f"malformed token header ({type(exc).__name__})") from exc
    for param in _FORBIDDEN_HEADER_PARAMS:
        if param in header:
            raise TokenRejected(f"header parameter {param!r} not allowed")
    typ = header.get("typ")
    if typ is not None and (not isinstance(typ, str) or typ.lower() not in _ACCEPTED_TYP):
        raise TokenRejected(f"typ {_show(typ)} is not JWT")
    alg = header.get("alg")
    if not isinstance(alg, str):
        raise TokenRejected("header has no alg")
    if alg not in SUPPORTED_ALGORITHMS or alg not in provider.algorithms:
        shown = alg if alg.isprintable() and len(alg) <= 32 else _show(alg)
        raise TokenRejected(f"alg {shown} not allowed")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise TokenRejected("header has no kid")
    return alg, kid


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for name, value in pairs:
        if name in obj:
            raise ValueError(f"duplicate claim {name!r}")
        obj[name] = value
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _claims(payload: bytes) -> dict[str, Any]:
    try:
        claims = json.loads(payload, object_pairs_hook=_reject_duplicates,
                            parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise TokenRejected(f"malformed claims ({type(exc).__name__}: {_show(str(exc), 80)})") from exc
    if not isinstance(claims, dict):
        raise TokenRejected("claims are not a JSON object")
    return claims


def _number(claims: Mapping[str, Any], name: str, *, required: bool) -> float | int | None:
    if name not in claims:
        if required:
            raise TokenRejected(f"token has no {name}")
        return None
    value = claims[name]
    if not _is_number(value):
        raise TokenRejected(f"{name} is not a number: {_show(value)}")
    return value  # type: ignore[no-any-return]


def _check_times(claims: Mapping[str, Any], provider: ProviderConfig, now: float) -> tuple[float, float]:
    leeway = provider.leeway
    exp = _number(claims, "exp", required=True)
    iat = _number(claims, "iat", required=True)
    nbf = _number(claims, "nbf", required=False)
    assert exp is not None and iat is not None
    if not exp > now - leeway:
        raise TokenRejected(f"token expired at {exp} (now {now:.0f}, leeway {leeway:g}s)")
    if iat > now + leeway:
        raise TokenRejected(f"iat {iat} is in the future (now {now:.0f}, leeway {leeway:g}s)")
    if now - iat > provider.max_token_age:
        raise TokenRejected(f"token is {now - iat:.0f}s old, more than {provider.max_token_age:g}s")
    if nbf is not None and nbf > now + leeway:
        raise TokenRejected(f"token not valid before {nbf} (now {now:.0f}, leeway {leeway:g}s)")
    if not exp > iat:
        raise TokenRejected(f"exp {exp} is not after iat {iat}")
    if exp - iat > provider.max_token_lifetime:
        raise TokenRejected(f"token lifetime {exp - iat:.0f}s is more than "
                            f"{provider.max_token_lifetime:g}s")
    # iat is within [now - max_age, now + leeway] and exp within max_lifetime of it: both
    # are of sane size now, so float() cannot overflow
    return float(exp), float(iat)


def _check_audience(claims: Mapping[str, Any], provider: ProviderConfig) -> None:
    ours = provider.audience
    if "aud" not in claims:
        raise TokenRejected("token has no aud")
    aud = claims["aud"]
    if isinstance(aud, str):
        audiences = {aud}
    elif isinstance(aud, list) and aud and all(isinstance(a, str) for a in aud):
        audiences = set(aud)
    else:
        raise TokenRejected(f"aud is neither a string nor a non-empty list of strings: {_show(aud)}")
    if ours not in audiences:
        raise TokenRejected(f"aud {_show(aud)} does not contain {ours!r}")
    azp = claims.get("azp")
    if "azp" in claims and not isinstance(azp, str):
        raise TokenRejected(f"azp is not a string: {_show(azp)}")
    if len(audiences) > 1 and azp != ours:
        raise TokenRejected(f"aud has several values and azp is not ours (azp {_show(azp)})")


def _subject(claims: Mapping[str, Any], provider: ProviderConfig) -> str:
    name = provider.subject_claim
    if name not in claims:
        raise TokenRejected(f"token has no subject claim {name!r}")
    subject = claims[name]
    if not isinstance(subject, str):
        raise TokenRejected(f"subject claim {name!r} is not a string: {_show(subject)}")
    if not subject:
        raise TokenRejected(f"subject claim {name!r} is empty")
    if len(subject) > MAX_SUBJECT_CHARS:
        raise TokenRejected(f"subject claim {name!r} is longer than {MAX_SUBJECT_CHARS} characters")
    if _CONTROL.search(subject):
        raise TokenRejected(f"subject claim {name!r} contains control characters: {_show(subject)}")
    return subject


def _email(claims: Mapping[str, Any], provider: ProviderConfig) -> str | None:
    """The verified email, or None; enforces ``allowed_email_domains``."""
    email = claims.get("email")
    verified = claims.get("email_verified")
    if "email" in claims and not isinstance(email, str):
        raise TokenRejected(f"email is not a string: {_show(email)}")
    if "email_verified" in claims and not isinstance(verified, bool):
        raise TokenRejected(f"email_verified is not a boolean: {_show(verified)}")
    if email is not None:
        local, at, domain = email.rpartition("@")
        if (not at or not local or not domain or len(email) > MAX_EMAIL_CHARS
                or _CONTROL.search(email) or any(c.isspace() for c in email)):
            raise TokenRejected(f"malformed email {_show(email)}")
    usable = email if (email is not None and verified is True) else None
    if provider.allowed_email_domains:
        if email is None:
            raise NotPermitted("token has no email and the provider requires one")
        if usable is None:
            raise NotPermitted("email not verified")
        domain = usable.rpartition("@")[2].lower()
        if domain not in {d.lower() for d in provider.allowed_email_domains}:
            raise NotPermitted(f"email domain {_show(domain)} not allowed")
    return usable


def _groups(claims: Mapping[str, Any], provider: ProviderConfig) -> tuple[str, ...]:
    groups: set[str] = set()
    name = provider.groups_claim
    if name is not None and name in claims:
        value = claims[name]
        if isinstance(value, str):
            values = [value]
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            values = value
        else:
            raise TokenRejected(f"groups claim {name!r} is not a string or a list of strings")
        groups.update(v for v in values if v)
    for mapping in provider.claim_mappings:
        if claims.get(mapping.claim) == mapping.value:  # the value is a str: equality implies type
            groups.update(mapping.groups)
    result = tuple(sorted(groups))
    if provider.allowed_groups and not set(result) & set(provider.allowed_groups):
        raise NotPermitted(f"none of the token's groups {_show(list(result), 120)} is allowed")
    return result


def _check_bound_claims(claims: Mapping[str, Any], provider: ProviderConfig) -> None:
    for name, patterns in provider.bound_claims:
        if name not in claims:
            raise NotPermitted(f"bound claim {name!r} missing")
        value = claims[name]
        if not isinstance(value, str):
            raise NotPermitted(f"bound claim {name!r} is not a string: {_show(value)}")
        if not any(fnmatchcase(value, pattern) for pattern in patterns):
            raise NotPermitted(f"bound claim {name}={_show(value)} not allowed")


def verify_id_token(token: str, provider: ProviderConfig, keys: JwkSet, *, now: float) -> VerifiedToken:
    """Verify an ID token for ``provider`` against its key set at time ``now``.

    Args:
        token: the compact JWS, exactly as received.
        provider: the provider the token claims to come from.
        keys: the provider's current JWKS.
        now: the current time, Unix seconds.

    Returns:
        The identity (from the token's claims only) and the token's replay key and times.

    Raises:
        UnknownKeyId: the header's ``kid`` is not in ``keys`` (refetch, then retry once).
        TokenRejected: anything else wrong with the token; ``reason`` says what.
    """
    alg, kid = _header(token, provider)
    jwk = keys.get(kid)
    if jwk is None:
        raise UnknownKeyId(f"kid {_show(kid)} not in the JWKS", kid=kid)
    if not key_supports(jwk, alg):
        raise TokenRejected(f"alg {alg} does not fit key {_show(kid)} ({jwk.kty}"
                            f"{', alg ' + jwk.alg if jwk.alg else ''})")
    try:
        decoded = _JWS.decode_complete(token, jwk.key, algorithms=[alg],
                                       options={"verify_signature": True,
                                                "enforce_minimum_key_length": True})
    except jwt.InvalidSignatureError as exc:
        raise TokenRejected("bad signature") from exc
    except jwt.PyJWTError as exc:
        raise TokenRejected(f"signature check failed ({type(exc).__name__})") from exc
    claims = _claims(decoded["payload"])

    if "iss" not in claims:
        raise TokenRejected("token has no iss")
    if claims["iss"] != provider.issuer:
        raise TokenRejected(f"iss {_show(claims['iss'])} is not {provider.issuer!r}")
    _check_audience(claims, provider)
    expires_at, issued_at = _check_times(claims, provider, now)
    subject = _subject(claims, provider)
    jti = claims.get("jti")
    if "jti" in claims and (not isinstance(jti, str) or not jti):
        raise TokenRejected(f"jti is not a non-empty string: {_show(jti)}")
    if not (provider.bound_claims or provider.allowed_email_domains or provider.allowed_groups
            or provider.allow_any_subject):
        # configuration validation refuses this; checked again so a hand-built provider
        # cannot let in every holder of a token from this issuer by accident
        raise TokenRejected(f"provider {provider.name!r} declares no enrollment constraints")
    email = _email(claims, provider)
    groups = _groups(claims, provider)
    _check_bound_claims(claims, provider)

    # jti values are unique per issuer only: the issuer is part of the key
    replay_key = (f"jti:{provider.issuer}#{jti}" if jti
                  else "sha256:" + hashlib.sha256(token.encode("ascii")).hexdigest())
    identity = Identity(provider=provider.name, subject=subject, email=email, groups=groups)
    return VerifiedToken(identity=identity, replay_key=replay_key, expires_at=expires_at,
                         issued_at=issued_at)
