"""ID token verification (pure): every rejection case, one test each, and what is accepted."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import replace
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from l4proxy.config._model import ClaimMapping, JwksSourceKind, ProviderConfig
from l4proxy.identity._jwks import JwkSet
from l4proxy.identity._oidc import NotPermitted, TokenRejected, UnknownKeyId, verify_id_token

NOW = 1_700_000_000.0
ISSUER = "https://idp.example.com"

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
ATTACKER_KEY = ec.generate_private_key(ec.SECP256R1())


def _jwk(key: Any, kid: str, **extra: Any) -> dict[str, Any]:
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        d = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        d = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        d = OKPAlgorithm.to_jwk(public, as_dict=True)
    return {**d, "kid": kid, **extra}


KEYS = JwkSet.from_json({"keys": [_jwk(RSA_KEY, "rsa1"), _jwk(EC_KEY, "ec1"), _jwk(ED_KEY, "ed1")]})
PRIVATE: dict[str, Any] = {"rsa1": RSA_KEY, "ec1": EC_KEY, "ed1": ED_KEY}
ALG_FOR = {"rsa1": "RS256", "ec1": "ES256", "ed1": "EdDSA"}


def provider(**changes: Any) -> ProviderConfig:
    base = ProviderConfig(name="corp", issuer=ISSUER, audience="l4proxy",
                          jwks_source=JwksSourceKind.URL, jwks_location=ISSUER + "/jwks",
                          allow_any_subject=True)
    return replace(base, **changes)


def claims(**changes: Any) -> dict[str, Any]:
    c: dict[str, Any] = {"iss": ISSUER, "aud": "l4proxy", "sub": "alice", "iat": NOW - 10,
                         "nbf": NOW - 10, "exp": NOW + 300, "jti": "jti-1"}
    for name, value in changes.items():
        if value is _DROP:
            c.pop(name, None)
        else:
            c[name] = value
    return c


_DROP = object()


def sign(payload: dict[str, Any], *, kid: str = "rsa1", alg: str | None = None,
         key: Any = None, headers: dict[str, Any] | None = None) -> str:
    return jwt.encode(payload, key if key is not None else PRIVATE[kid],
                      algorithm=alg or ALG_FOR[kid], headers={"kid": kid, **(headers or {})})


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign_raw(payload: bytes, *, header: dict[str, Any] | None = None) -> str:
    """Sign arbitrary payload bytes with the ``ec1`` key (things jwt.encode will not build)."""
    head = b64(json.dumps(header or {"alg": "ES256", "kid": "ec1", "typ": "JWT"}).encode())
    signing_input = f"{head}.{b64(payload)}".encode()
    signature = ECAlgorithm(ECAlgorithm.SHA256).sign(signing_input, EC_KEY)
    return f"{signing_input.decode()}.{b64(signature)}"


def raw_token(header: dict[str, Any], payload: dict[str, Any] | bytes, signature: bytes = b"") -> str:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return f"{b64(json.dumps(header).encode())}.{b64(body)}.{b64(signature)}"


def rejected(token: str, prov: ProviderConfig | None = None, *, now: float = NOW,
             keys: JwkSet = KEYS) -> str:
    with pytest.raises(TokenRejected) as info:
        verify_id_token(token, prov or provider(), keys, now=now)
    exc = info.value
    # the client only ever sees a generic message; the reason never holds the token.
    # A genuine token whose holder may not enroll says so (NotPermitted), nothing more.
    expected = "not permitted to enroll" if isinstance(exc, NotPermitted) else "invalid token"
    assert str(exc) == exc.public_message == expected
    assert not token or (token not in exc.reason and token not in repr(exc))
    return exc.reason


# --- accepted ------------------------------------------------------------------------------


@pytest.mark.parametrize("kid,alg", [("rsa1", "RS256"), ("rsa1", "PS256"), ("ec1", "ES256"),
                                     ("ed1", "EdDSA")])
def test_every_allowed_algorithm_with_its_key(kid: str, alg: str) -> None:
    verified = verify_id_token(sign(claims(), kid=kid, alg=alg), provider(), KEYS, now=NOW)
    assert verified.identity.name == "corp/alice"
    assert verified.expires_at == NOW + 300 and verified.issued_at == NOW - 10


def test_identity_comes_from_the_verified_claims_only() -> None:
    # header parameters that look like identity are ignored; the provider name is ours
    token = sign(claims(sub="alice", email="alice@example.com", email_verified=True,
                        groups=["eng"]),
                 headers={"sub": "root", "email": "root@evil.example", "provider": "admin"})
    identity = verify_id_token(token, provider(groups_claim="groups"), KEYS, now=NOW).identity
    assert (identity.provider, identity.subject, identity.email, identity.groups) == \
        ("corp", "alice", "alice@example.com", ("eng",))


def test_two_providers_with_the_same_sub_give_different_identities() -> None:
    other = provider(name="ci", issuer="https://ci.example.com")
    a = verify_id_token(sign(claims()), provider(), KEYS, now=NOW).identity
    b = verify_id_token(sign(claims(iss="https://ci.example.com")), other, KEYS, now=NOW).identity
    assert a.subject == b.subject == "alice"
    assert a.name == "corp/alice" and b.name == "ci/alice" and a != b


def test_replay_key_is_the_jti_when_present() -> None:
    assert verify_id_token(sign(claims(jti="abc")), provider(), KEYS,
                           now=NOW).replay_key == f"jti:{ISSUER}#abc"


def test_a_token_without_jti_is_accepted_with_a_sha256_replay_key() -> None:
    token = sign(claims(jti=_DROP))
    verified = verify_id_token(token, provider(), KEYS, now=NOW)
    assert verified.replay_key == "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def test_leeway_accepts_small_clock_skew() -> None:
    token = sign(claims(iat=NOW + 20, nbf=NOW + 20, exp=NOW + 300))
    assert verify_id_token(token, provider(leeway=30), KEYS, now=NOW).issued_at == NOW + 20
    assert verify_id_token(sign(claims(iat=NOW - 100, exp=NOW - 20)), provider(leeway=30), KEYS, now=NOW)


def test_several_audiences_accepted_when_azp_is_ours() -> None:
    token = sign(claims(aud=["l4proxy", "other"], azp="l4proxy"))
    assert verify_id_token(token, provider(), KEYS, now=NOW).identity.subject == "alice"


def test_aud_list_with_only_ours_needs_no_azp() -> None:
    assert verify_id_token(sign(claims(aud=["l4proxy"])), provider(), KEYS, now=NOW)


def test_unverified_email_is_not_used_when_not_required() -> None:
    token = sign(claims(email="alice@example.com", email_verified=False))
    assert verify_id_token(token, provider(), KEYS, now=NOW).identity.email is None
    token = sign(claims(email="alice@example.com"))
    assert verify_id_token(token, provider(), KEYS, now=NOW).identity.email is None


def test_verified_email_in_an_allowed_domain() -> None:
    token = sign(claims(email="alice@Example.COM", email_verified=True))
    prov = provider(allow_any_subject=False, allowed_email_domains=("example.com",))
    assert verify_id_token(token, prov, KEYS, now=NOW).identity.email == "alice@Example.COM"


def test_claim_mappings_add_groups_sorted_and_deduplicated() -> None:
    prov = provider(groups_claim="groups", claim_mappings=(
        ClaimMapping(claim="repository", value="acme/app", groups=("deployers", "eng")),
        ClaimMapping(claim="repository", value="acme/other", groups=("nope",)),
        ClaimMapping(claim="environment", value="prod", groups=("prod",)),
    ))
    token = sign(claims(groups=["eng", "zeta"], repository="acme/app", environment=["prod"]))
    # a mapping matches an equal string only (not a list containing it)
    assert verify_id_token(token, prov, KEYS, now=NOW).identity.groups == ("deployers", "eng", "zeta")


def test_claim_mapping_satisfies_allowed_groups() -> None:
    prov = provider(allow_any_subject=False, allowed_groups=("deployers",), claim_mappings=(
        ClaimMapping(claim="repository", value="acme/app", groups=("deployers",)),))
    assert verify_id_token(sign(claims(repository="acme/app")), prov, KEYS, now=NOW)
    assert "none of the token's groups" in rejected(sign(claims(repository="acme/lib")), prov)


def test_groups_claim_may_be_a_single_string() -> None:
    token = sign(claims(roles="admin"))
    assert verify_id_token(token, provider(groups_claim="roles"), KEYS, now=NOW).identity.groups == ("admin",)


# --- CI-shaped tokens and bound claims -----------------------------------------------------


def ci_provider() -> ProviderConfig:
    return provider(name="github", issuer="https://token.actions.githubusercontent.com",
                    audience="https://gateway.acme.example", subject_claim="repository",
                    allow_any_subject=False,
                    bound_claims=(("repository_owner", ("acme",)),
                                  ("ref", ("refs/heads/main", "refs/tags/v*"))))


def ci_claims(**changes: Any) -> dict[str, Any]:
    base = {"iss": "https://token.actions.githubusercontent.com",
            "aud": "https://gateway.acme.example",
            "sub": "repo:acme/app:ref:refs/heads/main", "repository": "acme/app",
            "repository_owner": "acme", "ref": "refs/heads/main", "workflow": "deploy",
            "iat": NOW - 5, "nbf": NOW - 5, "exp": NOW + 300, "jti": "run-1"}
    return {**base, **changes}


def test_ci_token_from_our_organisation_is_accepted() -> None:
    verified = verify_id_token(sign(ci_claims(ref="refs/tags/v1.2")), ci_provider(), KEYS, now=NOW)
    assert verified.identity.name == "github/acme/app"


def test_ci_token_from_another_organisation_is_refused_by_bound_claims() -> None:
    token = sign(ci_claims(repository="evil/app", repository_owner="evil"))
    assert rejected(token, ci_provider()) == "bound claim repository_owner='evil' not allowed"


def test_ci_token_glob_does_not_match_other_refs() -> None:
    assert "bound claim ref=" in rejected(sign(ci_claims(ref="refs/heads/feature")), ci_provider())


def test_ci_token_missing_a_bound_claim() -> None:
    c = ci_claims()
    del c["repository_owner"]
    assert rejected(sign(c), ci_provider()) == "bound claim 'repository_owner' missing"


def test_bound_claim_must_be_a_string() -> None:
    assert "is not a string" in rejected(sign(ci_claims(repository_owner=["acme"])), ci_provider())


# --- rejections: header and signature ------------------------------------------------------


def test_alg_none() -> None:
    token = raw_token({"alg": "none", "kid": "rsa1", "typ": "JWT"}, claims())
    assert rejected(token) == "alg none not allowed"


@pytest.mark.parametrize("algorithms", [("RS256", "PS256", "ES256", "EdDSA"), ("HS256", "RS256")])
def test_hs256_signed_with_the_rsa_public_key_as_secret(algorithms: tuple[str, ...]) -> None:
    # the classic confusion: the attacker HMACs with the public key PEM, hoping the
    # verifier passes its "key" to HMAC; even a provider misconfigured to list HS256 refuses
    pem = RSA_KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    header = b64(json.dumps({"alg": "HS256", "kid": "rsa1", "typ": "JWT"}).encode())
    payload = b64(json.dumps(claims(sub="admin")).encode())
    mac = hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    token = f"{header}.{payload}.{b64(mac)}"
    assert rejected(token, provider(algorithms=algorithms)) == "alg HS256 not allowed"


def test_alg_outside_the_providers_list() -> None:
    assert rejected(sign(claims(), kid="ec1"), provider(algorithms=("RS256",))) == "alg ES256 not allowed"


def test_unknown_kid() -> None:
    token = sign(claims(), key=ATTACKER_KEY, alg="ES256", kid="rotated-2")
    with pytest.raises(UnknownKeyId) as info:
        verify_id_token(token, provider(), KEYS, now=NOW)
    assert info.value.kid == "rotated-2"
    assert str(info.value) == "invalid token"


def test_missing_kid() -> None:
    token = jwt.encode(claims(), RSA_KEY, algorithm="RS256")
    assert rejected(token) == "header has no kid"


@pytest.mark.parametrize("param", ["jwk", "jku", "x5u", "x5c", "crit"])
def test_key_carrying_header_parameters(param: str) -> None:
    values: dict[str, Any] = {
        "jwk": _jwk(ATTACKER_KEY, "rsa1"),
        "jku": "https://evil.example/jwks.json",
        "x5u": "https://evil.example/cert.pem",
        "x5c": ["MIIB..."],
        "crit": ["exp"],
    }
    # signed with the genuine key even: the parameter alone is enough to refuse
    token = sign(claims(), headers={param: values[param]})
    reason = rejected(token)
    if param == "crit":  # pyjwt's header reader already refuses an unknown critical extension
        assert reason in ("header parameter 'crit' not allowed", "malformed token header (InvalidTokenError)")
    else:
        assert reason == f"header parameter {param!r} not allowed"


def test_jwk_header_with_the_attackers_own_key() -> None:
    token = sign(claims(sub="admin"), key=ATTACKER_KEY, alg="ES256", kid="ec1",
                 headers={"jwk": _jwk(ATTACKER_KEY, "ec1")})
    assert rejected(token) == "header parameter 'jwk' not allowed"


def test_typ_other_than_jwt() -> None:
    assert "is not JWT" in rejected(sign(claims(), headers={"typ": "at+jwt"}))


def test_es256_token_refused_by_an_rsa_key_with_the_same_kid() -> None:
    token = sign(claims(), key=EC_KEY, alg="ES256", kid="rsa1")
    assert rejected(token).startswith("alg ES256 does not fit key 'rsa1' (RSA")


def test_jwk_declared_alg_binds_the_key() -> None:
    keys = JwkSet.from_json({"keys": [_jwk(RSA_KEY, "rsa1", alg="RS256")]})
    assert "does not fit key" in rejected(sign(claims(), alg="PS256"), keys=keys)
    assert verify_id_token(sign(claims(), alg="RS256"), provider(), keys, now=NOW)


def test_bad_signature() -> None:
    token = sign(claims())
    header, _, sig = token.split(".")
    forged = f"{header}.{b64(json.dumps(claims(sub='admin')).encode())}.{sig}"
    assert rejected(forged) == "bad signature"


def test_signed_by_another_key_under_our_kid() -> None:
    assert rejected(sign(claims(), key=ATTACKER_KEY, alg="ES256", kid="ec1")) == "bad signature"


def test_garbage_token() -> None:
    assert rejected("not.a.jwt").startswith("malformed token header")
    assert rejected("").startswith("malformed token header")


def test_oversized_token() -> None:
    token = sign(claims(padding="x" * 20_000))
    assert rejected(token, provider(max_token_bytes=16 << 10)).endswith("more than 16384")


def test_oversized_token_is_refused_before_parsing() -> None:
    assert "more than 100" in rejected("x" * 101, provider(max_token_bytes=100))


def test_duplicate_claim_names() -> None:
    # a payload with "sub" twice: parsers disagree on which one wins, so neither does
    body = json.dumps(claims())[:-1] + ', "sub": "admin"}'
    assert "duplicate claim 'sub'" in rejected(sign_raw(body.encode()))
    assert verify_id_token(sign_raw(json.dumps(claims()).encode()), provider(), KEYS, now=NOW)


def test_non_json_numbers_in_claims() -> None:
    body = json.dumps(claims(exp=_DROP))[:-1] + ', "exp": Infinity}'
    assert "malformed claims" in rejected(sign_raw(body.encode()))


# --- rejections: claims --------------------------------------------------------------------


def test_expired() -> None:
    reason = rejected(sign(claims(iat=NOW - 400, exp=NOW - 31)), provider(leeway=30))
    assert reason.startswith("token expired")


def test_not_yet_valid() -> None:
    assert rejected(sign(claims(nbf=NOW + 31)), provider(leeway=30)).startswith("token not valid before")


def test_iat_in_the_future() -> None:
    assert "is in the future" in rejected(sign(claims(iat=NOW + 31, nbf=_DROP)), provider(leeway=30))


def test_too_old() -> None:
    reason = rejected(sign(claims(iat=NOW - 3601, nbf=_DROP)), provider(max_token_age=3600))
    assert reason == "token is 3601s old, more than 3600s"


def test_lifetime_too_long() -> None:
    token = sign(claims(iat=NOW - 10, exp=NOW + 2 * 86400))
    assert "lifetime" in rejected(token, provider(max_token_lifetime=86400))


def test_exp_not_after_iat() -> None:
    assert "is not after iat" in rejected(sign(claims(iat=NOW, exp=NOW)))


@pytest.mark.parametrize("exp,reason", [(_DROP, "token has no exp"),
                                        (str(int(NOW + 300)), "exp is not a number"),
                                        (True, "exp is not a number"),
                                        (None, "exp is not a number")])
def test_exp_missing_or_mistyped(exp: Any, reason: str) -> None:
    assert rejected(sign(claims(exp=exp))).startswith(reason)


@pytest.mark.parametrize("iat,reason", [(_DROP, "token has no iat"), ("1700000000", "iat is not a number"),
                                        (False, "iat is not a number")])
def test_iat_missing_or_mistyped(iat: Any, reason: str) -> None:
    assert rejected(sign(claims(iat=iat))).startswith(reason)


def test_nbf_mistyped() -> None:
    assert rejected(sign(claims(nbf="0"))).startswith("nbf is not a number")


@pytest.mark.parametrize("iss", ["https://evil.example.com", ISSUER + "/", ISSUER.upper(), _DROP, [ISSUER]])
def test_wrong_issuer(iss: Any) -> None:
    assert "iss" in rejected(sign_raw(json.dumps(claims(iss=iss)).encode()))


@pytest.mark.parametrize("aud", ["someone-else", ["someone-else"], "L4PROXY", [], _DROP, 7])
def test_wrong_audience(aud: Any) -> None:
    assert "aud" in rejected(sign(claims(aud=aud)))


def test_extra_audiences_without_azp() -> None:
    reason = rejected(sign(claims(aud=["l4proxy", "other"])))
    assert reason.startswith("aud has several values and azp is not ours")


def test_extra_audiences_with_a_wrong_azp() -> None:
    reason = rejected(sign(claims(aud=["l4proxy", "other"], azp="other")))
    assert reason.startswith("aud has several values and azp is not ours")


@pytest.mark.parametrize("sub,reason", [(_DROP, "token has no subject claim 'sub'"),
                                        ("", "subject claim 'sub' is empty"),
                                        (42, "subject claim 'sub' is not a string"),
                                        (["alice"], "subject claim 'sub' is not a string"),
                                        ("alice\nadmin", "subject claim 'sub' contains control"),
                                        ("a" * 256, "subject claim 'sub' is longer than 255")])
def test_subject_missing_empty_or_mistyped(sub: Any, reason: str) -> None:
    assert rejected(sign(claims(sub=sub))).startswith(reason)


def test_custom_subject_claim_must_be_present() -> None:
    assert rejected(sign(claims()), provider(subject_claim="email")) == \
        "token has no subject claim 'email'"


@pytest.mark.parametrize("jti", ["", 17, None])
def test_jti_mistyped(jti: Any) -> None:
    assert rejected(sign(claims(jti=jti))).startswith("jti is not a non-empty string")


def test_unverified_email_with_allowed_email_domains() -> None:
    prov = provider(allow_any_subject=False, allowed_email_domains=("example.com",))
    assert rejected(sign(claims(email="alice@example.com", email_verified=False)), prov) == \
        "email not verified"
    assert rejected(sign(claims(email="alice@example.com")), prov) == "email not verified"


def test_email_verified_must_be_a_boolean() -> None:
    reason = rejected(sign(claims(email="alice@example.com", email_verified="true")))
    assert reason.startswith("email_verified is not a boolean")


def test_email_outside_allowed_domains() -> None:
    prov = provider(allow_any_subject=False, allowed_email_domains=("example.com",))
    for email in ("mallory@evil.example", "mallory@sub.example.com", "mallory@example.com.evil.example"):
        token = sign(claims(email=email, email_verified=True))
        assert rejected(token, prov).startswith("email domain")


def test_no_email_when_the_provider_requires_one() -> None:
    prov = provider(allow_any_subject=False, allowed_email_domains=("example.com",))
    assert "has no email" in rejected(sign(claims()), prov)


@pytest.mark.parametrize("email", [42, "no-at-sign", "@example.com", "alice@", "a lice@example.com"])
def test_malformed_email(email: Any) -> None:
    assert rejected(sign(claims(email=email, email_verified=True)))


def test_groups_not_allowed() -> None:
    prov = provider(allow_any_subject=False, groups_claim="groups", allowed_groups=("admins",))
    assert rejected(sign(claims(groups=["eng", "ops"])), prov).startswith("none of the token's groups")
    assert rejected(sign(claims()), prov).startswith("none of the token's groups")
    assert verify_id_token(sign(claims(groups=["eng", "admins"])), prov, KEYS, now=NOW)


@pytest.mark.parametrize("groups", [["eng", 7], {"eng": True}, 7])
def test_groups_claim_mistyped(groups: Any) -> None:
    assert "groups claim" in rejected(sign(claims(groups=groups)), provider(groups_claim="groups"))


def test_provider_without_any_constraint_is_refused() -> None:
    assert "declares no enrollment constraints" in rejected(sign(claims()), provider(allow_any_subject=False))


def test_claims_must_be_an_object() -> None:
    assert rejected(sign_raw(b"[1, 2]")) == "claims are not a JSON object"


# --- arbitrary input -----------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text_is_only_ever_rejected(text: str) -> None:
    with pytest.raises(TokenRejected):
        verify_id_token(text, provider(), KEYS, now=NOW)


@settings(max_examples=200, deadline=None)
@given(header=st.dictionaries(st.sampled_from(["alg", "kid", "typ", "jwk", "x5t", "zip"]), _json, max_size=4)
       | st.builds(lambda kid, alg: {"alg": alg, "kid": kid},
                   st.sampled_from(["rsa1", "ec1", "ed1", "x"]),
                   st.sampled_from(["RS256", "PS256", "ES256", "EdDSA", "none", "HS256"])),
       payload=st.dictionaries(st.sampled_from(["iss", "aud", "sub", "exp", "iat", "nbf", "azp", "jti",
                                                "email", "email_verified"]), _json) | _json,
       signature=st.binary(max_size=300))
def test_arbitrary_structured_tokens_are_only_ever_rejected(header: Any, payload: Any,
                                                            signature: bytes) -> None:
    token = raw_token(header, json.dumps(payload).encode(), signature)
    with pytest.raises(TokenRejected):
        verify_id_token(token, provider(), KEYS, now=NOW)


@settings(max_examples=150, deadline=None)
@given(payload=st.fixed_dictionaries({}, optional={
    "iss": st.just(ISSUER) | _json, "aud": st.just("l4proxy") | _json, "sub": st.just("alice") | _json,
    "exp": st.just(NOW + 300) | _json, "iat": st.just(NOW - 10) | _json, "nbf": _json, "jti": _json,
    "azp": _json, "email": _json, "email_verified": _json, "groups": _json}))
def test_validly_signed_arbitrary_claims_verify_or_are_rejected(payload: dict[str, Any]) -> None:
    # signed with the real key: every claim combination either verifies or is refused cleanly
    try:
        verified = verify_id_token(sign_raw(json.dumps(payload).encode()),
                                   provider(groups_claim="groups"), KEYS, now=NOW)
    except TokenRejected:
        return
    assert verified.identity.subject == payload["sub"] and payload["iss"] == ISSUER


def test_constraint_failures_are_not_permitted_but_forgeries_are_not() -> None:
    prov = provider(allow_any_subject=False, allowed_email_domains=("example.com",))
    with pytest.raises(NotPermitted):
        verify_id_token(sign(claims(email="m@evil.example", email_verified=True)), prov, KEYS, now=NOW)
    # a token with a bad signature never gets as far as the constraints
    forged = sign(claims(email="m@evil.example", email_verified=True), kid="ec1", key=ATTACKER_KEY)
    with pytest.raises(TokenRejected) as exc:
        verify_id_token(forged, prov, KEYS, now=NOW)
    assert not isinstance(exc.value, NotPermitted)
