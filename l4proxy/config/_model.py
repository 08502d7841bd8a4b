"""The configuration object: one frozen, validated tree (see ``_load`` for the TOML).

Theory of operation: ``load_config`` turns a TOML file into these dataclasses or reports
every problem it finds as ``dotted.key.path: message``. Everything downstream takes these
objects, never raw TOML. Durations are seconds (float), sizes bytes (int); paths are
resolved relative to the configuration file's directory.

Later issues add ``listeners``, ``targets``, ``recording``, ``limits``, ``policy``,
``masking`` and ``approvals`` here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

__all__ = [
    "ALLOWED_ALGORITHMS",
    "BREAKGLASS_TTL_CAP",
    "HARD_MAX_CERT_TTL",
    "MAX_LEEWAY",
    "RESERVED_PROVIDER_NAMES",
    "CaConfig",
    "ClaimMapping",
    "Config",
    "ControlConfig",
    "GatewayConfig",
    "JwksSourceKind",
    "ProviderConfig",
]

#: hard cap on any client certificate's lifetime (seconds)
HARD_MAX_CERT_TTL = 24 * 3600.0
#: hard cap on a break-glass certificate's lifetime (seconds)
BREAKGLASS_TTL_CAP = 3600.0
#: largest clock-skew leeway a provider may configure for exp/iat/nbf (seconds)
MAX_LEEWAY = 300.0
#: the only token signature algorithms a provider may allow (asymmetric; never HS*, never none)
ALLOWED_ALGORITHMS = frozenset({"RS256", "PS256", "ES256", "EdDSA"})
#: provider names no configured provider may take (``breakglass/NAME`` identities are local)
RESERVED_PROVIDER_NAMES = frozenset({"breakglass"})


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayConfig:
    id: str
    state_dir: Path


@dataclass(frozen=True, slots=True, kw_only=True)
class ControlConfig:
    """The control API (HTTPS) and the ops endpoint (plain HTTP on loopback by default)."""

    listen: tuple[str, int] = ("127.0.0.1", 8443)
    ops_listen: tuple[str, int] = ("127.0.0.1", 9090)
    admin_groups: tuple[str, ...] = ()
    #: enrollment requests per minute per identity and per client address
    rate_per_identity: int = 10
    rate_per_address: int = 60
    #: largest request body accepted (bytes)
    max_body: int = 64 << 10


class JwksSourceKind(StrEnum):
    DISCOVERY = "discovery"  # <issuer>/.well-known/openid-configuration -> jwks_uri
    URL = "url"
    FILE = "file"


@dataclass(frozen=True, slots=True, kw_only=True)
class ClaimMapping:
    """Role-based issuance: when ``claim`` equals ``value``, add ``groups``."""

    claim: str
    value: str
    groups: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ProviderConfig:
    """One OIDC identity provider and who of its users may enroll.

    All declared constraints must hold (``bound_claims``, ``allowed_email_domains``,
    ``allowed_groups``); a provider declaring none is refused by validation unless
    ``allow_any_subject`` is set.
    """

    name: str
    issuer: str
    audience: str
    jwks_source: JwksSourceKind
    #: the JWKS URL (URL), or the file (FILE); None with DISCOVERY
    jwks_location: str | None = None
    subject_claim: str = "sub"
    groups_claim: str | None = None
    claim_mappings: tuple[ClaimMapping, ...] = ()
    #: claim -> accepted values (exact strings or fnmatch globs)
    bound_claims: tuple[tuple[str, tuple[str, ...]], ...] = ()
    allowed_email_domains: tuple[str, ...] = ()
    allowed_groups: tuple[str, ...] = ()
    allow_any_subject: bool = False
    algorithms: tuple[str, ...] = ("RS256", "PS256", "ES256", "EdDSA")
    #: default and maximum certificate lifetime for this provider's identities (seconds)
    default_cert_ttl: float = 600.0
    max_cert_ttl: float = 3600.0
    #: token checks (seconds / bytes)
    leeway: float = 30.0
    max_token_lifetime: float = 24 * 3600.0
    max_token_age: float = 3600.0
    max_token_bytes: int = 16 << 10
    #: JWKS caching (seconds)
    jwks_min_cache: float = 60.0
    jwks_max_cache: float = 24 * 3600.0
    jwks_max_staleness: float = 3600.0
    jwks_refetch_interval: float = 10.0
    #: HTTP timeout for discovery / JWKS fetches
    fetch_timeout: float = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class CaConfig:
    dir: Path
    trust_domain: str = "l4proxy.local"
    #: break-glass certificates: at most this long (seconds)
    breakglass_max_ttl: float = 3600.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    gateway: GatewayConfig
    control: ControlConfig = field(default_factory=ControlConfig)
    providers: tuple[ProviderConfig, ...] = ()
    ca: CaConfig | None = None
    #: where the configuration was read from (None when built in code)
    source: Path | None = None

    def provider(self, name: str) -> ProviderConfig | None:
        return next((p for p in self.providers if p.name == name), None)
