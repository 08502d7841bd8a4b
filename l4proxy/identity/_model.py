"""Who someone is, once a token proved it: the identity model and its URI form.

Identities are namespaced by provider (``<provider>/<subject>``), so two providers that
happen to issue the same ``sub`` never produce the same identity. In certificates the
identity is a SPIFFE-style URI SAN:
``spiffe://<trust-domain>/p/<provider>/u/<percent-encoded subject>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote

__all__ = ["PROVIDER_NAME", "Identity", "VerifiedToken", "identity_uri", "parse_identity_uri"]

#: provider names: short, lower-case, URI-safe (they appear unencoded in the URI)
PROVIDER_NAME = re.compile(r"[a-z][a-z0-9-]{0,31}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Identity:
    """A verified identity.

    Attributes:
        provider: the configured provider's name (or ``breakglass``).
        subject: the value of the provider's subject claim.
        email: a verified email address, if the token carried one.
        groups: groups from the token's groups claim plus claim mappings, sorted.
    """

    provider: str
    subject: str
    email: str | None = None
    groups: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """``<provider>/<subject>``, the identity's unique name."""
        return f"{self.provider}/{self.subject}"


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifiedToken:
    """What verifying an ID token yields.

    Attributes:
        identity: who the token proves.
        replay_key: ``jti:<issuer>#<jti>`` when the token has a ``jti``, else ``sha256:<hex of the
            token>``; the token may be used once (see the state store).
        expires_at: the token's ``exp`` (Unix seconds): the replay record lives until then.
        issued_at: the token's ``iat``.
    """

    identity: Identity
    replay_key: str
    expires_at: float
    issued_at: float


def identity_uri(trust_domain: str, provider: str, subject: str) -> str:
    """The URI SAN for an identity (subject percent-encoded, every reserved char too)."""
    return f"spiffe://{trust_domain}/p/{provider}/u/{quote(subject, safe='')}"


def parse_identity_uri(trust_domain: str, uri: str) -> tuple[str, str] | None:
    """Inverse of :func:`identity_uri`: ``(provider, subject)``, or None if ``uri`` is not
    an identity URI of ``trust_domain``."""
    prefix = f"spiffe://{trust_domain}/p/"
    if not uri.startswith(prefix):
        return None
    provider, sep, rest = uri[len(prefix):].partition("/u/")
    if not sep or not PROVIDER_NAME.fullmatch(provider) or not rest or "/" in rest:
        return None
    subject = unquote(rest, errors="strict")
    if identity_uri(trust_domain, provider, subject) != uri:
        return None  # not canonically encoded: refuse rather than read it two ways
    return provider, subject
