"""Loading and checking the configuration file.

Theory of operation: the file is read (at most ``MAX_CONFIG_BYTES``) and parsed with
``tomllib`` into plain dicts. A walk then visits the known sections in a fixed order. Each
``_Table`` knows its dotted path and the keys it allows; opening one reports its unknown keys
at once, and its typed readers (``string``, ``duration``, ``size``, ``address``, ...) check one
key each: they return the value, or record a :class:`Problem` naming the key and return
``None``, and the caller falls back to the model's default so the walk goes on. Nothing stops
at the first mistake: the result is every problem and warning in the file, and a
:class:`~l4proxy.config.Config` only when there were no problems.

Messages name keys, never values: a later section may hold a secret, and a config check's
output ends up in CI logs. The only values echoed are key names themselves (quoted like TOML
when they are not bare keys, so a control character cannot forge a line).

The data path's sections come last: ``[limits]``, then ``[[targets]]``, then ``[[listeners]]``,
which are checked against the targets (references, SNI routing) and the control addresses.
A target's credential is only ever named by its source (``{ file = … }`` or ``{ env = … }``):
an inline string is a problem whose message does not repeat it, a credential file is
``stat()``-ed for its permissions but never read, and an environment variable is only tested
for presence. Warnings flag what is valid but risky or useless: a credential that reaches
everything, a target no listener serves, a setting a ``tcp`` target ignores.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import re
import stat
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import date, datetime, time
from enum import Enum, StrEnum
from pathlib import Path
from typing import Final, TypeVar
from urllib.parse import urlsplit

from l4proxy.durations import format_duration, parse_duration
from l4proxy.netaddr import is_loopback_host, parse_host_port
from l4proxy.sizes import parse_size

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

__all__ = ["MAX_CONFIG_BYTES", "CheckResult", "ConfigError", "Problem", "check_config", "load_config"]

log = logging.getLogger("l4proxy.config")

#: the largest configuration file read (bytes); a bigger one is a problem, not a hang
MAX_CONFIG_BYTES: Final = 1 << 20


# --- the public results ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with (or, as a warning, worth knowing about) a configuration.

    Attributes:
        path: the dotted key path (``identity.providers[0].issuer``); empty for the file as a
            whole (unreadable, not TOML), whose message then names the file.
        message: what is wrong; names keys, never values.
    """

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


@dataclass(frozen=True, slots=True)
class CheckResult:
    """What :func:`check_config` found.

    Attributes:
        problems: everything that makes the configuration invalid, in file-walk order.
        warnings: valid but risky settings (``allow_any_subject = true``, ...).
        config: the loaded configuration when there are no problems, else None.
    """

    problems: tuple[Problem, ...]
    warnings: tuple[Problem, ...]
    config: Config | None = None

    @property
    def ok(self) -> bool:
        """True when there are no problems (warnings allowed)."""
        return not self.problems


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` lists why (``str()``: one per line)."""

    def __init__(self, problems: tuple[Problem, ...] | list[Problem]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    def __reduce__(self) -> tuple[type[ConfigError], tuple[tuple[Problem, ...]]]:
        return type(self), (self.problems,)


def check_config(path: str | Path) -> CheckResult:
    """Read and validate a configuration file, collecting every problem.

    Args:
        path: the TOML file; relative paths inside it are resolved against its directory.

    Returns:
        All problems and warnings, and the :class:`Config` if there were no problems. Never
        raises for a bad or unreadable file: that is a problem too.
    """
    given = Path(path)
    # the directory is canonicalised (it stays the same directory); the file name is kept, so
    # a symlinked configuration still resolves paths against the directory it was named in
    source = given.absolute().parent.resolve() / given.name
    col = _Collector()
    data = _read_toml(source, col)
    config = _build(data, source, col) if data is not None else None
    return CheckResult(problems=tuple(col.problems), warnings=tuple(col.warnings),
                       config=None if col.problems else config)


def load_config(path: str | Path) -> Config:
    """Load a configuration file into one frozen, validated :class:`Config`.

    Warnings are logged (logger ``l4proxy.config``, level WARNING).

    Args:
        path: the TOML file; relative paths inside it are resolved against its directory.

    Returns:
        The configuration.

    Raises:
        ConfigError: the file is unreadable, not TOML, or has any problem (all are listed).
    """
    result = check_config(path)
    if result.config is None:
        raise ConfigError(result.problems)
    for warning in result.warnings:
        log.warning("configuration: %s", warning)
    return result.config


# --- reading --------------------------------------------------------------------------------


class _Collector:
    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []

    def problem(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(Problem(path, message))


def _read_toml(source: Path, col: _Collector) -> dict[str, object] | None:
    try:
        with source.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        col.problem("", f"{source}: cannot read: {exc.strerror or type(exc).__name__}")
        return None
    if len(raw) > MAX_CONFIG_BYTES:
        col.problem("", f"{source}: larger than {MAX_CONFIG_BYTES >> 20} MiB: not a configuration file")
        return None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        col.problem("", f"{source}: not UTF-8 text (byte offset {exc.start})")
        return None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's messages give a position and name keys, never a value
        col.problem("", f"{source}: invalid TOML: {exc}")
        return None


class _Missing(Enum):
    MISSING = "missing"


_MISSING: Final = _Missing.MISSING
_T = TypeVar("_T")
_E = TypeVar("_E", bound=StrEnum)
_N = TypeVar("_N", int, float)

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def _or(value: _T | None, default: _T) -> _T:
    return default if value is None else value


def _join(prefix: str, key: str) -> str:
    """``prefix.key``, the key quoted like TOML (JSON escapes) unless it is a bare key."""
    part = key if _BARE_KEY.fullmatch(key) else json.dumps(key)
    return f"{prefix}.{part}" if prefix else part


def _kind(value: object) -> str:
    """The TOML type of ``value``, for 'expected X, got Y' (never the value itself)."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime):
        return "a date-time"
    if isinstance(value, date):
        return "a date"
    if isinstance(value, time):
        return "a time"
    return type(value).__name__  # pragma: no cover - tomllib yields nothing else


def _check_string(col: _Collector, path: str, value: object, *, pattern: re.Pattern[str] | None = None,
                  expected: str = "") -> str | None:
    if not isinstance(value, str):
        col.problem(path, f"expected a string, got {_kind(value)}")
        return None
    if not value.strip():
        col.problem(path, "must not be empty")
        return None
    if _CONTROL_CHARS.search(value):
        col.problem(path, "must not contain control characters")
        return None
    if value != value.strip():
        col.problem(path, "must not have leading or trailing whitespace")
        return None
    if pattern is not None and not pattern.fullmatch(value):
        col.problem(path, f"must be {expected}")
        return None
    return value


def _seconds(value: object) -> float:
    """A duration value: a non-negative number of seconds or a string like ``10m``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError
    if isinstance(value, str) and _CONTROL_CHARS.search(value):
        raise ValueError
    seconds = parse_duration(value)
    if not math.isfinite(seconds):
        raise ValueError
    return seconds


class _Table:
    """One TOML table being read: its path, its allowed keys, typed readers for them."""

    def __init__(self, col: _Collector, data: Mapping[str, object], path: str, known: Collection[str], *,
                 base: Path, future: Collection[str] = ()) -> None:
        self.col = col
        self.data = data
        self.path = path
        self.base = base
        self._known = known
        for key in data:
            if key in known:
                continue
            if key in future:
                message = "unknown key (this section is not supported by this version yet)"
            else:
                close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.75)
                message = f"unknown key (did you mean {close[0]}?)" if close else "unknown key"
            col.problem(_join(path, key), message)

    def at(self, key: str) -> str:
        return _join(self.path, key)

    def problem(self, key: str, message: str) -> None:
        self.col.problem(self.at(key), message)

    def has(self, key: str) -> bool:
        assert key in self._known, key
        return key in self.data

    def raw(self, key: str) -> object:
        assert key in self._known, key
        return self.data.get(key, _MISSING)

    def _present(self, key: str, required: bool) -> object:
        value = self.raw(key)
        if value is _MISSING and required:
            self.problem(key, "missing required key")
        return value

    # -- structure --

    def table(self, key: str, known: Collection[str], *, required: bool = False,
              future: Collection[str] = ()) -> _Table | None:
        value = self._present(key, False)
        if value is _MISSING:
            if required:
                self.problem(key, "missing required table")
            return None
        if not isinstance(value, dict):
            self.problem(key, f"expected a table, got {_kind(value)}")
            return None
        return _Table(self.col, value, self.at(key), known, base=self.base, future=future)

    def tables(self, key: str, known: Collection[str], *, required: bool = False) -> list[_Table] | None:
        """An array of tables (``[[key]]``); None if absent or not an array."""
        value = self._present(key, required)
        if value is _MISSING:
            return None
        if not isinstance(value, list):
            self.problem(key, f"expected an array of tables, got {_kind(value)}")
            return None
        out: list[_Table] = []
        for i, item in enumerate(value):
            path = f"{self.at(key)}[{i}]"
            if isinstance(item, dict):
                out.append(_Table(self.col, item, path, known, base=self.base))
            else:
                self.col.problem(path, f"expected a table, got {_kind(item)}")
        return out

    # -- scalars --

    def string(self, key: str, *, required: bool = False, pattern: re.Pattern[str] | None = None,
               expected: str = "") -> str | None:
        value = self._present(key, required)
        if value is _MISSING:
            return None
        return _check_string(self.col, self.at(key), value, pattern=pattern, expected=expected)

    def boolean(self, key: str) -> bool | None:
        value = self._present(key, False)
        if value is _MISSING:
            return None
        if not isinstance(value, bool):
            self.problem(key, f"expected a boolean (true or false), got {_kind(value)}")
            return None
        return value

    def choice(self, key: str, choices: type[_E]) -> _E | None:
        """One of a string enum's values."""
        value = self.string(key)
        if value is None:
            return None
        try:
            return choices(value)
        except ValueError:
            names = [f'"{member.value}"' for member in choices]
            self.problem(key, f"must be {_or_list(names)}")
            return None

    def integer(self, key: str, *, minimum: int) -> int | None:
        value = self._present(key, False)
        if value is _MISSING:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(key, f"expected an integer, got {_kind(value)}")
            return None
        if value < minimum:
            self.problem(key, f"must be at least {minimum}")
            return None
        return value

    def duration(self, key: str, *, positive: bool = True, maximum: float | None = None,
                 maximum_text: str = "") -> float | None:
        """A duration in seconds: a number, or a string like ``30s``, ``10m``, ``1h30m``."""
        value = self._present(key, False)
        if value is _MISSING:
            return None
        try:
            seconds = _seconds(value)
        except TypeError:
            self.problem(key, f"expected a duration (a number of seconds or a string like '10m'), "
                              f"got {_kind(value)}")
            return None
        except ValueError:
            self.problem(key, "not a duration (examples: 30s, 10m, 1h30m; a bare number is seconds)")
            return None
        if positive and seconds <= 0:
            self.problem(key, "must be more than 0s")
            return None
        if maximum is not None and seconds > maximum:
            self.problem(key, f"must be at most {maximum_text or format_duration(maximum)}")
            return None
        return seconds

    def size(self, key: str, *, minimum: int, maximum: int, range_text: str) -> int | None:
        """A size in bytes: an integer, or a string like ``64KiB``."""
        value = self._present(key, False)
        if value is _MISSING:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            self.problem(key, f"expected a size (an integer of bytes or a string like '64KiB'), "
                              f"got {_kind(value)}")
            return None
        if isinstance(value, int):
            n = value
        else:
            try:
                n = parse_size(value)
            except ValueError:
                self.problem(key, "not a size (examples: 65536, 64KiB, 1MiB)")
                return None
        if not minimum <= n <= maximum:
            self.problem(key, f"must be {range_text}")
            return None
        return n

    def address(self, key: str, *, required: bool = False) -> tuple[str, int] | None:
        value = self.string(key, required=required)
        if value is None:
            return None
        try:
            return parse_host_port(value)
        except ValueError as exc:
            self.problem(key, f"expected HOST:PORT or [IPv6]:PORT: {exc}")
            return None

    def path_value(self, key: str, *, required: bool = False) -> Path | None:
        """A filesystem path, resolved against the configuration file's directory."""
        value = self.string(key, required=required)
        if value is None:
            return None
        if value.startswith("~"):
            self.problem(key, "'~' is not expanded: use an absolute path or one relative to the "
                              "configuration file")
            return None
        return self.base / value

    def string_list(self, key: str, *, pattern: re.Pattern[str] | None = None, expected: str = "",
                    choices: Collection[str] | None = None, nonempty: bool = False,
                    fold: bool = False, required: bool = False) -> tuple[str, ...] | None:
        """An array of distinct strings; ``fold`` lower-cases them (domains)."""
        value = self._present(key, required)
        if value is _MISSING:
            return None
        return _check_string_list(self.col, self.at(key), value, pattern=pattern, expected=expected,
                                  choices=choices, nonempty=nonempty, fold=fold)


def _check_string_list(col: _Collector, path: str, value: object, *, pattern: re.Pattern[str] | None = None,
                       expected: str = "", choices: Collection[str] | None = None,
                       nonempty: bool = False, fold: bool = False) -> tuple[str, ...] | None:
    if not isinstance(value, list):
        col.problem(path, f"expected an array of strings, got {_kind(value)}")
        return None
    if nonempty and not value:
        col.problem(path, "must not be empty")
        return None
    out: list[str] = []
    seen: dict[str, int] = {}
    ok = True
    for i, item in enumerate(value):
        item_path = f"{path}[{i}]"
        s = _check_string(col, item_path, item, pattern=pattern, expected=expected)
        if s is None:
            ok = False
            continue
        if choices is not None and s not in choices:
            col.problem(item_path, f"not allowed (choose from {', '.join(sorted(choices, key=str.lower))})")
            ok = False
            continue
        if fold:
            s = s.lower()
        if s in seen:
            col.problem(item_path, f"duplicate entry (same as [{seen[s]}])")
            ok = False
            continue
        seen[s] = i
        out.append(s)
    return tuple(out) if ok else None


# --- value syntax ---------------------------------------------------------------------------

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DNS_NAME = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(?:\.{_LABEL})*")
_DNS_NAME_TEXT = "a lower-case DNS-like name: letters, digits, '-' and '.' (e.g. l4proxy.example.com)"
_EMAIL_DOMAIN = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(?:\.{_LABEL})+", re.IGNORECASE)
_EMAIL_DOMAIN_TEXT = "a domain name like example.com (without '@')"
_GATEWAY_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_GATEWAY_ID_TEXT = "1 to 63 lower-case letters, digits and '-', starting with a letter or digit"
_PROVIDER_NAME_TEXT = "1 to 32 lower-case letters, digits and '-', starting with a letter"
#: target and listener names (targets appear in logs, metrics and policy rules)
_NAME = re.compile(r"[a-z][a-z0-9-]{0,31}")
_NAME_TEXT = _PROVIDER_NAME_TEXT
#: TLS server names (SNI, upstream verification): DNS names, any case (folded), no wildcards
_SERVER_NAME = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(?:\.{_LABEL})*", re.IGNORECASE)
_SERVER_NAME_TEXT = "a DNS name like chunks.gw.example (letters, digits, '-' and '.'; no wildcards)"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_ENV_NAME_TEXT = "an environment variable name: letters, digits and '_', not starting with a digit"


def _matches_everything(glob: str) -> bool:
    """True for a name glob that matches every name (``*``, ``**``, ...)."""
    return set(glob) == {"*"}


def _and(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _or_list(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]


def _check_url(t: _Table, key: str, url: str, *, allow_query: bool) -> bool:
    """An ``https://`` URL (``http://`` only for a loopback host) without credentials."""
    if any(c.isspace() for c in url):
        t.problem(key, "must not contain whitespace")
        return False
    if not url.startswith(("https://", "http://")):
        t.problem(key, "must be an https:// URL")
        return False
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        t.problem(key, "not a valid URL (host or port)")
        return False
    if "@" in parts.netloc:
        t.problem(key, "must not contain credentials (user:password@)")
        return False
    if not host:
        t.problem(key, "must name a host")
        return False
    if parts.scheme == "http" and not is_loopback_host(host):
        t.problem(key, "must be https:// (http:// only for a loopback host: 127.0.0.0/8, ::1, localhost)")
        return False
    if parts.fragment or (not allow_query and parts.query):
        t.problem(key, "must not have a query or fragment" if not allow_query else "must not have a fragment")
        return False
    return True


# --- the sections ---------------------------------------------------------------------------

_TOP = ("gateway", "control", "identity", "ca", "limits", "targets", "listeners", "recording")
#: sections later issues add; until then they are unknown keys with a hint
_FUTURE = ("policy", "masking", "approvals")
_GATEWAY = ("id", "state_dir", "audit_log", "audit_max_bytes", "audit_backups")
_CONTROL = ("listen", "ops_listen", "admin_groups", "rate_per_identity", "rate_per_address", "max_body")
_CA = ("dir", "trust_domain", "breakglass_max_ttl")
_IDENTITY = ("providers",)
_PROVIDER = (
    "name", "issuer", "audience", "jwks", "subject_claim", "groups_claim", "claim_mappings",
    "bound_claims", "allowed_email_domains", "allowed_groups", "allow_any_subject", "algorithms",
    "default_cert_ttl", "max_cert_ttl", "leeway", "max_token_lifetime", "max_token_age",
    "max_token_bytes", "jwks_min_cache", "jwks_max_cache", "jwks_max_staleness",
    "jwks_refetch_interval", "fetch_timeout",
)
_JWKS = ("url", "file")
_CLAIM_MAPPING = ("claim", "value", "groups")
_LIMITS = (
    "handshake_timeout", "idle_timeout", "max_sessions", "max_session_length", "upstream_connect_timeout",
    "read_size", "max_buffered", "max_cert_lifetime", "expiry_notice", "expiry_grace", "drain_timeout",
)
_TARGET = (
    "name", "upstream", "protocol", "upstream_tls", "upstream_ca", "upstream_server_name", "credential",
    "client_credentials", "server_names", "access", "credential_scope",
)
_CREDENTIAL = ("file", "env")
_ACCESS = ("identities", "groups")
_SCOPE = ("buckets", "tables", "access")
_SCOPE_ACCESS = ("read", "write", "admin")
_LISTENER = ("name", "listen", "server_cert", "server_key", "client_ca", "targets")
#: bounds of [limits] sizes (bytes)
_MIN_READ_SIZE = 4 << 10
_MAX_READ_SIZE = 16 << 20
_MAX_BUFFERED = 64 << 20


def _build(data: Mapping[str, object], source: Path, col: _Collector) -> Config | None:
    root = _Table(col, data, "", _TOP, base=source.parent, future=_FUTURE)
    gateway = _gateway(root)
    control = _control(root)
    providers = _providers(root)
    ca = _ca(root)
    if providers and not root.has("ca"):
        col.problem("ca", "missing required table: identity providers are configured, and without a CA "
                          "nothing could mint their certificates")
    limits = _limits(root)
    recording = _recording(root)
    targets = _targets(root)
    listeners = _listeners(root, targets, control)
    if listeners and not root.has("recording"):
        col.problem("recording", "missing required table: every session through a listener is "
                                 "recorded, so set [recording] dir (only a benchmark may turn "
                                 "recording off, with enabled = false)")
    if col.problems or gateway is None:
        return None
    return Config(gateway=gateway, control=control, providers=providers, ca=ca, limits=limits,
                  recording=recording,
                  targets=tuple(t.config for t in targets.found if t.config is not None),
                  listeners=listeners, source=source)


def _gateway(root: _Table) -> GatewayConfig | None:
    t = root.table("gateway", _GATEWAY, required=True)
    if t is None:
        return None
    gateway_id = t.string("id", required=True, pattern=_GATEWAY_ID, expected=_GATEWAY_ID_TEXT)
    state_dir = t.path_value("state_dir", required=True)
    raw_audit = t.string("audit_log")
    audit_log: Path | None = None
    audit_stdout = raw_audit == "-"
    if raw_audit is not None and not audit_stdout:
        audit_log = t.path_value("audit_log")
    max_bytes = t.size("audit_max_bytes", minimum=1 << 10, maximum=1 << 40,
                       range_text="1KiB..1TiB")
    backups = t.integer("audit_backups", minimum=1)
    if gateway_id is None or state_dir is None:
        return None
    defaults = GatewayConfig(id=gateway_id, state_dir=state_dir)
    return GatewayConfig(id=gateway_id, state_dir=state_dir, audit_log=audit_log,
                         audit_stdout=audit_stdout,
                         audit_max_bytes=defaults.audit_max_bytes if max_bytes is None else max_bytes,
                         audit_backups=defaults.audit_backups if backups is None else backups)


def _control(root: _Table) -> ControlConfig:
    d = ControlConfig()
    t = root.table("control", _CONTROL)
    if t is None:
        return d
    listen = t.address("listen")
    ops_listen = t.address("ops_listen")
    # compare what will be used (given or default; an invalid one is already reported)
    used = _given_or_default(t, "listen", listen, d.listen)
    used_ops = _given_or_default(t, "ops_listen", ops_listen, d.ops_listen)
    if used is not None and used == used_ops and used[1] != 0:
        if t.has("ops_listen"):
            t.problem("ops_listen", f"same address as {t.at('listen')}")
        else:
            t.problem("listen", f"same address as {t.at('ops_listen')} (its default)")
    return ControlConfig(
        listen=_or(listen, d.listen),
        ops_listen=_or(ops_listen, d.ops_listen),
        admin_groups=_or(t.string_list("admin_groups"), d.admin_groups),
        rate_per_identity=_or(t.integer("rate_per_identity", minimum=1), d.rate_per_identity),
        rate_per_address=_or(t.integer("rate_per_address", minimum=1), d.rate_per_address),
        max_body=_or(t.size("max_body", minimum=1 << 10, maximum=1 << 20, range_text="from 1KiB to 1MiB"),
                     d.max_body),
    )


def _ca(root: _Table) -> CaConfig | None:
    t = root.table("ca", _CA)
    if t is None:
        return None
    ca_dir = t.path_value("dir", required=True)
    trust_domain = t.string("trust_domain", pattern=_DNS_NAME, expected=_DNS_NAME_TEXT)
    breakglass = t.duration("breakglass_max_ttl", maximum=BREAKGLASS_TTL_CAP,
                            maximum_text="1h (the cap for break-glass certificates)")
    if ca_dir is None:
        return None
    d = CaConfig(dir=ca_dir)
    return CaConfig(dir=ca_dir, trust_domain=_or(trust_domain, d.trust_domain),
                    breakglass_max_ttl=_or(breakglass, d.breakglass_max_ttl))


def _providers(root: _Table) -> tuple[ProviderConfig, ...]:
    t = root.table("identity", _IDENTITY)
    if t is None:
        return ()
    tables = t.tables("providers", _PROVIDER)
    if tables is None:
        return ()
    names: dict[str, str] = {}
    out = [_provider(pt, names) for pt in tables]
    return tuple(p for p in out if p is not None)


def _provider(t: _Table, names: dict[str, str]) -> ProviderConfig | None:
    # imported here, not at the top, so that l4proxy.identity may import l4proxy.config freely
    from l4proxy.identity._model import PROVIDER_NAME

    d = ProviderConfig(name="", issuer="", audience="", jwks_source=JwksSourceKind.DISCOVERY)
    name = t.string("name", required=True, pattern=PROVIDER_NAME, expected=_PROVIDER_NAME_TEXT)
    if name is not None:
        if name in RESERVED_PROVIDER_NAMES:
            t.problem("name", "reserved name (break-glass identities use it)")
        elif name in names:
            t.problem("name", f"duplicate provider name (same as {names[name]})")
        else:
            names[name] = t.at("name")
    issuer = t.string("issuer", required=True)
    if issuer is not None and not _check_url(t, "issuer", issuer, allow_query=False):
        issuer = None
    audience = t.string("audience", required=True)
    jwks = _jwks(t)

    subject_claim = t.string("subject_claim")
    groups_claim = t.string("groups_claim")
    claim_mappings = _claim_mappings(t)
    bound_claims = _bound_claims(t)
    domains = t.string_list("allowed_email_domains", pattern=_EMAIL_DOMAIN, expected=_EMAIL_DOMAIN_TEXT,
                            fold=True)
    groups = t.string_list("allowed_groups")
    allow_any = t.boolean("allow_any_subject")
    algorithms = t.string_list("algorithms", choices=ALLOWED_ALGORITHMS, nonempty=True)

    cap_text = "24h (the hard cap on certificate lifetimes)"
    default_ttl = t.duration("default_cert_ttl", maximum=HARD_MAX_CERT_TTL, maximum_text=cap_text)
    max_ttl = t.duration("max_cert_ttl", maximum=HARD_MAX_CERT_TTL, maximum_text=cap_text)
    _not_above(t, "default_cert_ttl", default_ttl, d.default_cert_ttl, "max_cert_ttl", max_ttl,
               d.max_cert_ttl)
    leeway = t.duration("leeway", positive=False, maximum=MAX_LEEWAY)
    max_token_lifetime = t.duration("max_token_lifetime")
    max_token_age = t.duration("max_token_age")
    max_token_bytes = t.size("max_token_bytes", minimum=1, maximum=1 << 20, range_text="from 1 byte to 1MiB")
    jwks_min_cache = t.duration("jwks_min_cache", positive=False)
    jwks_max_cache = t.duration("jwks_max_cache")
    _not_above(t, "jwks_min_cache", jwks_min_cache, d.jwks_min_cache, "jwks_max_cache", jwks_max_cache,
               d.jwks_max_cache)
    jwks_max_staleness = t.duration("jwks_max_staleness", positive=False)
    jwks_refetch_interval = t.duration("jwks_refetch_interval")
    fetch_timeout = t.duration("fetch_timeout")

    # who may enroll: at least one constraint, or an explicit, warned-about allow_any_subject
    constraints = {"bound_claims": bound_claims, "allowed_email_domains": domains, "allowed_groups": groups}
    declared = any(constraints.values())
    unsure = any(value is None and t.has(key) for key, value in constraints.items()) \
        or (allow_any is None and t.has("allow_any_subject"))
    if unsure:
        pass  # an invalid constraint is reported already; what it meant is unknown
    elif allow_any:
        if declared:
            t.problem("allow_any_subject", "cannot be combined with bound_claims, allowed_email_domains or "
                                           "allowed_groups: they already say who may enroll")
        else:
            t.col.warn(t.at("allow_any_subject"), "any subject of this issuer and audience may enroll")
    elif not declared:
        t.col.problem(t.path, "declares nobody who may enroll: set bound_claims, allowed_email_domains or "
                              "allowed_groups (or allow_any_subject = true)")
    if groups and groups_claim is None and not t.has("groups_claim") and not claim_mappings \
            and not t.has("claim_mappings"):
        t.problem("allowed_groups", "no identity can have a group: set groups_claim or claim_mappings")

    if name is None or issuer is None or audience is None or jwks is None:
        return None
    return ProviderConfig(
        name=name,
        issuer=issuer,
        audience=audience,
        jwks_source=jwks[0],
        jwks_location=jwks[1],
        subject_claim=_or(subject_claim, d.subject_claim),
        groups_claim=groups_claim,
        claim_mappings=_or(claim_mappings, d.claim_mappings),
        bound_claims=_or(bound_claims, d.bound_claims),
        allowed_email_domains=_or(domains, d.allowed_email_domains),
        allowed_groups=_or(groups, d.allowed_groups),
        allow_any_subject=_or(allow_any, d.allow_any_subject),
        algorithms=_or(algorithms, d.algorithms),
        default_cert_ttl=_or(default_ttl, d.default_cert_ttl),
        max_cert_ttl=_or(max_ttl, d.max_cert_ttl),
        leeway=_or(leeway, d.leeway),
        max_token_lifetime=_or(max_token_lifetime, d.max_token_lifetime),
        max_token_age=_or(max_token_age, d.max_token_age),
        max_token_bytes=_or(max_token_bytes, d.max_token_bytes),
        jwks_min_cache=_or(jwks_min_cache, d.jwks_min_cache),
        jwks_max_cache=_or(jwks_max_cache, d.jwks_max_cache),
        jwks_max_staleness=_or(jwks_max_staleness, d.jwks_max_staleness),
        jwks_refetch_interval=_or(jwks_refetch_interval, d.jwks_refetch_interval),
        fetch_timeout=_or(fetch_timeout, d.fetch_timeout),
    )


def _not_above(t: _Table, low_key: str, low: float | None, low_default: float, high_key: str,
               high: float | None, high_default: float) -> None:
    """Report ``low_key`` if it exceeds ``high_key`` (each as given, else its default; an invalid
    value is already reported and compares with nothing)."""
    lo = _given_or_default(t, low_key, low, low_default)
    hi = _given_or_default(t, high_key, high, high_default)
    if lo is not None and hi is not None and lo > hi:
        t.problem(low_key, f"must not exceed {t.at(high_key)}")


def _given_or_default(t: _Table, key: str, value: _T | None, default: _T) -> _T | None:
    """The value in use: as given, the default when absent, None when given but invalid."""
    return value if value is not None or t.has(key) else default


def _jwks(t: _Table) -> tuple[JwksSourceKind, str | None] | None:
    """``jwks = "discovery"`` (the default), ``{ url = "https://…" }`` or ``{ file = "PATH" }``."""
    value = t.raw("jwks")
    if value is _MISSING or value == JwksSourceKind.DISCOVERY.value:
        return JwksSourceKind.DISCOVERY, None
    if not isinstance(value, dict):
        t.problem("jwks", 'must be "discovery", { url = "https://…" } or { file = "PATH" }')
        return None
    jt = t.table("jwks", _JWKS)
    assert jt is not None
    if jt.has("url") == jt.has("file"):
        t.problem("jwks", "set exactly one of url or file")
        return None
    if jt.has("url"):
        url = jt.string("url")
        if url is None or not _check_url(jt, "url", url, allow_query=True):
            return None
        return JwksSourceKind.URL, url
    path = jt.path_value("file")
    return None if path is None else (JwksSourceKind.FILE, str(path))


def _bound_claims(t: _Table) -> tuple[tuple[str, tuple[str, ...]], ...] | None:
    """``claim = "value"`` or ``claim = ["glob", ...]``, sorted by claim."""
    value = t.raw("bound_claims")
    if value is _MISSING:
        return ()
    if not isinstance(value, dict):
        t.problem("bound_claims", f"expected a table of claim = value(s), got {_kind(value)}")
        return None
    out: list[tuple[str, tuple[str, ...]]] = []
    ok = True
    for claim, accepted in value.items():
        path = _join(t.at("bound_claims"), claim)
        if not claim.strip() or _CONTROL_CHARS.search(claim):
            t.col.problem(path, "a claim name must be non-empty printable text")
            ok = False
            continue
        values: tuple[str, ...] | None
        if isinstance(accepted, list):
            values = _check_string_list(t.col, path, accepted, nonempty=True)
        elif isinstance(accepted, str):
            single = _check_string(t.col, path, accepted)
            values = None if single is None else (single,)
        else:
            t.col.problem(path, f"expected a string or an array of strings, got {_kind(accepted)}")
            values = None
        if values is None:
            ok = False
            continue
        if any(set(v) == {"*"} for v in values):
            t.col.warn(path, "matches every value: it only requires the claim to be present")
        out.append((claim, values))
    return tuple(sorted(out)) if ok else None


def _claim_mappings(t: _Table) -> tuple[ClaimMapping, ...] | None:
    tables = t.tables("claim_mappings", _CLAIM_MAPPING)
    if tables is None:
        return None if t.has("claim_mappings") else ()
    out: list[ClaimMapping] = []
    seen: dict[tuple[str, str], str] = {}
    ok = True
    for mt in tables:
        claim = mt.string("claim", required=True)
        value = mt.string("value", required=True)
        groups = mt.string_list("groups", required=True, nonempty=True)
        if claim is None or value is None or groups is None:
            ok = False
            continue
        if (claim, value) in seen:
            mt.col.problem(mt.path, f"duplicate mapping (same claim and value as {seen[claim, value]})")
            ok = False
            continue
        seen[claim, value] = mt.path
        out.append(ClaimMapping(claim=claim, value=value, groups=groups))
    return tuple(out) if ok else None


def _ordered(t: _Table, low_key: str, low: _N | None, low_default: _N, high_key: str, high: _N | None,
             high_default: _N, *, strict: bool) -> None:
    """Report when ``low_key`` is above (``strict``: not below) ``high_key``, each as given, else its
    default; at the key that was given (the low one when both were), naming the other."""
    lo = _given_or_default(t, low_key, low, low_default)
    hi = _given_or_default(t, high_key, high, high_default)
    if lo is None or hi is None or (lo < hi if strict else lo <= hi):
        return
    if t.has(low_key):
        relation = "must be less than" if strict else "must not exceed"
        default = "" if t.has(high_key) else " (its default)"
        t.problem(low_key, f"{relation} {t.at(high_key)}{default}")
    else:
        relation = "must be more than" if strict else "must be at least"
        t.problem(high_key, f"{relation} {t.at(low_key)} (its default)")


# --- the data path: limits, targets, listeners ----------------------------------------------


_RECORDING = ("enabled", "dir", "flush_interval", "fsync_interval", "zstd_level", "min_free_bytes",
              "max_pending_bytes")


def _recording(root: _Table) -> RecordingConfig | None:
    """``[recording]``: required as soon as the gateway has listeners (every session is
    recorded). ``enabled = false`` is the one way to run without it, for benchmarks; the
    gateway then says so loudly at start and on every reload."""
    t = root.table("recording", _RECORDING)
    if t is None:
        return None
    if t.boolean("enabled") is False:
        for key in _RECORDING[1:]:
            if t.has(key):
                t.problem(key, "has no effect with enabled = false; remove it")
        t.col.warn(t.at("enabled"), "false: sessions are NOT recorded; use this for benchmarks only")
        return None
    directory = t.path_value("dir", required=True)
    flush = t.duration("flush_interval", maximum=1.0, maximum_text="1s (at most 1 s may be lost)")
    fsync = t.duration("fsync_interval", maximum=10.0, maximum_text="10s")
    level = t.integer("zstd_level", minimum=-7)
    if level is not None and level > 19:
        t.problem("zstd_level", "must be from -7 (fastest) to 19")
        level = None
    min_free = t.size("min_free_bytes", minimum=0, maximum=1 << 50, range_text="0..1PiB")
    pending = t.size("max_pending_bytes", minimum=64 << 10, maximum=1 << 30,
                     range_text="64KiB..1GiB")
    if directory is None:
        return None
    d = RecordingConfig(dir=directory)
    return RecordingConfig(dir=directory, flush_interval=_or(flush, d.flush_interval),
                           fsync_interval=_or(fsync, d.fsync_interval),
                           zstd_level=_or(level, d.zstd_level),
                           min_free_bytes=_or(min_free, d.min_free_bytes),
                           max_pending_bytes=_or(pending, d.max_pending_bytes))


def _limits(root: _Table) -> LimitsConfig:
    d = LimitsConfig()
    t = root.table("limits", _LIMITS)
    if t is None:
        return d
    handshake_timeout = t.duration("handshake_timeout")
    idle_timeout = t.duration("idle_timeout")
    max_sessions = t.integer("max_sessions", minimum=1)
    max_session_length = t.duration("max_session_length")
    upstream_connect_timeout = t.duration("upstream_connect_timeout")
    read_size = t.size("read_size", minimum=_MIN_READ_SIZE, maximum=_MAX_READ_SIZE,
                       range_text="from 4KiB to 16MiB")
    max_buffered = t.size("max_buffered", minimum=_MIN_READ_SIZE, maximum=_MAX_BUFFERED,
                          range_text="from 4KiB to 64MiB")
    # a configuration that lowers max_buffered below the default read size and leaves
    # read_size out reads at most max_buffered at once (it loaded before the default
    # read size grew from 256KiB to 1MiB, and still does)
    read_default = (min(d.read_size, max_buffered) if read_size is None and max_buffered is not None
                    else d.read_size)
    _ordered(t, "read_size", read_size, read_default, "max_buffered", max_buffered, d.max_buffered,
             strict=False)
    max_cert_lifetime = t.duration("max_cert_lifetime", maximum=HARD_MAX_CERT_TTL,
                                   maximum_text="24h (the hard cap on certificate lifetimes)")
    expiry_notice = t.duration("expiry_notice")
    _ordered(t, "expiry_notice", expiry_notice, d.expiry_notice, "max_session_length", max_session_length,
             d.max_session_length, strict=True)
    expiry_grace = t.duration("expiry_grace", positive=False)
    drain_timeout = t.duration("drain_timeout")
    return LimitsConfig(
        handshake_timeout=_or(handshake_timeout, d.handshake_timeout),
        idle_timeout=_or(idle_timeout, d.idle_timeout),
        max_sessions=_or(max_sessions, d.max_sessions),
        max_session_length=_or(max_session_length, d.max_session_length),
        upstream_connect_timeout=_or(upstream_connect_timeout, d.upstream_connect_timeout),
        read_size=_or(read_size, read_default),
        max_buffered=_or(max_buffered, d.max_buffered),
        max_cert_lifetime=_or(max_cert_lifetime, d.max_cert_lifetime),
        expiry_notice=_or(expiry_notice, d.expiry_notice),
        expiry_grace=_or(expiry_grace, d.expiry_grace),
        drain_timeout=_or(drain_timeout, d.drain_timeout),
    )


@dataclass(slots=True)
class _FoundTarget:
    """One ``[[targets]]`` entry as far as it could be read (for the listeners' checks)."""

    path: str
    name: str | None
    #: None when the entry has a problem
    config: TargetConfig | None
    #: None when ``server_names`` itself is invalid (its problem is reported)
    server_names: tuple[str, ...] | None


@dataclass(slots=True)
class _Targets:
    found: list[_FoundTarget]
    #: False when ``targets`` itself is malformed: a listener's reference cannot be judged
    known: bool

    def named(self, name: str) -> _FoundTarget | None:
        return next((f for f in self.found if f.name == name), None)


_CREDENTIAL_FORM = 'must be { file = "PATH" } or { env = "VARIABLE" }'
_TCP_UNUSED = "has no effect on a tcp target: its bytes are relayed unparsed"


def _targets(root: _Table) -> _Targets:
    tables = root.tables("targets", _TARGET)
    if tables is None:
        return _Targets(found=[], known=not root.has("targets"))
    names: dict[str, str] = {}
    found = [_target(t, names) for t in tables]
    raw = root.raw("targets")
    # an entry that is not a table, or has no valid name, might be the one a listener names
    known = isinstance(raw, list) and len(raw) == len(tables) and all(f.name is not None for f in found)
    return _Targets(found=found, known=known)


def _target(t: _Table, names: dict[str, str]) -> _FoundTarget:
    name = t.string("name", required=True, pattern=_NAME, expected=_NAME_TEXT)
    if name is not None:
        if name in names:
            t.problem("name", f"duplicate target name (same as {names[name]})")
        else:
            names[name] = t.at("name")
    upstream = t.address("upstream", required=True)
    if upstream is not None and upstream[1] == 0:
        t.problem("upstream", "port 0 is not a destination: give the service's port")
        upstream = None
    protocol = t.choice("protocol", TargetProtocol)
    # protocol-specific rules only when the protocol is known (as given, or the default)
    known_protocol = _given_or_default(t, "protocol", protocol, TargetProtocol.CWP)
    cwp = known_protocol is TargetProtocol.CWP

    upstream_tls = t.boolean("upstream_tls")
    upstream_ca = t.path_value("upstream_ca")
    server_name = t.string("upstream_server_name", pattern=_SERVER_NAME, expected=_SERVER_NAME_TEXT)
    if upstream_tls is False or not t.has("upstream_tls"):  # off (an invalid value is reported already)
        for key in ("upstream_ca", "upstream_server_name"):
            if t.has(key):
                t.problem(key, "only applies with upstream_tls = true")

    credential = _credential(t, check_source=cwp)
    client_credentials = t.choice("client_credentials", ClientCredentials)
    server_names = t.string_list("server_names", pattern=_SERVER_NAME, expected=_SERVER_NAME_TEXT, fold=True)
    access = _access(t)
    scope = _scope(t)

    if known_protocol is TargetProtocol.TCP:
        for key in ("credential", "client_credentials", "credential_scope"):
            if t.has(key):
                t.col.warn(t.at(key), _TCP_UNUSED)
    elif cwp:
        if not t.has("credential"):
            t.problem("credential", f"missing required key: a cwp target needs the service's credential "
                                    f"(the gateway injects it upstream); {_CREDENTIAL_FORM}")
        if scope is not None:
            _warn_broad_scope(t, scope)
        elif not t.has("credential_scope"):
            t.col.warn(t.path, "declare credential_scope (chunkd reports it in WELCOME) so config check can "
                               "tell whether the credential is broader than needed")

    names_in_use = _given_or_default(t, "server_names", server_names, ())
    if name is None or upstream is None or credential is None or access is None or names_in_use is None:
        return _FoundTarget(path=t.path, name=name, config=None, server_names=names_in_use)
    d = TargetConfig(name=name, upstream=upstream)
    config = TargetConfig(
        name=name,
        upstream=upstream,
        protocol=_or(protocol, d.protocol),
        upstream_tls=_or(upstream_tls, d.upstream_tls),
        upstream_ca=upstream_ca,
        upstream_server_name=None if server_name is None else server_name.lower(),
        credential_file=credential[0],
        credential_env=credential[1],
        client_credentials=_or(client_credentials, d.client_credentials),
        server_names=names_in_use,
        access=access,
        credential_scope=scope,
    )
    return _FoundTarget(path=t.path, name=name, config=config, server_names=names_in_use)


def _credential(t: _Table, *, check_source: bool) -> tuple[Path | None, str | None] | None:
    """``credential = { file = "PATH" }`` or ``{ env = "VARIABLE" }``: (file, env); (None, None)
    when absent; None when invalid. The value itself is never echoed: a string here is most
    likely the secret."""
    value = t.raw("credential")
    if value is _MISSING:
        return None, None
    if isinstance(value, str):
        t.problem("credential", f"{_CREDENTIAL_FORM}: the credential itself never goes in the configuration")
        return None
    if not isinstance(value, dict):
        t.problem("credential", f"{_CREDENTIAL_FORM}, got {_kind(value)}")
        return None
    ct = t.table("credential", _CREDENTIAL)
    assert ct is not None
    if ct.has("file") == ct.has("env"):
        t.problem("credential", "set exactly one of file or env")
        return None
    if ct.has("file"):
        path = ct.path_value("file")
        if path is None:
            return None
        if check_source:
            _check_credential_file(ct, "file", path)
        return path, None
    env = ct.string("env", pattern=_ENV_NAME, expected=_ENV_NAME_TEXT)
    if env is None:
        return None
    if check_source and env not in os.environ:
        ct.col.warn(ct.at("env"), "the environment variable is not set here: sessions to this target fail "
                                  "unless the gateway runs with it set")
    return None, env


def _check_credential_file(t: _Table, key: str, path: Path) -> None:
    """A credential file must be private (the gateway refuses it otherwise); it may not exist yet,
    as it is read at each upstream connect. Its content is never read here."""
    try:
        st = path.stat()
    except FileNotFoundError:
        t.col.warn(t.at(key), "does not exist yet: it is read at each upstream connect, and sessions to this "
                              "target fail until it exists")
        return
    except OSError as exc:
        t.col.warn(t.at(key), f"cannot be checked ({exc.strerror or type(exc).__name__}): it is read at each "
                              "upstream connect")
        return
    if not stat.S_ISREG(st.st_mode):
        t.problem(key, "not a regular file")
    elif st.st_mode & 0o077:
        t.problem(key, f"accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o}): run chmod 600 "
                       "(the gateway refuses to use it)")


def _access(t: _Table) -> AccessRule | None:
    at = t.table("access", _ACCESS)
    if at is None:
        if not t.has("access"):
            t.problem("access", "missing required table: it says who may open sessions (without it nobody "
                                "could connect)")
        return None
    identities = _identity_globs(at)
    groups = at.string_list("groups")
    if (identities is None and at.has("identities")) or (groups is None and at.has("groups")):
        return None  # reported; what it meant is unknown
    rule = AccessRule(identities=_or(identities, ()), groups=_or(groups, ()))
    if not rule.identities and not rule.groups:
        t.problem("access", "grants nobody: set identities or groups (nobody could connect)")
        return None
    return rule


def _identity_globs(t: _Table) -> tuple[str, ...] | None:
    """``PROVIDER/SUBJECT`` globs (``corp/alice``, ``ci/acme/*``); one that matches everyone is
    allowed with a warning."""
    globs = t.string_list("identities")
    if globs is None:
        return None
    ok = True
    for i, glob in enumerate(globs):
        path = f"{t.at('identities')}[{i}]"
        provider, sep, subject = glob.partition("/")
        everyone = _matches_everything(provider) and (not sep or _matches_everything(subject))
        if everyone:
            t.col.warn(path, "matches every identity: anyone who can enroll may connect")
        elif not (sep and provider and subject):
            t.col.problem(path, "must be PROVIDER/SUBJECT, globs allowed (e.g. corp/alice, ci/acme/*)")
            ok = False
    return globs if ok else None


def _scope(t: _Table) -> DeclaredScope | None:
    st = t.table("credential_scope", _SCOPE)
    if st is None:
        return None
    buckets = st.string_list("buckets")
    tables = st.string_list("tables")
    access = st.string_list("access", choices=_SCOPE_ACCESS)
    if any(value is None and st.has(key) for key, value in
           (("buckets", buckets), ("tables", tables), ("access", access))):
        return None
    return DeclaredScope(buckets=_or(buckets, ()), tables=_or(tables, ()), access=_or(access, ()))


def _warn_broad_scope(t: _Table, scope: DeclaredScope) -> None:
    """Warn when a credential reaches everything: a gateway holding such a key fails open the
    moment any rule in front of it is wrong. (Until per-request policy exists, connect access
    grants whatever the credential reaches.)"""
    broad: list[str] = []
    for kind, globs in (("bucket", scope.buckets), ("table", scope.tables)):
        glob = next((g for g in globs if _matches_everything(g)), None)
        if glob is not None:
            broad.append(f'every {kind} ("{glob}")')  # only '*'s: safe to echo
    if "admin" in scope.access:
        broad.append("admin access")
    if broad:
        t.col.warn(t.at("credential_scope"), f"the credential reaches {_and(broad)}; give the gateway a key "
                                             "scoped to what its policy grants")


def _listeners(root: _Table, targets: _Targets, control: ControlConfig) -> tuple[ListenerConfig, ...]:
    tables = root.tables("listeners", _LISTENER)
    given_control = root.raw("control")
    taken: list[tuple[tuple[str, int], str]] = []
    for key, address in (("listen", control.listen), ("ops_listen", control.ops_listen)):
        default = "" if isinstance(given_control, dict) and key in given_control else " (its default)"
        taken.append((address, f"control.{key}{default}"))
    names: dict[str, str] = {}
    served: set[str] = set()
    out: list[ListenerConfig] = []
    # whether every listener's targets are known, so that an unserved target is certain
    complete = tables is not None or not root.has("listeners")
    raw = root.raw("listeners")
    if tables is not None and not (isinstance(raw, list) and len(raw) == len(tables)):
        complete = False
    for lt in tables or ():
        listener, refs_known = _listener(lt, names, taken, targets, served)
        complete = complete and refs_known
        if listener is not None:
            out.append(listener)
    if complete:
        for found in targets.found:
            if found.name is not None and found.name not in served:
                root.col.warn(found.path, "no listener serves this target: it is unreachable")
    return tuple(out)


def _listener(t: _Table, names: dict[str, str], taken: list[tuple[tuple[str, int], str]], targets: _Targets,
              served: set[str]) -> tuple[ListenerConfig | None, bool]:
    """One ``[[listeners]]`` entry; also whether its ``targets`` could be read."""
    name = t.string("name", required=True, pattern=_NAME, expected=_NAME_TEXT)
    if name is not None:
        if name in names:
            t.problem("name", f"duplicate listener name (same as {names[name]})")
        else:
            names[name] = t.at("name")
    listen = t.address("listen", required=True)
    if listen is not None and listen[1] != 0:  # port 0: the system picks distinct ports
        clash = next((where for address, where in taken if address == listen), None)
        if clash is not None:
            t.problem("listen", f"same address as {clash}")
        else:
            taken.append((listen, t.at("listen")))
    server_cert = t.path_value("server_cert", required=True)
    server_key = t.path_value("server_key", required=True)
    client_ca = t.path_value("client_ca", required=True)
    refs = t.string_list("targets", required=True, nonempty=True)
    if refs is None:
        return None, False
    ok = True
    picked: dict[str, str] = {}  # server name -> the target path it picks on this listener
    for j, ref in enumerate(refs):
        path = f"{t.at('targets')}[{j}]"
        found = targets.named(ref)
        if found is None:
            if targets.known:
                t.col.problem(path, "no such target (no [[targets]] entry has this name)")
            ok = False
            continue
        served.add(ref)
        if len(refs) == 1 or found.server_names is None:
            continue
        if not found.server_names:
            t.col.problem(path, f"this listener serves several targets, so {found.path} needs server_names "
                                "(the client's TLS server name picks the target)")
            continue
        shared = next((picked[n] for n in found.server_names if n in picked), None)
        if shared is not None:
            t.col.problem(path, f"{found.path} shares a server name with {shared}: on one listener each name "
                                "must pick one target")
        for server_name in found.server_names:
            picked.setdefault(server_name, found.path)
    if not ok or name is None or listen is None:
        return None, True
    if server_cert is None or server_key is None or client_ca is None:
        return None, True
    return ListenerConfig(name=name, listen=listen, server_cert=server_cert, server_key=server_key,
                          client_ca=client_ca, targets=refs), True
