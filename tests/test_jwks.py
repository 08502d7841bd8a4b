"""JWKS parsing, caching and fetching, against real JWKS servers on loopback.

The servers run in the test (``l4proxy.http.serve_http`` on 127.0.0.1, port 0) and count
what they are asked; the manager's clock is injected, so nothing sleeps.
"""

from __future__ import annotations

import json
import socket
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from l4proxy.config._model import JwksSourceKind, ProviderConfig
from l4proxy.http import HttpRequest, HttpResponse, json_error, json_response, serve_http
from l4proxy.identity._jwks import (
    MAX_JWKS_BYTES,
    InvalidJwks,
    JwksCache,
    JwkSet,
    JwksManager,
    JwksUnavailable,
    ProviderUnavailable,
    cache_max_age,
    check_fetch_url,
    fetch_jwks,
)
from l4proxy.identity._oidc import TokenRejected, UnknownKeyId

T0 = 1_700_000_000.0

KEY_A = ec.generate_private_key(ec.SECP256R1())
KEY_B = ec.generate_private_key(ec.SECP256R1())
KEY_C = ec.generate_private_key(ec.SECP256R1())


def ec_jwk(key: ec.EllipticCurvePrivateKey, kid: str, **extra: Any) -> dict[str, Any]:
    return {**ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid, **extra}


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeIdp:
    """A JWKS (and discovery) server whose answers the test changes as it goes."""

    def __init__(self) -> None:
        self.jwks: dict[str, Any] = {"keys": [ec_jwk(KEY_A, "a")]}
        self.hits: Counter[str] = Counter()
        self.status = 200
        self.discovery_issuer: str | None = None  # None: the real issuer
        self.jwks_uri: str | None = None  # None: our /jwks.json
        self.redirect_to: str | None = None
        self.raw_body: bytes | None = None
        self.hang_until: trio.Event | None = None
        self.port = 0

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, request: HttpRequest) -> HttpResponse:
        self.hits[request.path] += 1
        if self.hang_until is not None:
            await self.hang_until.wait()
        if self.status != 200:
            return json_error(self.status, "down", "secret-internal-detail")
        if self.redirect_to is not None:
            return HttpResponse(status=302, headers=(("location", self.redirect_to),))
        if request.path == "/.well-known/openid-configuration":
            return json_response(200, {"issuer": self.discovery_issuer or self.issuer,
                                       "jwks_uri": self.jwks_uri or self.issuer + "/jwks.json"})
        if request.path == "/jwks.json":
            if self.raw_body is not None:
                return HttpResponse(status=200, body=self.raw_body)
            return json_response(200, self.jwks)
        return json_error(404, "not_found", "no")

    def provider(self, source: JwksSourceKind = JwksSourceKind.URL, **changes: Any) -> ProviderConfig:
        location = self.issuer + "/jwks.json" if source is JwksSourceKind.URL else None
        base = ProviderConfig(name="idp", issuer=self.issuer, audience="l4proxy", jwks_source=source,
                              jwks_location=location, allow_any_subject=True, jwks_min_cache=60.0,
                              jwks_max_staleness=600.0, jwks_refetch_interval=10.0, fetch_timeout=5.0)
        return replace(base, **changes)

    @property
    def jwks_fetches(self) -> int:
        return self.hits["/jwks.json"]


@pytest.fixture
async def idp(nursery: trio.Nursery) -> FakeIdp:
    server = FakeIdp()
    _, server.port = await nursery.start(serve_http, server.handle, "127.0.0.1", 0)
    return server


def token(key: ec.EllipticCurvePrivateKey, kid: str, issuer: str, *, now: float = T0) -> str:
    claims = {"iss": issuer, "aud": "l4proxy", "sub": "alice", "iat": now, "exp": now + 300,
              "jti": f"j-{kid}-{now}"}
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid})


# --- JwkSet --------------------------------------------------------------------------------


def test_jwkset_keeps_asymmetric_signing_keys_only() -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    small_rsa = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    ed = ed25519.Ed25519PrivateKey.generate()
    p384 = ec.generate_private_key(ec.SECP384R1())
    doc = {"keys": [
        {**RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True), "kid": "rsa", "use": "sig"},
        ec_jwk(KEY_A, "ec", alg="ES256"),
        {**OKPAlgorithm.to_jwk(ed.public_key(), as_dict=True), "kid": "ed"},
        {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac", "alg": "HS256"},
        ec_jwk(KEY_B, ""),
        {k: v for k, v in ec_jwk(KEY_B, "x").items() if k != "kid"},
        {**ECAlgorithm.to_jwk(p384.public_key(), as_dict=True), "kid": "p384"},
        ec_jwk(KEY_B, "enc", use="enc"),
        ec_jwk(KEY_B, "wrong-alg", alg="RS256"),
        ec_jwk(KEY_B, "ops", key_ops=["encrypt"]),
        {**RSAAlgorithm.to_jwk(small_rsa.public_key(), as_dict=True), "kid": "small"},
        {"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA", "kid": "bad-point"},
        "not an object",
    ]}
    keys = JwkSet.from_json(doc)
    assert keys.kids == {"rsa", "ec", "ed"}
    assert isinstance(keys.get("rsa").key, rsa.RSAPublicKey)  # type: ignore[union-attr]
    assert keys.get("ec").alg == "ES256"  # type: ignore[union-attr]
    assert keys.get("hmac") is None
    assert len(keys.skipped) == 10
    assert any("kty 'oct' not supported" in reason for reason in keys.skipped)
    assert any("RSA key of 1024 bits" in reason for reason in keys.skipped)


def test_jwkset_uses_public_members_only() -> None:
    private = {**ECAlgorithm.to_jwk(KEY_A, as_dict=True), "kid": "leaky"}
    assert "d" in private
    key = JwkSet.from_json({"keys": [private]}).get("leaky")
    assert key is not None and isinstance(key.key, ec.EllipticCurvePublicKey)


def test_jwkset_drops_every_key_of_a_duplicated_kid() -> None:
    keys = JwkSet.from_json({"keys": [ec_jwk(KEY_A, "k"), ec_jwk(KEY_B, "k"), ec_jwk(KEY_C, "c")]})
    assert keys.kids == {"c"}
    assert "kid 'k': listed more than once, all dropped" in keys.skipped


def test_jwkset_without_usable_keys_is_valid_and_empty() -> None:
    assert len(JwkSet.from_json({"keys": []})) == 0
    assert len(JwkSet.from_json({"keys": [{"kty": "oct", "k": "AA", "kid": "h"}]})) == 0


@pytest.mark.parametrize("doc", [[], {"keys": {}}, {"nokeys": []}, "x", None])
def test_jwkset_refuses_non_jwks_documents(doc: Any) -> None:
    with pytest.raises(InvalidJwks):
        JwkSet.from_json(doc)


def test_jwkset_key_count_cap() -> None:
    entry = ec_jwk(KEY_A, "k")
    JwkSet.from_json({"keys": [{**entry, "kid": f"k{i}"} for i in range(100)]})
    with pytest.raises(InvalidJwks, match="more than 100"):
        JwkSet.from_json({"keys": [{**entry, "kid": f"k{i}"} for i in range(101)]})


def test_jwkset_document_size_cap() -> None:
    small = json.dumps({"keys": [ec_jwk(KEY_A, "k")]}).encode()
    assert JwkSet.from_bytes(small).kids == {"k"}
    padded = small[:-1] + b', "pad": "' + b"x" * MAX_JWKS_BYTES + b'"}'
    with pytest.raises(InvalidJwks, match="larger than"):
        JwkSet.from_bytes(padded)
    with pytest.raises(InvalidJwks, match="not valid JSON"):
        JwkSet.from_bytes(b'{"keys": [NaN]}')


# --- cache ---------------------------------------------------------------------------------


PROVIDER = ProviderConfig(name="p", issuer="https://idp.example", audience="a",
                          jwks_source=JwksSourceKind.DISCOVERY, allow_any_subject=True,
                          jwks_min_cache=60.0, jwks_max_cache=86400.0, jwks_max_staleness=3600.0,
                          jwks_refetch_interval=10.0)


@pytest.mark.parametrize("header,expected", [
    (None, 60.0), ("", 60.0), ("public", 60.0),
    ("max-age=300", 300.0), ("public, max-age=300, must-revalidate", 300.0),
    ('max-age="300"', 300.0), ("MAX-AGE=300", 300.0),
    ("max-age=5", 60.0), ("max-age=0", 60.0), ("max-age=99999999", 86400.0),
    ("no-store", 60.0), ("max-age=300, no-store", 60.0), ("no-cache, max-age=300", 60.0),
    ("max-age=-1", 60.0), ("max-age=abc", 60.0), ("max-age=300, max-age=600", 60.0),
])
def test_cache_control_is_clamped(header: str | None, expected: float) -> None:
    assert cache_max_age(header, PROVIDER) == expected


def test_cache_fresh_usable_and_rate_limit() -> None:
    cache = JwksCache(provider=PROVIDER)
    assert not cache.fresh(T0) and not cache.usable(T0) and cache.may_refetch(T0)
    cache.attempted(T0)
    cache.store(JwkSet(), max_age=300.0, now=T0)
    assert cache.fresh(T0 + 299) and not cache.fresh(T0 + 300)
    assert cache.usable(T0 + 300 + 3600) and not cache.usable(T0 + 300 + 3601)
    assert not cache.may_refetch(T0 + 9.9) and cache.may_refetch(T0 + 10)
    assert cache.may_refetch(T0 - 100)  # the clock went backwards: don't lock up


# --- URL rules -----------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["https://idp.example.com/jwks", "http://127.0.0.1:8080/jwks",
                                 "http://127.9.9.9/jwks", "http://[::1]:80/jwks", "http://localhost/j"])
def test_allowed_urls(url: str) -> None:
    assert check_fetch_url(url) == url


@pytest.mark.parametrize("url", ["http://example.com/jwks", "http://10.0.0.1/jwks", "ftp://idp.example/x",
                                 "file:///etc/passwd", "https://user:pw@idp.example/jwks", "https:///x",
                                 "http://localhost.evil.example/", "http://[::ffff:7f00:1]:99999/", ""])
def test_refused_urls(url: str) -> None:
    with pytest.raises(JwksUnavailable):
        check_fetch_url(url)


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every host a blocking client connects to (urllib goes through create_connection)."""
    seen: list[str] = []
    real = socket.create_connection

    def spy(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        seen.append(address[0])
        if address[0] not in ("127.0.0.1", "localhost", "::1"):
            raise AssertionError(f"network I/O to {address[0]}")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", spy)
    return seen


async def test_plain_http_to_a_remote_host_is_refused_without_network_io(connections: list[str]) -> None:
    url_provider = ProviderConfig(name="p", issuer="http://example.com", audience="a",
                                  jwks_source=JwksSourceKind.URL, jwks_location="http://example.com/jwks",
                                  allow_any_subject=True)
    with pytest.raises(JwksUnavailable, match="loopback hosts only"):
        await fetch_jwks(url_provider)
    with pytest.raises(JwksUnavailable, match="loopback hosts only"):
        await fetch_jwks(replace(url_provider, jwks_source=JwksSourceKind.DISCOVERY, jwks_location=None))
    assert connections == []


async def test_discovery_pointing_jwks_uri_at_plain_http_is_refused(idp: FakeIdp,
                                                                     connections: list[str]) -> None:
    idp.jwks_uri = "http://example.com/jwks.json"
    with pytest.raises(JwksUnavailable, match="loopback hosts only"):
        await fetch_jwks(idp.provider(JwksSourceKind.DISCOVERY))
    assert connections == ["127.0.0.1"]


async def test_redirect_to_plain_http_is_refused(idp: FakeIdp, connections: list[str]) -> None:
    idp.redirect_to = "http://example.com/jwks.json"
    with pytest.raises(JwksUnavailable, match="loopback hosts only"):
        await fetch_jwks(idp.provider())
    assert connections == ["127.0.0.1"]


# --- fetching ------------------------------------------------------------------------------


async def test_fetch_by_url(idp: FakeIdp) -> None:
    doc, max_age = await fetch_jwks(idp.provider())
    assert doc == idp.jwks and max_age == 60.0
    assert idp.jwks_fetches == 1


async def test_fetch_by_discovery(idp: FakeIdp) -> None:
    doc, _ = await fetch_jwks(idp.provider(JwksSourceKind.DISCOVERY))
    assert doc == idp.jwks
    assert idp.hits == {"/.well-known/openid-configuration": 1, "/jwks.json": 1}


async def test_discovery_issuer_must_match_exactly(idp: FakeIdp) -> None:
    idp.discovery_issuer = idp.issuer + "/"
    with pytest.raises(JwksUnavailable, match="issuer"):
        await fetch_jwks(idp.provider(JwksSourceKind.DISCOVERY))
    assert idp.jwks_fetches == 0
    manager = JwksManager([idp.provider(JwksSourceKind.DISCOVERY)], clock=Clock())
    with pytest.raises(ProviderUnavailable, match="issuer"):
        await manager.keys("idp")


async def test_fetch_from_file(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [ec_jwk(KEY_A, "a")]}))
    prov = ProviderConfig(name="f", issuer="https://idp.example", audience="l4proxy",
                          jwks_source=JwksSourceKind.FILE, jwks_location=str(path), allow_any_subject=True)
    doc, max_age = await fetch_jwks(prov)
    assert doc["keys"][0]["kid"] == "a" and max_age == prov.jwks_min_cache
    with pytest.raises(JwksUnavailable):
        await fetch_jwks(replace(prov, jwks_location=str(tmp_path / "missing.json")))
    path.write_bytes(b"x" * (MAX_JWKS_BYTES + 1))
    with pytest.raises(JwksUnavailable, match="larger than"):
        await fetch_jwks(prov)


async def test_http_errors_never_quote_the_body(idp: FakeIdp) -> None:
    idp.status = 500
    with pytest.raises(JwksUnavailable) as info:
        await fetch_jwks(idp.provider())
    assert "HTTP 500" in info.value.reason and "secret-internal-detail" not in info.value.reason


async def test_oversized_and_malformed_responses(idp: FakeIdp) -> None:
    idp.raw_body = b"{" + b" " * MAX_JWKS_BYTES + b"}"
    with pytest.raises(JwksUnavailable, match="larger than"):
        await fetch_jwks(idp.provider())
    idp.raw_body = b"<html>hello</html>"
    with pytest.raises(JwksUnavailable, match="not valid JSON") as info:
        await fetch_jwks(idp.provider())
    assert "hello" not in info.value.reason


# --- the manager ---------------------------------------------------------------------------


@pytest.mark.parametrize("source", [JwksSourceKind.URL, JwksSourceKind.DISCOVERY])
async def test_manager_verifies_with_fetched_keys(idp: FakeIdp, source: JwksSourceKind) -> None:
    prov = idp.provider(source)
    manager = JwksManager([prov], clock=Clock())
    verified = await manager.verify(token(KEY_A, "a", idp.issuer), prov)
    assert verified.identity.name == "idp/alice"
    assert manager.readiness() == {"idp": True}
    await manager.verify(token(KEY_A, "a", idp.issuer, now=T0 - 1), prov)
    assert idp.jwks_fetches == 1  # cached


async def test_manager_with_a_jwks_file(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [ec_jwk(KEY_A, "a")]}))
    prov = ProviderConfig(name="f", issuer="https://idp.example", audience="l4proxy",
                          jwks_source=JwksSourceKind.FILE, jwks_location=str(path), allow_any_subject=True)
    clock = Clock()
    manager = JwksManager([prov], clock=clock)
    assert (await manager.verify(token(KEY_A, "a", prov.issuer), prov)).identity.subject == "alice"
    path.write_text(json.dumps({"keys": [ec_jwk(KEY_A, "a"), ec_jwk(KEY_B, "b")]}))
    clock.now += prov.jwks_refetch_interval
    assert await manager.verify(token(KEY_B, "b", prov.issuer, now=clock.now), prov)  # rotated in the file


async def test_rotated_key_works_at_once(idp: FakeIdp) -> None:
    prov = idp.provider()
    clock = Clock()
    manager = JwksManager([prov], clock=clock)
    await manager.verify(token(KEY_A, "a", idp.issuer), prov)
    idp.jwks = {"keys": [ec_jwk(KEY_A, "a"), ec_jwk(KEY_B, "b")]}
    clock.now += prov.jwks_refetch_interval
    # the cache is still fresh (max-age 60 s), but the unknown kid triggers one refetch
    assert await manager.verify(token(KEY_B, "b", idp.issuer, now=clock.now), prov)
    assert idp.jwks_fetches == 2


async def test_removed_key_stops_working_after_refetch(idp: FakeIdp) -> None:
    clock = Clock()
    prov = idp.provider()
    manager = JwksManager([prov], clock=clock)
    await manager.verify(token(KEY_A, "a", idp.issuer), prov)
    idp.jwks = {"keys": [ec_jwk(KEY_B, "b")]}
    clock.now += 61  # past max-age: the next use refetches
    with pytest.raises(UnknownKeyId):
        await manager.verify(token(KEY_A, "a", idp.issuer, now=clock.now), prov)
    assert idp.jwks_fetches == 2
    assert await manager.verify(token(KEY_B, "b", idp.issuer, now=clock.now), prov)


async def test_unknown_kid_refetch_is_rate_limited(idp: FakeIdp) -> None:
    clock = Clock()
    prov = idp.provider()
    manager = JwksManager([prov], clock=clock)
    await manager.keys("idp")
    assert idp.jwks_fetches == 1
    with pytest.raises(UnknownKeyId):  # the last fetch was just now: no refetch
        await manager.verify(token(KEY_C, "nope-0", idp.issuer), prov)
    assert idp.jwks_fetches == 1
    clock.now += 10
    for i in range(5):
        with pytest.raises(UnknownKeyId):
            await manager.verify(token(KEY_C, f"nope-{i}", idp.issuer, now=clock.now), prov)
    assert idp.jwks_fetches == 2  # one refetch for five unknown kids
    clock.now += 9
    with pytest.raises(TokenRejected):
        await manager.verify(token(KEY_C, "nope-9", idp.issuer, now=clock.now), prov)
    assert idp.jwks_fetches == 2
    clock.now += 1
    with pytest.raises(TokenRejected):
        await manager.verify(token(KEY_C, "nope-10", idp.issuer, now=clock.now), prov)
    assert idp.jwks_fetches == 3


async def test_concurrent_callers_share_one_fetch(idp: FakeIdp) -> None:
    prov = idp.provider()
    manager = JwksManager([prov], clock=Clock())
    results: list[str] = []

    async def one() -> None:
        results.append((await manager.verify(token(KEY_A, "a", idp.issuer), prov)).identity.name)

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(one)
    assert results == ["idp/alice"] * 10
    assert idp.jwks_fetches == 1


async def test_provider_down_serves_last_good_keys_within_staleness(idp: FakeIdp) -> None:
    clock = Clock()
    prov = idp.provider(jwks_max_staleness=600.0)
    manager = JwksManager([prov], clock=clock)
    await manager.keys("idp")
    idp.status = 503
    clock.now = T0 + 61  # expired; the refetch fails; stale keys serve
    assert await manager.verify(token(KEY_A, "a", idp.issuer, now=clock.now), prov)
    assert idp.jwks_fetches == 2
    assert "HTTP 503" in (manager.cache("idp").last_error or "")
    clock.now = T0 + 60 + 600  # the last moment of staleness (no refetch in between: rate-limited)
    assert await manager.keys("idp")
    assert manager.readiness() == {"idp": True}
    clock.now = T0 + 60 + 601
    with pytest.raises(ProviderUnavailable, match="HTTP 503"):
        await manager.verify(token(KEY_A, "a", idp.issuer, now=clock.now), prov)
    assert manager.readiness() == {"idp": False}
    idp.status = 200  # back: the next attempt (rate limit permitting) recovers
    clock.now += 10
    assert await manager.verify(token(KEY_A, "a", idp.issuer, now=clock.now), prov)
    assert manager.readiness() == {"idp": True}


async def test_provider_never_reached(connections: list[str]) -> None:
    with socket.socket() as s:  # a loopback port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    prov = ProviderConfig(name="gone", issuer=f"http://127.0.0.1:{port}", audience="a",
                          jwks_source=JwksSourceKind.DISCOVERY, allow_any_subject=True)
    clock = Clock()
    manager = JwksManager([prov], clock=clock)
    assert manager.readiness() == {"gone": False}
    with pytest.raises(ProviderUnavailable):
        await manager.keys("gone")
    with pytest.raises(ProviderUnavailable):  # within the refetch interval: no second attempt
        await manager.verify(token(KEY_A, "a", prov.issuer), prov)
    assert connections == ["127.0.0.1"]
    await manager.warm_up()  # logs, does not raise


async def test_unknown_provider_name() -> None:
    manager = JwksManager([PROVIDER])
    with pytest.raises(KeyError):
        await manager.keys("nope")
    with pytest.raises(ValueError, match="duplicate"):
        JwksManager([PROVIDER, PROVIDER])


async def test_a_hanging_provider_times_out_without_blocking_the_event_loop(idp: FakeIdp) -> None:
    idp.hang_until = trio.Event()  # never set: the fixture's nursery cancels it at the end
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        with pytest.raises(JwksUnavailable, match="no answer within"):
            await fetch_jwks(idp.provider(fetch_timeout=0.2))
        nursery.cancel_scope.cancel()
    assert ticks >= 5  # the loop kept running while the fetch waited in its thread
