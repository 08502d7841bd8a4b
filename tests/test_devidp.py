"""The development identity provider: key management, documents, and serving on loopback."""

from __future__ import annotations

import json
import logging
import stat
import urllib.error
import urllib.request
from functools import partial
from pathlib import Path

import jwt
import pytest
import trio

from l4proxy.config._model import JwksSourceKind, ProviderConfig
from l4proxy.devidp import DevIdp, DevIdpError, read_issuer, serve_dev_idp
from l4proxy.identity._jwks import JwkSet, JwksManager
from l4proxy.identity._oidc import TokenRejected, verify_id_token

NOW = 1_700_000_000.0


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            headers = {k.lower(): ", ".join(response.headers.get_all(k)) for k in response.headers}
            return response.status, headers, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, {}, exc.read()


def provider(issuer: str, **changes: object) -> ProviderConfig:
    fields: dict[str, object] = {"name": "dev", "issuer": issuer, "audience": "l4proxy",
                                 "jwks_source": JwksSourceKind.DISCOVERY, "groups_claim": "groups",
                                 "allowed_groups": ("eng",), **changes}
    return ProviderConfig(**fields)  # type: ignore[arg-type]


def test_key_file_is_private_and_reused(tmp_path: Path) -> None:
    first = DevIdp(tmp_path / "dev-idp")
    key_file = tmp_path / "dev-idp" / "signing.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    second = DevIdp(tmp_path / "dev-idp")
    assert second.kid == first.kid and second.jwks() == first.jwks()
    # a token from one instance verifies with the other's JWKS
    token = first.mint_token(issuer="http://127.0.0.1:1", sub="alice", groups=["eng"], now=NOW)
    keys = JwkSet.from_json(second.jwks())
    assert verify_id_token(token, provider("http://127.0.0.1:1"), keys, now=NOW).identity.name == "dev/alice"
    assert list(tmp_path.joinpath("dev-idp").iterdir()) == [key_file]  # no temp files left


def test_a_group_readable_key_is_refused(tmp_path: Path) -> None:
    DevIdp(tmp_path)
    (tmp_path / "signing.key").chmod(0o640)
    with pytest.raises(DevIdpError, match="chmod 600"):
        DevIdp(tmp_path)


def test_a_key_that_is_not_p256_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "signing.key"
    path.write_text("not a key")
    path.chmod(0o600)
    with pytest.raises(DevIdpError, match="PEM private key"):
        DevIdp(tmp_path)


def test_minted_token_claims(tmp_path: Path) -> None:
    idp = DevIdp(tmp_path)
    token = idp.mint_token(issuer="http://127.0.0.1:9", sub="alice", email="alice@example.com",
                           groups=("eng", "approvers"), ttl=120, now=NOW,
                           extra_claims={"repository": "acme/app"})
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "ES256", "kid": idp.kid, "typ": "JWT"}
    claims = jwt.decode(token, options={"verify_signature": False})
    jti = claims.pop("jti")
    assert isinstance(jti, str) and len(jti) >= 16
    assert claims == {"iss": "http://127.0.0.1:9", "sub": "alice", "aud": "l4proxy", "iat": NOW,
                      "nbf": NOW, "exp": NOW + 120, "email": "alice@example.com",
                      "email_verified": True, "groups": ["eng", "approvers"], "repository": "acme/app"}
    other = idp.mint_token(issuer="http://127.0.0.1:9", sub="alice", now=NOW)
    assert jwt.decode(other, options={"verify_signature": False})["jti"] != jti  # fresh each time


def test_documents(tmp_path: Path) -> None:
    idp = DevIdp(tmp_path)
    (key,) = idp.jwks()["keys"]
    assert set(key) == {"kty", "crv", "x", "y", "kid", "use", "alg"}  # no private member
    assert (key["kty"], key["crv"], key["alg"], key["use"]) == ("EC", "P-256", "ES256", "sig")
    doc = idp.discovery("http://127.0.0.1:5")
    assert doc["issuer"] == "http://127.0.0.1:5" and doc["jwks_uri"] == "http://127.0.0.1:5/jwks.json"
    assert doc["id_token_signing_alg_values_supported"] == ["ES256"]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "example.com"])
async def test_refuses_non_loopback_hosts(tmp_path: Path, host: str) -> None:
    with pytest.raises(ValueError, match="loopback only"):
        await serve_dev_idp(tmp_path, host, 0)
    assert not (tmp_path / "issuer").exists()


async def test_serves_discovery_and_jwks(tmp_path: Path, nursery: trio.Nursery,
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="l4proxy.devidp")
    host, port = await nursery.start(serve_dev_idp, tmp_path, "127.0.0.1", 0)
    issuer = f"http://127.0.0.1:{port}"
    assert (host, read_issuer(tmp_path)) == ("127.0.0.1", issuer)
    assert any("DEVELOPMENT identity provider" in r.getMessage() for r in caplog.records)

    status, _, body = await trio.to_thread.run_sync(get, issuer + "/.well-known/openid-configuration")
    assert status == 200 and json.loads(body) == DevIdp(tmp_path).discovery(issuer)
    status, headers, body = await trio.to_thread.run_sync(get, issuer + "/jwks.json")
    assert status == 200 and json.loads(body) == DevIdp(tmp_path).jwks()
    assert "max-age=60" in headers["cache-control"]
    status, _, body = await trio.to_thread.run_sync(get, issuer + "/token")
    assert status == 404 and "error" in json.loads(body)


async def test_minted_token_verifies_end_to_end(tmp_path: Path, nursery: trio.Nursery) -> None:
    await nursery.start(partial(serve_dev_idp, tmp_path / "dev-idp", "127.0.0.1", 0))
    issuer = read_issuer(tmp_path / "dev-idp")
    prov = provider(issuer)
    manager = JwksManager([prov], clock=lambda: NOW)
    idp = DevIdp(tmp_path / "dev-idp")
    token = idp.mint_token(issuer=issuer, sub="alice", email="alice@example.com",
                           groups=["eng", "approvers"], now=NOW)
    verified = await manager.verify(token, prov)
    assert verified.identity.name == "dev/alice"
    assert verified.identity.email == "alice@example.com"
    assert verified.identity.groups == ("approvers", "eng")
    assert verified.replay_key.startswith("jti:")
    # and the dev IdP's tokens get no special treatment: a wrong audience is still refused
    with pytest.raises(TokenRejected):
        await manager.verify(idp.mint_token(issuer=issuer, sub="alice", aud="other", groups=["eng"],
                                            now=NOW), prov)
    assert manager.readiness() == {"dev": True}


def test_read_issuer_without_a_running_idp(tmp_path: Path) -> None:
    with pytest.raises(DevIdpError, match="dev-idp serve"):
        read_issuer(tmp_path)
