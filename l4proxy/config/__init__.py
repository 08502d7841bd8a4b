"""The gateway's configuration: one TOML file, loaded into one frozen, validated object.

``load_config(path)`` returns a :class:`Config` or raises :class:`ConfigError` listing every
problem; ``check_config(path)`` returns them all (and the warnings) without raising, for
``l4proxy config check``. See ``examples/l4proxy.toml`` for every key, documented.
"""

from ._load import MAX_CONFIG_BYTES, CheckResult, ConfigError, Problem, check_config, load_config
from ._model import (
    ALLOWED_ALGORITHMS,
    BREAKGLASS_TTL_CAP,
    HARD_MAX_CERT_TTL,
    MAX_LEEWAY,
    RESERVED_PROVIDER_NAMES,
    AccessRule,
    CaConfig,
    ClaimMapping,
    ClientCredentials,
    Config,
    ControlConfig,
    DeclaredScope,
    GatewayConfig,
    JwksSourceKind,
    LimitsConfig,
    ListenerConfig,
    ProviderConfig,
    RecordingConfig,
    TargetConfig,
    TargetProtocol,
)

__all__ = [
    "ALLOWED_ALGORITHMS",
    "BREAKGLASS_TTL_CAP",
    "HARD_MAX_CERT_TTL",
    "MAX_CONFIG_BYTES",
    "MAX_LEEWAY",
    "RESERVED_PROVIDER_NAMES",
    "AccessRule",
    "CaConfig",
    "CheckResult",
    "ClaimMapping",
    "ClientCredentials",
    "Config",
    "ConfigError",
    "ControlConfig",
    "DeclaredScope",
    "GatewayConfig",
    "JwksSourceKind",
    "LimitsConfig",
    "ListenerConfig",
    "Problem",
    "ProviderConfig",
    "RecordingConfig",
    "TargetConfig",
    "TargetProtocol",
    "check_config",
    "load_config",
]
