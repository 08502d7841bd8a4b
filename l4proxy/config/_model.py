"""The configuration object: one frozen, validated tree (see ``_load`` for the TOML).

Theory of operation: ``load_config`` turns a TOML file into these dataclasses or reports
every problem it finds as ``dotted.key.path: message``. Everything downstream takes these
objects, never raw TOML. Durations are seconds (float), sizes bytes (int); paths are
resolved relative to the configuration file's directory.

Later issues add ``recording``, ``policy``, ``masking`` and ``approvals`` here.
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
    "AccessRule",
    "CaConfig",
    "ClaimMapping",
    "ClientCredentials",
    "Config",
    "ControlConfig",
    "DeclaredScope",
    "GatewayConfig",
    "JwksSourceKind",
    "LimitsConfig",
    "ListenerConfig",
    "ProviderConfig",
    "RecordingConfig",
    "TargetConfig",
    "TargetProtocol",
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
    #: the audit log file (default ``<state_dir>/audit.jsonl``); ``audit_stdout`` writes
    #: JSON lines to standard output instead (``audit_log = "-"``)
    audit_log: Path | None = None
    audit_stdout: bool = False
    #: rotate the audit file past this size, keeping this many old files
    audit_max_bytes: int = 100 << 20
    audit_backups: int = 5

    @property
    def audit_path(self) -> Path | None:
        """Where audit events go (None: standard output)."""
        if self.audit_stdout:
            return None
        return self.audit_log or self.state_dir / "audit.jsonl"


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


class TargetProtocol(StrEnum):
    CWP = "cwp"  # parsed, credential injected, re-encoded (per-request policy applies)
    TCP = "tcp"  # opaque bytes: TLS, identity and connect checks only


class ClientCredentials(StrEnum):
    REFUSE = "refuse"  # a client HELLO carrying an API key is refused (CLIENT_CREDENTIAL_REFUSED)
    STRIP = "strip"    # the key is removed (and, once recording exists, marked as a redaction)


@dataclass(frozen=True, slots=True, kw_only=True)
class AccessRule:
    """Who may open sessions to a target: identity-name globs (``corp/*``) or groups."""

    identities: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class DeclaredScope:
    """What the target's credential can reach, when declared in the configuration (a CWP
    service also reports it in WELCOME): name globs and access classes."""

    buckets: tuple[str, ...] = ()
    tables: tuple[str, ...] = ()
    access: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class TargetConfig:
    """An upstream service the gateway relays to.

    The credential is read from ``credential_file`` or the environment variable
    ``credential_env`` (never inline), at each upstream connect, so a rotated credential
    file applies to the next session without a reload.
    """

    name: str
    upstream: tuple[str, int]
    protocol: TargetProtocol = TargetProtocol.CWP
    #: TLS to the upstream: verify with ``upstream_ca`` (None: system trust store)
    upstream_tls: bool = False
    upstream_ca: Path | None = None
    upstream_server_name: str | None = None
    credential_file: Path | None = None
    credential_env: str | None = None
    client_credentials: ClientCredentials = ClientCredentials.REFUSE
    #: SNI names that route to this target on listeners that serve several targets
    server_names: tuple[str, ...] = ()
    access: AccessRule = field(default_factory=AccessRule)
    credential_scope: DeclaredScope | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenerConfig:
    """A TLS listener: clients present an l4proxy certificate that chains to
    ``client_ca`` (normally the CA's ``bundle.pem``). ``targets`` are the targets this
    listener serves: with one, every session goes there; with several, the client's SNI
    name picks one by the targets' ``server_names``."""

    name: str
    listen: tuple[str, int]
    server_cert: Path
    server_key: Path
    client_ca: Path
    targets: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitsConfig:
    """Bounds of the data path (seconds / bytes / counts)."""

    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0
    max_sessions: int = 10_000
    max_session_length: float = 8 * 3600.0
    upstream_connect_timeout: float = 10.0
    #: bytes read from a socket at once. 1 MiB: measured 10-15 % less relay CPU per byte
    #: than 256 KiB (fewer trips through the codec, the observers and the recorder's
    #: per-record work); a session moving data holds up to about two reads per direction
    #: while its send waits, an idle one none
    read_size: int = 1 << 20
    #: bytes buffered per direction before the reader waits (backpressure)
    max_buffered: int = 1 << 20
    #: the longest client-certificate lifetime accepted (our own check, beyond TLS)
    max_cert_lifetime: float = 24 * 3600.0
    #: NOTICE + GOAWAY this long before the client certificate expires
    expiry_notice: float = 60.0
    #: the session may outlive its certificate by this much (0: never)
    expiry_grace: float = 0.0
    #: SIGTERM: how long sessions may drain before they are ended
    drain_timeout: float = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordingConfig:
    """Session recording (``[recording]``): every session through the gateway is recorded
    under ``dir`` as ``<YYYY-MM-DD>/<session-id>.l4rec.zst``, signed with the CA dir's
    recording key. Sessions are refused while free space is under ``min_free_bytes``."""

    dir: Path
    flush_interval: float = 0.1
    fsync_interval: float = 1.0
    zstd_level: int = 1
    min_free_bytes: int = 256 << 20
    #: recorded bytes a session may have waiting for the writer before it waits too
    max_pending_bytes: int = 8 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    gateway: GatewayConfig
    control: ControlConfig = field(default_factory=ControlConfig)
    providers: tuple[ProviderConfig, ...] = ()
    ca: CaConfig | None = None
    listeners: tuple[ListenerConfig, ...] = ()
    targets: tuple[TargetConfig, ...] = ()
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    #: session recording; None: sessions are not recorded
    recording: RecordingConfig | None = None
    #: where the configuration was read from (None when built in code)
    source: Path | None = None

    def provider(self, name: str) -> ProviderConfig | None:
        return next((p for p in self.providers if p.name == name), None)

    def target(self, name: str) -> TargetConfig | None:
        return next((t for t in self.targets if t.name == name), None)
