"""Identity providers' signing keys: parsing, caching and fetching JWKS documents.

Theory of operation, in three layers:

* :class:`JwkSet` (pure) turns a JWKS document into verification keys indexed by ``kid``.
  Only asymmetric signing keys are kept (RSA of 2048-8192 bits, EC P-256, OKP Ed25519),
  built from their *public* members only; everything else is skipped with a reason
  (:attr:`JwkSet.skipped`) for the log. Keys without a ``kid`` are skipped, since the key is
  always chosen by ``kid``; a ``kid`` that occurs more than once is ambiguous, so **every**
  key with that ``kid`` is dropped (fail closed: a token naming it is refused as an unknown
  key). A document that is not a JWKS, or has more than :data:`MAX_JWKS_KEYS` entries, is
  invalid (:class:`InvalidJwks`); a valid document with no usable key is a valid, empty set
  (an IdP that withdrew all its keys is honoured, not papered over with old ones).
* :class:`JwksCache` (pure, clock passed in) is one provider's last good key set, when it
  was fetched, how long it stays fresh (``Cache-Control: max-age`` clamped to the
  provider's bounds, see :func:`cache_max_age`) and how long it may still serve, stale,
  when the provider is unreachable (``jwks_max_staleness``). Fetches are rate-limited:
  at most one per ``jwks_refetch_interval``, whatever triggered it (expiry, an unknown
  ``kid``, or a retry after a failure).
* :func:`fetch_jwks` and :class:`JwksManager` do the I/O on trio: blocking ``urllib`` and
  file reads run in worker threads under a deadline; only ``https://`` URLs are fetched,
  plain ``http://`` only from loopback hosts (checked before any network I/O, and again on
  every redirect); responses are size-capped; errors never quote response bodies. The
  manager shares one fetch among concurrent callers (a lock per provider) and turns "no
  usable keys" into :class:`ProviderUnavailable` (the control API's 503).
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from http.client import HTTPException, HTTPMessage
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import jwt
import trio
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from l4proxy.config._model import JwksSourceKind, ProviderConfig
from l4proxy.identity._model import VerifiedToken
from l4proxy.identity._oidc import SUPPORTED_ALGORITHMS, UnknownKeyId, verify_id_token
from l4proxy.netaddr import is_loopback_host

__all__ = [
    "MAX_DISCOVERY_BYTES",
    "MAX_JWKS_BYTES",
    "MAX_JWKS_KEYS",
    "InvalidJwks",
    "Jwk",
    "JwkSet",
    "JwksCache",
    "JwksManager",
    "JwksUnavailable",
    "ProviderUnavailable",
    "cache_max_age",
    "check_fetch_url",
    "discovery_url",
    "fetch_jwks",
]

log = logging.getLogger("l4proxy.identity.jwks")

#: largest JWKS document accepted (bytes)
MAX_JWKS_BYTES = 256 << 10
#: most entries a JWKS document may list
MAX_JWKS_KEYS = 100
#: largest discovery document accepted (bytes)
MAX_DISCOVERY_BYTES = 256 << 10
#: RSA modulus sizes accepted (bits)
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192
#: redirects followed per fetch (each target checked like the original URL)
MAX_REDIRECTS = 3

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

#: per key type: the public members we read, and the algorithm pyjwt parses it with
_KTY = {
    "RSA": (("n", "e"), "RS256"),
    "EC": (("crv", "x", "y"), "ES256"),
    "OKP": (("crv", "x"), "EdDSA"),
}
_CURVES = {"EC": "P-256", "OKP": "Ed25519"}
#: which declared JWK ``alg`` fits which key type
_ALG_KTY = {"RS256": "RSA", "PS256": "RSA", "ES256": "EC", "EdDSA": "OKP"}


class InvalidJwks(ValueError):
    """A JWKS document is malformed or over a limit."""


class JwksUnavailable(Exception):
    """Fetching a provider's JWKS failed; ``reason`` says why (never quotes a body)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ProviderUnavailable(Exception):
    """No usable keys for a provider: never fetched, or stale beyond ``jwks_max_staleness``.

    The control API maps it to 503.
    """

    def __init__(self, provider: str, reason: str) -> None:
        super().__init__(f"identity provider {provider!r} unavailable: {reason}")
        self.provider = provider
        self.reason = reason


# --- key sets (pure) ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Jwk:
    """One verification key.

    Attributes:
        kid: its key id.
        kty: ``RSA``, ``EC`` (P-256) or ``OKP`` (Ed25519).
        key: the public key.
        alg: the ``alg`` the JWK declares, if any (then only that algorithm may use it).
    """

    kid: str
    kty: str
    key: PublicKey
    alg: str | None = None


def _short_repr(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_key(entry: object) -> Jwk | str:
    """A :class:`Jwk`, or the reason the entry is skipped."""
    if not isinstance(entry, dict):
        return "not a JSON object"
    kid = entry.get("kid")
    if not isinstance(kid, str) or not kid:
        return "no kid"
    kty = entry.get("kty")
    if kty not in _KTY:
        return f"kid {_short_repr(kid)}: kty {_short_repr(kty)} not supported"
    members, parse_alg = _KTY[kty]
    if kty in _CURVES and entry.get("crv") != _CURVES[kty]:
        return f"kid {_short_repr(kid)}: {kty} curve {_short_repr(entry.get('crv'))} not supported"
    use = entry.get("use")
    if use is not None and use != "sig":
        return f"kid {_short_repr(kid)}: use {_short_repr(use)} is not sig"
    ops = entry.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return f"kid {_short_repr(kid)}: key_ops does not include verify"
    alg = entry.get("alg")
    if alg is not None and (not isinstance(alg, str) or alg not in SUPPORTED_ALGORITHMS
                            or _ALG_KTY[alg] != kty):
        return f"kid {_short_repr(kid)}: alg {_short_repr(alg)} not supported for {kty}"
    public = {"kty": kty}
    for name in members:
        value = entry.get(name)
        if not isinstance(value, str):
            return f"kid {_short_repr(kid)}: member {name!r} missing or not a string"
        public[name] = value
    try:
        key = jwt.PyJWK(public, algorithm=parse_alg).key
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        return f"kid {_short_repr(kid)}: unusable key ({type(exc).__name__})"
    if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey)):
        return f"kid {_short_repr(kid)}: not a public key"
    if isinstance(key, rsa.RSAPublicKey) and not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
        return f"kid {_short_repr(kid)}: RSA key of {key.key_size} bits"
    return Jwk(kid=kid, kty=kty, key=key, alg=alg)


def _loads(data: bytes, what: str) -> Any:
    def no_constants(name: str) -> NoReturn:
        raise ValueError(f"{name} is not JSON")
    try:
        return json.loads(data, parse_constant=no_constants)
    except (ValueError, RecursionError) as exc:
        raise InvalidJwks(f"{what} is not valid JSON ({type(exc).__name__})") from exc


class JwkSet:
    """A provider's verification keys, by ``kid`` (immutable).

    Build with :meth:`from_json` (a parsed document) or :meth:`from_bytes`.
    """

    __slots__ = ("_keys", "skipped")

    def __init__(self, keys: Iterable[Jwk] = (), *, skipped: Iterable[str] = ()) -> None:
        self._keys: dict[str, Jwk] = {}
        for key in keys:
            if key.kid in self._keys:
                raise ValueError(f"duplicate kid {key.kid!r}")
            self._keys[key.kid] = key
        #: why entries of the document were not used (for the log)
        self.skipped: tuple[str, ...] = tuple(skipped)

    @classmethod
    def from_json(cls, obj: object) -> JwkSet:
        """Build from a parsed JWKS document (``{"keys": [...]}``).

        Raises:
            InvalidJwks: not a JWKS object, or more than :data:`MAX_JWKS_KEYS` entries.
        """
        if not isinstance(obj, dict) or not isinstance(obj.get("keys"), list):
            raise InvalidJwks("not a JWKS document (no 'keys' list)")
        entries = obj["keys"]
        if len(entries) > MAX_JWKS_KEYS:
            raise InvalidJwks(f"JWKS has {len(entries)} keys, more than {MAX_JWKS_KEYS}")
        parsed: dict[str, Jwk] = {}
        duplicates: set[str] = set()
        skipped: list[str] = []
        for entry in entries:
            result = _parse_key(entry)
            if isinstance(result, str):
                skipped.append(result)
            elif result.kid in parsed or result.kid in duplicates:
                parsed.pop(result.kid, None)
                duplicates.add(result.kid)
            else:
                parsed[result.kid] = result
        skipped += [f"kid {_short_repr(kid)}: listed more than once, all dropped"
                    for kid in sorted(duplicates)]
        return cls(parsed.values(), skipped=skipped)

    @classmethod
    def from_bytes(cls, data: bytes) -> JwkSet:
        """Build from a JWKS document's bytes (at most :data:`MAX_JWKS_BYTES`).

        Raises:
            InvalidJwks: too large, not JSON, or see :meth:`from_json`.
        """
        if len(data) > MAX_JWKS_BYTES:
            raise InvalidJwks(f"JWKS document larger than {MAX_JWKS_BYTES} bytes")
        return cls.from_json(_loads(data, "JWKS document"))

    def get(self, kid: str) -> Jwk | None:
        """The key with this ``kid``, or None."""
        return self._keys.get(kid)

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._keys)

    def __contains__(self, kid: object) -> bool:
        return kid in self._keys

    def __iter__(self) -> Iterator[Jwk]:
        return iter(self._keys.values())

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"JwkSet(kids={sorted(self._keys)!r})"


# --- the cache (pure) --------------------------------------------------------------------


def cache_max_age(cache_control: str | None, provider: ProviderConfig) -> float:
    """How long a fetched JWKS stays fresh: ``max-age`` clamped to
    ``[jwks_min_cache, jwks_max_cache]``; ``jwks_min_cache`` without a (valid, single)
    ``max-age`` or with ``no-store`` / ``no-cache``."""
    low, high = provider.jwks_min_cache, provider.jwks_max_cache
    if not cache_control:
        return low
    max_ages: list[str] = []
    for directive in cache_control.split(","):
        name, _, value = directive.strip().partition("=")
        name = name.strip().lower()
        if name in ("no-store", "no-cache"):
            return low
        if name == "max-age":
            max_ages.append(value.strip().strip('"'))
    if len(max_ages) != 1 or not max_ages[0].isdigit():
        return low
    return float(min(max(int(max_ages[0]), low), high))


@dataclass(slots=True, kw_only=True)
class JwksCache:
    """One provider's last good key set and fetch bookkeeping (mutable; clock passed in)."""

    provider: ProviderConfig
    keys: JwkSet | None = None
    fetched_at: float = 0.0
    max_age: float = 0.0
    last_attempt: float | None = None
    last_error: str | None = None

    def fresh(self, now: float) -> bool:
        """Keys are present and younger than their max-age."""
        return self.keys is not None and now - self.fetched_at < self.max_age

    def usable(self, now: float) -> bool:
        """Keys are present and at most ``jwks_max_staleness`` past their max-age."""
        return (self.keys is not None
                and now - self.fetched_at <= self.max_age + self.provider.jwks_max_staleness)

    def may_refetch(self, now: float) -> bool:
        """No fetch was attempted within ``jwks_refetch_interval`` (a clock that went
        backwards allows one)."""
        last = self.last_attempt
        return last is None or not 0 <= now - last < self.provider.jwks_refetch_interval

    def attempted(self, now: float) -> None:
        """Record that a fetch starts now."""
        self.last_attempt = now

    def store(self, keys: JwkSet, *, max_age: float, now: float) -> None:
        """Record a successful fetch."""
        self.keys, self.fetched_at, self.max_age, self.last_error = keys, now, max_age, None

    def failed(self, reason: str) -> None:
        """Record a failed fetch (the last good keys stay)."""
        self.last_error = reason


# --- fetching (I/O) ----------------------------------------------------------------------




def check_fetch_url(url: object) -> str:
    """Check a discovery or JWKS URL: ``https://``, or ``http://`` to a loopback host only
    (127.0.0.0/8, ::1, ``localhost``); no credentials in it. Returns the URL.

    Raises:
        JwksUnavailable: the URL is refused (no I/O has happened).
    """
    if not isinstance(url, str) or not url:
        raise JwksUnavailable("no URL")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        _ = parts.port  # a malformed port raises here
    except ValueError as exc:
        raise JwksUnavailable(f"malformed URL {url[:200]!r}") from exc
    if not host:
        raise JwksUnavailable(f"URL without a host: {url[:200]!r}")
    if parts.username is not None or parts.password is not None:
        raise JwksUnavailable("URL carries credentials")
    scheme = parts.scheme.lower()
    if scheme == "https":
        return url
    if scheme == "http":
        if is_loopback_host(host):
            return url
        raise JwksUnavailable(f"plain http:// is allowed for loopback hosts only, not {host!r}")
    raise JwksUnavailable(f"URL scheme {parts.scheme!r} not allowed (https only)")


def discovery_url(issuer: str) -> str:
    """The OIDC discovery document's URL for ``issuer`` (OpenID Connect Discovery 1.0 §4)."""
    return issuer.rstrip("/") + "/.well-known/openid-configuration"


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    max_redirections = MAX_REDIRECTS

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                         headers: HTTPMessage, newurl: str) -> urllib.request.Request | None:
        try:
            check_fetch_url(newurl)
        except JwksUnavailable:
            fp.close()  # the redirect response; urllib only closes it when it follows
            raise
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _http_get(url: str, *, timeout: float, cap: int) -> tuple[bytes, str | None]:
    """GET ``url`` (blocking; run in a thread): ``(body, Cache-Control header)``."""
    handlers: list[urllib.request.BaseHandler] = [_CheckedRedirects()]
    if is_loopback_host(urlsplit(url).hostname or ""):
        handlers.append(urllib.request.ProxyHandler({}))  # never send loopback via a proxy
    opener = urllib.request.build_opener(*handlers)
    request = urllib.request.Request(url, headers={"Accept": "application/json",
                                                   "User-Agent": "l4proxy"})
    try:
        with opener.open(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > cap:
                raise JwksUnavailable(f"{url}: response larger than {cap} bytes")
            body = response.read(cap + 1)
            if len(body) > cap:
                raise JwksUnavailable(f"{url}: response larger than {cap} bytes")
            # several Cache-Control field lines combine into one list (RFC 9110 §5.3)
            cache_control = response.headers.get_all("Cache-Control") or []
            return body, ", ".join(cache_control) or None
    except urllib.error.HTTPError as exc:
        exc.close()
        raise JwksUnavailable(f"{url}: HTTP {exc.code}") from None
    except urllib.error.URLError as exc:
        raise JwksUnavailable(f"{url}: {_short(exc.reason)}") from None
    except (HTTPException, OSError, ValueError) as exc:
        raise JwksUnavailable(f"{url}: {type(exc).__name__}") from None


def _short(reason: object) -> str:
    text = reason if isinstance(reason, str) else f"{type(reason).__name__}: {reason}"
    return text[:200]


def _read_file(path: Path, cap: int) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(cap + 1)
    except OSError as exc:
        raise JwksUnavailable(f"{path}: {exc.strerror or type(exc).__name__}") from None
    if len(data) > cap:
        raise JwksUnavailable(f"{path}: larger than {cap} bytes")
    return data


async def _in_thread(fn: Callable[[], Any], *, seconds: float, what: str) -> Any:
    """Run blocking ``fn`` in a worker thread, abandoning it after ``seconds``."""
    try:
        with trio.fail_after(seconds):
            return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)
    except trio.TooSlowError:
        raise JwksUnavailable(f"{what}: no answer within {seconds:g}s") from None


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = _loads(data, what)
    except InvalidJwks as exc:
        raise JwksUnavailable(str(exc)) from None
    if not isinstance(obj, dict):
        raise JwksUnavailable(f"{what} is not a JSON object")
    return obj


async def fetch_jwks(provider: ProviderConfig) -> tuple[dict[str, Any], float]:
    """Fetch a provider's JWKS document from its configured source.

    DISCOVERY reads ``<issuer>/.well-known/openid-configuration``, requires its ``issuer``
    to equal the configured one exactly and follows its ``jwks_uri``; URL fetches
    ``jwks_location``; FILE reads ``jwks_location`` from disk. Each network request and
    the file read is bounded by ``provider.fetch_timeout``.

    Returns:
        ``(document, max_age)``: the parsed JSON object and how long it stays fresh
        (from the JWKS response's ``Cache-Control``, see :func:`cache_max_age`; a file's is
        ``jwks_min_cache``).

    Raises:
        JwksUnavailable: refused URL, network or HTTP error, timeout, oversized or
            malformed document, or a discovery issuer mismatch.
    """
    timeout = provider.fetch_timeout
    if provider.jwks_source is JwksSourceKind.FILE:
        if not provider.jwks_location:
            raise JwksUnavailable("no JWKS file configured")
        path = Path(provider.jwks_location)
        data = await _in_thread(partial(_read_file, path, MAX_JWKS_BYTES), seconds=timeout,
                                what=str(path))
        return _json_object(data, "JWKS file"), provider.jwks_min_cache
    if provider.jwks_source is JwksSourceKind.DISCOVERY:
        url = check_fetch_url(discovery_url(provider.issuer))
        body, _ = await _in_thread(partial(_http_get, url, timeout=timeout, cap=MAX_DISCOVERY_BYTES),
                                   seconds=timeout, what=url)
        doc = _json_object(body, "discovery document")
        issuer = doc.get("issuer")
        if issuer != provider.issuer:
            shown = repr(issuer)[:120] if isinstance(issuer, str) else type(issuer).__name__
            raise JwksUnavailable(f"discovery document's issuer {shown} is not the configured "
                                  f"{provider.issuer!r}")
        jwks_uri = doc.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise JwksUnavailable("discovery document has no jwks_uri")
    else:
        jwks_uri = provider.jwks_location or ""
    url = check_fetch_url(jwks_uri)
    body, cache_control = await _in_thread(partial(_http_get, url, timeout=timeout, cap=MAX_JWKS_BYTES),
                                           seconds=timeout, what=url)
    return _json_object(body, "JWKS document"), cache_max_age(cache_control, provider)


# --- the manager (async) -----------------------------------------------------------------


class _ProviderState:
    __slots__ = ("cache", "lock", "provider")

    def __init__(self, provider: ProviderConfig) -> None:
        self.provider = provider
        self.cache = JwksCache(provider=provider)
        self.lock = trio.Lock()


class JwksManager:
    """Keeps every provider's keys current and verifies tokens with them.

    Args:
        providers: the configured providers (names must be unique).
        clock: Unix time now; used for cache ages, rate limits and token checks.
    """

    def __init__(self, providers: Iterable[ProviderConfig], *,
                 clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._states: dict[str, _ProviderState] = {}
        for provider in providers:
            if provider.name in self._states:
                raise ValueError(f"duplicate provider name {provider.name!r}")
            self._states[provider.name] = _ProviderState(provider)

    def _state(self, name: str) -> _ProviderState:
        try:
            return self._states[name]
        except KeyError:
            raise KeyError(f"unknown identity provider {name!r}") from None

    async def keys(self, provider_name: str, kid: str | None = None) -> JwkSet:
        """The provider's current keys.

        Cached keys are returned while fresh and (if ``kid`` is given) they contain ``kid``.
        Otherwise the JWKS is refetched, at most once per ``jwks_refetch_interval``;
        concurrent callers share one fetch. When fetching fails or is rate-limited, the
        last good keys serve while usable (``jwks_max_staleness``).

        Returns:
            The keys; they may still lack ``kid`` (the refetch was rate-limited, or the IdP
            does not publish it).

        Raises:
            ProviderUnavailable: no usable keys.
            KeyError: unknown provider.
        """
        state = self._state(provider_name)
        cache = state.cache
        if cache.keys is not None and cache.fresh(self._clock()) and (kid is None or kid in cache.keys):
            return cache.keys
        async with state.lock:
            now = self._clock()
            keys = cache.keys
            if keys is not None and cache.fresh(now) and (kid is None or kid in keys):
                return keys  # another task fetched while we waited
            if cache.may_refetch(now):
                keys = await self._fetch(state, now)
                if keys is not None:
                    return keys
            if cache.keys is None or not cache.usable(now):
                raise ProviderUnavailable(provider_name, cache.last_error or "keys expired")
            if not cache.fresh(now):
                log.warning("identity provider %s: serving stale keys (%s)", provider_name,
                            cache.last_error or "refetch rate-limited")
            return cache.keys

    async def _fetch(self, state: _ProviderState, now: float) -> JwkSet | None:
        provider, cache = state.provider, state.cache
        cache.attempted(now)
        try:
            doc, max_age = await fetch_jwks(provider)
            keys = JwkSet.from_json(doc)
        except (JwksUnavailable, InvalidJwks) as exc:
            reason = exc.reason if isinstance(exc, JwksUnavailable) else str(exc)
            cache.failed(reason)
            log.warning("identity provider %s: JWKS fetch failed: %s", provider.name, reason)
            return None
        old = cache.keys.kids if cache.keys is not None else frozenset()
        cache.store(keys, max_age=max_age, now=self._clock())
        for reason in keys.skipped:
            log.info("identity provider %s: JWKS entry skipped: %s", provider.name, reason)
        if keys.kids != old:
            log.info("identity provider %s: keys now %s (added %s, removed %s)", provider.name,
                     sorted(keys.kids), sorted(keys.kids - old), sorted(old - keys.kids))
        return keys

    async def verify(self, token: str, provider: ProviderConfig) -> VerifiedToken:
        """Verify ``token`` for ``provider`` with its current keys.

        On an unknown ``kid`` the JWKS is refetched (rate-limited) and verification retried
        once, so a rotated key works at once; a key the IdP removed stops working at the
        next refetch.

        Raises:
            TokenRejected: (or :class:`UnknownKeyId`) the token is refused; log ``reason``.
            ProviderUnavailable: no usable keys (503).
        """
        keys = await self.keys(provider.name)
        try:
            return verify_id_token(token, provider, keys, now=self._clock())
        except UnknownKeyId as exc:
            keys = await self.keys(provider.name, exc.kid)
        return verify_id_token(token, provider, keys, now=self._clock())

    async def warm_up(self) -> None:
        """Fetch every provider's keys once (e.g. at start-up); failures are only logged."""
        for name in self._states:
            try:
                await self.keys(name)
            except ProviderUnavailable:
                pass

    def readiness(self, now: float | None = None) -> dict[str, bool]:
        """Provider name -> whether its keys are usable now (for ``/readyz``)."""
        t = self._clock() if now is None else now
        return {name: state.cache.usable(t) for name, state in self._states.items()}

    def cache(self, provider_name: str) -> JwksCache:
        """The provider's cache state (read it, don't change it)."""
        return self._state(provider_name).cache
