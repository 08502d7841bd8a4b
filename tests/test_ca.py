"""The internal CA, minting and CSR intake: real files in tmp_path, time by injected clock."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import stat
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from l4proxy.identity import _ca, _csr
from l4proxy.identity._ca import (
    L4PROXY_IDENTITY_OID,
    MAX_LEAF_LIFETIME,
    CaError,
    CaExists,
    CaFiles,
    CertificateAuthority,
    check_leaf,
    init_ca,
    leaf_identity,
    load_recording_keyring,
    read_identity_extension,
    read_recording_key_history,
    recording_key_id,
    rotate_ca,
    rotate_recording_key,
    trust_bundle,
    write_trust_bundle,
)
from l4proxy.identity._csr import MAX_CSR_BYTES, CsrRejected, load_csr
from l4proxy.identity._model import Identity

T0 = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
TD = "l4proxy.test"
ALICE = Identity(provider="dev", subject="alice", email="alice@example.com", groups=("approvers", "eng"))


# --- helpers -------------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _csr_pem(key: Any, *, subject: x509.Name | None = None,
             extensions: Sequence[tuple[x509.ExtensionType, bool]] = ()) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        subject or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "client")]))
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


def _spki_der(public_key: Any) -> bytes:
    der: bytes = public_key.public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return der


@pytest.fixture
def now() -> datetime:
    """conftest's ``ca_dir`` and ``ca``, made at a fixed time in this module's trust domain."""
    return T0


@pytest.fixture
def trust_domain() -> str:
    return TD


def _mint(ca: CertificateAuthority, identity: Identity = ALICE, *, ttl: timedelta = timedelta(minutes=10),
          now: datetime = T0 + timedelta(hours=1), key: Any = None) -> x509.Certificate:
    public_key = (key or _p256()).public_key()
    return ca.mint_client(public_key=public_key, identity=identity, replay_key="jti:abc-123", ttl=ttl,
                          now=now)


def _ca_key(ca_dir: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def _reissue(ca_dir: Path, cert: x509.Certificate, *, drop: tuple[x509.ObjectIdentifier, ...] = (),
             add: tuple[tuple[x509.ExtensionType, bool], ...] = ()) -> x509.Certificate:
    """Re-sign ``cert`` with the real CA key, with some extensions dropped or replaced."""
    replaced = {ext.oid for ext, _ in add}
    builder = (x509.CertificateBuilder().subject_name(cert.subject).issuer_name(cert.issuer)
               .public_key(cert.public_key()).serial_number(cert.serial_number)
               .not_valid_before(cert.not_valid_before_utc).not_valid_after(cert.not_valid_after_utc))
    for ext in cert.extensions:
        if ext.oid not in drop and ext.oid not in replaced:
            builder = builder.add_extension(ext.value, critical=ext.critical)
    for value, critical in add:
        builder = builder.add_extension(value, critical=critical)
    return builder.sign(_ca_key(ca_dir), hashes.SHA256())


# --- init ------------------------------------------------------------------------------------------


def test_init_writes_every_file_with_private_modes(tmp_path: Path) -> None:
    d = tmp_path / "certs"
    files = init_ca(d, trust_domain=TD, server_names=["gw.example.com", "127.0.0.1"], now=T0)
    assert files == CaFiles.at(d)
    for path in (files.ca_cert, files.ca_key, files.server_cert, files.server_key, files.recording_key,
                 files.recording_pub, files.trust_domain, files.bundle, files.rotations):
        assert path.is_file(), path
    for key in (files.ca_key, files.server_key, files.recording_key):
        assert _mode(key) == 0o600, key
    for directory in (files.dir, files.old_dir, files.recording_keys):
        assert _mode(directory) == 0o700, directory
    assert files.trust_domain.read_text() == f"{TD}\n"
    assert not [p for p in d.rglob("*") if p.name.endswith(".tmp")]
    # the bundle is the CA; the keyring has the recording key under its id
    ca_cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    assert x509.load_pem_x509_certificates(files.bundle.read_bytes()) == [ca_cert]
    pub = serialization.load_pem_public_key(files.recording_pub.read_bytes())
    assert isinstance(pub, ed25519.Ed25519PublicKey)
    key_id = hashlib.sha256(pub.public_bytes_raw()).hexdigest()
    assert recording_key_id(pub) == key_id
    assert set(load_recording_keyring(d)) == {key_id}
    assert [k for k, _ in read_recording_key_history(d)] == [key_id]
    ca = CertificateAuthority.load(d)
    assert ca.trust_domain == TD
    assert ca.recording_key_id == key_id
    assert "PRIVATE" not in repr(ca)


def test_init_refuses_to_overwrite_without_force(ca_dir: Path) -> None:
    before = {p.name: p.read_bytes() for p in ca_dir.iterdir() if p.is_file()}
    with pytest.raises(CaExists) as info:
        init_ca(ca_dir, trust_domain=TD, server_names=["localhost"], now=T0 + timedelta(days=1))
    assert set(info.value.paths) >= {ca_dir / "ca.crt", ca_dir / "ca.key", ca_dir / "recording.key"}
    assert "ca.key" in str(info.value)
    assert {p.name: p.read_bytes() for p in ca_dir.iterdir() if p.is_file()} == before
    old_pub = (ca_dir / "recording.pub").read_bytes()

    init_ca(ca_dir, trust_domain=TD, server_names=["localhost"], now=T0 + timedelta(days=1), force=True)
    assert (ca_dir / "ca.key").read_bytes() != before["ca.key"]
    assert _mode(ca_dir / "ca.key") == 0o600
    # the keyring only grows: the replaced recording key can still verify old recordings
    assert len(load_recording_keyring(ca_dir)) == 2
    assert old_pub in [p.read_bytes() for p in (ca_dir / "recording-keys").glob("*.pub")]


def test_init_refuses_when_any_single_file_exists(tmp_path: Path) -> None:
    d = tmp_path / "certs"
    d.mkdir()
    (d / "trust_domain").write_text("x\n")
    with pytest.raises(CaExists) as info:
        init_ca(d, trust_domain=TD, now=T0)
    assert info.value.paths == (d / "trust_domain",)
    assert sorted(p.name for p in d.iterdir()) == ["trust_domain"]


@pytest.mark.parametrize("bad", [{"trust_domain": "Upper.Case"}, {"trust_domain": ""},
                                 {"trust_domain": "a/b"}, {"server_names": []},
                                 {"server_names": ["bad name"]}, {"server_names": "localhost"},
                                 {"server_names": ["b\u00fccher.de"]}, {"now": datetime(2030, 1, 1)}])
def test_init_validates_before_writing(tmp_path: Path, bad: dict[str, Any]) -> None:
    args: dict[str, Any] = {"trust_domain": TD, "server_names": ["localhost"], "now": T0} | bad
    with pytest.raises(ValueError):
        init_ca(tmp_path / "certs", **args)
    assert not (tmp_path / "certs").exists()


def test_ca_certificate(ca: CertificateAuthority) -> None:
    cert = ca.certificate
    exts = cert.extensions
    assert {e.oid for e in exts} == {ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE,
                                     ExtensionOID.SUBJECT_KEY_IDENTIFIER}
    bc = exts.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = exts.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.key_cert_sign and ku.value.crl_sign
    assert not (ku.value.digital_signature or ku.value.key_encipherment or ku.value.content_commitment
                or ku.value.data_encipherment or ku.value.key_agreement)
    ski = exts.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert not ski.critical
    assert ski.value == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == f"l4proxy CA {TD}"
    assert cert.subject == cert.issuer
    cert.verify_directly_issued_by(cert)
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    assert cert.not_valid_before_utc == T0 - timedelta(seconds=60)
    assert cert.not_valid_after_utc == T0 + timedelta(days=5 * 365 + 1)


def test_server_certificate(ca_dir: Path, ca: CertificateAuthority) -> None:
    cert = x509.load_pem_x509_certificate((ca_dir / "server.crt").read_bytes())
    cert.verify_directly_issued_by(ca.certificate)
    exts = cert.extensions
    assert {e.oid for e in exts} == {ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE,
                                     ExtensionOID.EXTENDED_KEY_USAGE, ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
                                     ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
                                     ExtensionOID.SUBJECT_KEY_IDENTIFIER}
    bc = exts.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = exts.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    eku = exts.get_extension_for_class(x509.ExtendedKeyUsage)
    assert not eku.critical and list(eku.value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = exts.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    aki = exts.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    assert cert.not_valid_after_utc - T0 == timedelta(days=90)
    assert _mode(ca_dir / "server.key") == 0o600
    key = serialization.load_pem_private_key((ca_dir / "server.key").read_bytes(), password=None)
    assert _spki_der(key.public_key()) == _spki_der(cert.public_key())


def test_issue_server_renews_with_the_same_names(tmp_path: Path) -> None:
    d = tmp_path / "certs"
    init_ca(d, trust_domain=TD, server_names=["gw.internal", "::1"], now=T0)
    ca = CertificateAuthority.load(d)
    old = (d / "server.crt").read_bytes()
    with pytest.raises(CaExists):
        ca.issue_server(now=T0 + timedelta(days=80), force=False)
    cert = ca.issue_server(now=T0 + timedelta(days=80))
    assert (d / "server.crt").read_bytes() != old
    assert x509.load_pem_x509_certificate((d / "server.crt").read_bytes()) == cert
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["gw.internal"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("::1")]
    assert cert.not_valid_after_utc == T0 + timedelta(days=170)
    cert2 = ca.issue_server(server_names=["other.internal"], now=T0 + timedelta(days=81))
    assert cert2.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.DNSName) == ["other.internal"]


# --- load ------------------------------------------------------------------------------------------


def test_load_reports_missing_files(tmp_path: Path) -> None:
    with pytest.raises(CaError, match=r"missing:.*ca\.crt.*ca\.key.*trust_domain"):
        CertificateAuthority.load(tmp_path)


def test_load_refuses_a_key_readable_by_others(ca_dir: Path) -> None:
    os.chmod(ca_dir / "ca.key", 0o644)
    with pytest.raises(CaError, match="chmod 600"):
        CertificateAuthority.load(ca_dir)


def test_load_refuses_mismatched_and_corrupt_files(ca_dir: Path) -> None:
    (ca_dir / "ca.key").unlink()
    other = _p256().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    fd = os.open(ca_dir / "ca.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, other)
    os.close(fd)
    with pytest.raises(CaError, match="does not match") as info:
        CertificateAuthority.load(ca_dir)
    assert "PRIVATE KEY" not in str(info.value)
    (ca_dir / "ca.crt").write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(CaError, match="not a PEM certificate"):
        CertificateAuthority.load(ca_dir)


def _write_private(path: Path, data: bytes) -> None:
    path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, data)
    os.close(fd)


def test_load_refuses_keys_of_the_wrong_kind(ca_dir: Path) -> None:
    ed = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    good_recording = (ca_dir / "recording.key").read_bytes()
    _write_private(ca_dir / "recording.key", ed)
    with pytest.raises(CaError, match=r"recording\.key does not match"):
        CertificateAuthority.load(ca_dir)
    _write_private(ca_dir / "recording.key", (ca_dir / "ca.key").read_bytes())
    with pytest.raises(CaError, match="not an Ed25519 private key"):
        CertificateAuthority.load(ca_dir)
    _write_private(ca_dir / "recording.key", good_recording)
    CertificateAuthority.load(ca_dir)
    _write_private(ca_dir / "ca.key", ed)
    with pytest.raises(CaError, match="not an ECDSA P-256 key"):
        CertificateAuthority.load(ca_dir)
    # a leaf certificate with its own key is not a CA
    _write_private(ca_dir / "ca.key", (ca_dir / "server.key").read_bytes())
    (ca_dir / "ca.crt").write_bytes((ca_dir / "server.crt").read_bytes())
    with pytest.raises(CaError, match="not a CA certificate"):
        CertificateAuthority.load(ca_dir)


def test_load_refuses_a_garbage_private_key_without_echoing_it(ca_dir: Path) -> None:
    # a real key's PEM armour around random bytes, made at run time (no key in the repo)
    armour = _p256().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()).splitlines()
    garbage = base64.b64encode(os.urandom(24))
    (ca_dir / "ca.key").write_bytes(b"\n".join([armour[0], garbage, armour[-1], b""]))
    with pytest.raises(CaError) as info:
        CertificateAuthority.load(ca_dir)
    assert garbage.decode() not in str(info.value)


# --- minting ---------------------------------------------------------------------------------------


def test_client_certificate_extension_by_extension(ca: CertificateAuthority) -> None:
    now = T0 + timedelta(hours=1)
    key = _p256()
    cert = _mint(ca, key=key, now=now)
    cert.verify_directly_issued_by(ca.certificate)
    exts = cert.extensions
    assert {e.oid for e in exts} == {ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE,
                                     ExtensionOID.EXTENDED_KEY_USAGE, ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
                                     ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
                                     ExtensionOID.SUBJECT_KEY_IDENTIFIER, L4PROXY_IDENTITY_OID}

    bc = exts.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical is True
    assert bc.value.ca is False and bc.value.path_length is None

    ku = exts.get_extension_for_class(x509.KeyUsage)
    assert ku.critical is True
    assert ku.value.digital_signature is True
    assert not any([ku.value.content_commitment, ku.value.key_encipherment, ku.value.data_encipherment,
                    ku.value.key_agreement, ku.value.key_cert_sign, ku.value.crl_sign])

    eku = exts.get_extension_for_class(x509.ExtendedKeyUsage)
    assert eku.critical is False
    assert list(eku.value) == [ExtendedKeyUsageOID.CLIENT_AUTH]

    san = exts.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical is False
    assert list(san.value) == [x509.UniformResourceIdentifier(f"spiffe://{TD}/p/dev/u/alice"),
                               x509.RFC822Name("alice@example.com")]

    aki = exts.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert aki.critical is False
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.value.key_identifier == ca_ski.digest

    ski = exts.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert ski.critical is False
    assert ski.value == x509.SubjectKeyIdentifier.from_public_key(key.public_key())

    ident = exts.get_extension_for_oid(L4PROXY_IDENTITY_OID)
    assert ident.critical is False
    expected = b'{"groups":["approvers","eng"],"provider":"dev","replay":"jti:abc-123","v":1}'
    assert isinstance(ident.value, x509.UnrecognizedExtension)
    assert ident.value.value == b"\x0c" + bytes([len(expected)]) + expected  # DER UTF8String
    assert read_identity_extension(cert) == {"groups": ["approvers", "eng"], "provider": "dev",
                                             "replay": "jti:abc-123", "v": 1}

    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev/alice")])
    assert cert.issuer == ca.certificate.subject
    assert cert.not_valid_before_utc == now - timedelta(seconds=60)
    assert cert.not_valid_after_utc == now + timedelta(minutes=10)
    assert _spki_der(cert.public_key()) == _spki_der(key.public_key())
    assert cert.version == x509.Version.v3
    assert check_leaf(cert, ca_bundle=[ca.certificate], trust_domain=TD, now=now) == []
    assert leaf_identity(cert, trust_domain=TD) == ALICE


def test_uri_san_percent_encodes_the_subject(ca: CertificateAuthority) -> None:
    identity = Identity(provider="github", subject="repo:acme/app:ref:refs/heads/main")
    cert = _mint(ca, identity)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(
        "spiffe://l4proxy.test/p/github/u/repo%3Aacme%2Fapp%3Aref%3Arefs%2Fheads%2Fmain")]
    assert san.get_values_for_type(x509.RFC822Name) == []  # no email: no email SAN
    assert leaf_identity(cert, trust_domain=TD) == identity
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "github/repo:acme/app:ref:refs/heads/main"


def test_common_name_is_truncated_to_64_characters(ca: CertificateAuthority) -> None:
    identity = Identity(provider="dev", subject="x" * 100)
    cert = _mint(ca, identity)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == ("dev/" + "x" * 100)[:64]
    assert leaf_identity(cert, trust_domain=TD) == identity  # the URI keeps the whole subject


def test_serials_are_random_and_positive(ca: CertificateAuthority) -> None:
    serials = {_mint(ca).serial_number for _ in range(8)}
    assert len(serials) == 8
    assert all(0 < s < 1 << 159 for s in serials)
    assert max(s.bit_length() for s in serials) > 140  # random, not counting up


def test_not_before_is_backdated_sixty_seconds_even_with_microseconds(ca: CertificateAuthority) -> None:
    now = T0 + timedelta(hours=1, microseconds=250_000)
    cert = _mint(ca, now=now)
    # never back-dated by more than 60 s: rounded up to the second
    assert cert.not_valid_before_utc == T0 + timedelta(hours=1, seconds=-59)
    assert cert.not_valid_after_utc == T0 + timedelta(hours=1, minutes=10)


def test_ttl_is_positive_and_hard_capped(ca: CertificateAuthority) -> None:
    for ttl in (timedelta(0), timedelta(seconds=-1), MAX_LEAF_LIFETIME + timedelta(seconds=1)):
        with pytest.raises(ValueError, match="ttl"):
            _mint(ca, ttl=ttl)
    cert = _mint(ca, ttl=MAX_LEAF_LIFETIME)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == MAX_LEAF_LIFETIME + timedelta(seconds=60)


def test_not_after_never_past_the_ca(ca: CertificateAuthority) -> None:
    ca_end = ca.certificate.not_valid_after_utc
    now = ca_end - timedelta(minutes=30)
    cert = _mint(ca, ttl=MAX_LEAF_LIFETIME, now=now)
    assert cert.not_valid_after_utc == ca_end
    assert check_leaf(cert, ca_bundle=[ca.certificate], trust_domain=TD, now=now) == []
    with pytest.raises(CaError, match="expired"):
        _mint(ca, now=ca_end)
    with pytest.raises(CaError, match="not valid before"):
        _mint(ca, now=T0 - timedelta(hours=1))


def test_naive_datetimes_are_refused(ca: CertificateAuthority) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        _mint(ca, now=datetime(2030, 1, 1, 13))
    cert = _mint(ca)
    with pytest.raises(ValueError, match="timezone-aware"):
        check_leaf(cert, ca_bundle=[ca.certificate], trust_domain=TD, now=datetime(2030, 1, 1, 13))


def test_other_timezones_are_converted_to_utc(ca: CertificateAuthority) -> None:
    from datetime import timezone
    plus2 = timezone(timedelta(hours=2))
    cert = _mint(ca, now=datetime(2030, 1, 1, 15, 0, tzinfo=plus2))
    assert cert.not_valid_before_utc == datetime(2030, 1, 1, 12, 59, tzinfo=UTC)


def test_identity_never_comes_from_the_csr(ca: CertificateAuthority) -> None:
    key = _p256()
    pem = _csr_pem(key, subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin"),
                                           x509.NameAttribute(NameOID.ORGANIZATION_NAME, "admins")]),
                   extensions=[(x509.SubjectAlternativeName([
                       x509.UniformResourceIdentifier(f"spiffe://{TD}/p/dev/u/admin"),
                       x509.RFC822Name("admin@example.com"), x509.DNSName("admin")]), False),
                       (x509.BasicConstraints(ca=True, path_length=None), True),
                       (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)])
    csr_key = load_csr(pem)
    identity = Identity(provider="dev", subject="bob")
    cert = ca.mint_client(public_key=csr_key.public_key, identity=identity, replay_key="jti:1",
                          ttl=timedelta(minutes=5), now=T0 + timedelta(hours=1))
    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev/bob")])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(f"spiffe://{TD}/p/dev/u/bob")]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]
    assert "admin" not in cert.public_bytes(serialization.Encoding.PEM).decode()
    assert b"admin" not in cert.public_bytes(serialization.Encoding.DER)
    assert _spki_der(cert.public_key()) == _spki_der(key.public_key())


def test_mint_rechecks_the_public_key(ca: CertificateAuthority) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(CsrRejected, match="RSA key of 1024 bits"):
        _mint(ca, key=weak)


@pytest.mark.parametrize("identity, replay", [
    (Identity(provider="Bad Name", subject="x"), "jti:1"),
    (Identity(provider="dev", subject=""), "jti:1"),
    (Identity(provider="dev", subject="x" * 1025), "jti:1"),
    (Identity(provider="dev", subject="x", email="j\u00f6rg@example.com"), "jti:1"),
    (Identity(provider="dev", subject="x", email="not-an-email"), "jti:1"),
    (Identity(provider="dev", subject="x"), ""),
])
def test_mint_refuses_malformed_input(ca: CertificateAuthority, identity: Identity, replay: str) -> None:
    with pytest.raises(ValueError):
        ca.mint_client(public_key=_p256().public_key(), identity=identity, replay_key=replay,
                       ttl=timedelta(minutes=5), now=T0 + timedelta(hours=1))


def test_identity_extension_with_long_values_round_trips(ca: CertificateAuthority) -> None:
    # long enough for both long-form DER lengths (> 127 and > 255 bytes)
    groups = tuple(sorted(f"group-{i:03d}-\u00e9" for i in range(40)))
    identity = Identity(provider="dev", subject="carol", groups=groups)
    cert = _mint(ca, identity)
    doc = read_identity_extension(cert)
    assert doc is not None and doc["groups"] == list(groups)
    assert leaf_identity(cert, trust_domain=TD) == identity


@pytest.mark.parametrize("value", [
    b"\x04\x03abc",                                   # OCTET STRING, not UTF8String
    b"\x0c\x05{}",                                    # length beyond the value
    b"\x0c\x81\x02{}",                                # non-minimal length
    b"\x0c\x02{}",                                    # wrong fields
    b"\x0c\x1b" + b'{"groups":[],"provider":"d"}',    # missing fields, wrong length too
])
def test_malformed_identity_extension_is_refused(ca_dir: Path, ca: CertificateAuthority,
                                                 value: bytes) -> None:
    ext = x509.UnrecognizedExtension(L4PROXY_IDENTITY_OID, value)
    cert = _reissue(ca_dir, _mint(ca), add=((ext, False),))
    with pytest.raises(ValueError):
        read_identity_extension(cert)
    assert check_leaf(cert, ca_bundle=[ca.certificate], trust_domain=TD, now=T0 + timedelta(hours=1))


def test_non_canonical_identity_extension_is_refused(ca_dir: Path, ca: CertificateAuthority) -> None:
    text = b'{"provider":"dev","groups":[],"replay":"jti:1","v":1}'  # keys not sorted
    ext = x509.UnrecognizedExtension(L4PROXY_IDENTITY_OID, b"\x0c" + bytes([len(text)]) + text)
    cert = _reissue(ca_dir, _mint(ca), add=((ext, False),))
    with pytest.raises(ValueError, match="canonical"):
        read_identity_extension(cert)


def test_breakglass(ca: CertificateAuthority) -> None:
    now = T0 + timedelta(hours=2)
    key = _p256()
    cert, clamped = ca.issue_breakglass(name="oncall", public_key=key.public_key(), ttl=timedelta(minutes=30),
                                        now=now)
    assert clamped is False
    assert cert.not_valid_after_utc == now + timedelta(minutes=30)
    assert leaf_identity(cert, trust_domain=TD) == Identity(provider="breakglass", subject="oncall")
    doc = read_identity_extension(cert)
    assert doc is not None and doc["provider"] == "breakglass" and doc["replay"].startswith("breakglass:")
    assert check_leaf(cert, ca_bundle=[ca.certificate], trust_domain=TD, now=now) == []

    cert, clamped = ca.issue_breakglass(name="oncall", public_key=key.public_key(), ttl=timedelta(hours=5),
                                        now=now, groups=["admins"])
    assert clamped is True
    assert cert.not_valid_after_utc == now + timedelta(hours=1)
    assert read_identity_extension(cert)["groups"] == ["admins"]  # type: ignore[index]
    with pytest.raises(ValueError):
        ca.issue_breakglass(name="on call/..", public_key=key.public_key(), ttl=timedelta(minutes=5), now=now)
    with pytest.raises(ValueError):
        ca.issue_breakglass(name="oncall", public_key=key.public_key(), ttl=timedelta(minutes=5), now=now,
                            max_ttl=timedelta(days=2))


# --- CSRs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make, kind", [
    (lambda: ec.generate_private_key(ec.SECP256R1()), "EC P-256"),
    (lambda: ec.generate_private_key(ec.SECP384R1()), "EC P-384"),
    (ed25519.Ed25519PrivateKey.generate, "Ed25519"),
    (lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), "RSA 2048"),
])
def test_accepted_csrs(make: Callable[[], Any], kind: str) -> None:
    key = make()
    pem = _csr_pem(key)
    for form in (pem, pem.decode(), b"\n  " + pem + b"\n\n"):
        got = load_csr(form)
        assert got.key_type == kind
        assert _spki_der(got.public_key) == _spki_der(key.public_key())
        assert got.binding == hashlib.sha256(_spki_der(key.public_key())).hexdigest()


def _tamper_signature(pem: bytes) -> bytes:
    csr = x509.load_pem_x509_csr(pem)
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte belongs to the signature
    tampered = x509.load_der_x509_csr(bytes(der))
    return tampered.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("make", [_p256, ed25519.Ed25519PrivateKey.generate])
def test_csr_with_a_bad_signature(make: Callable[[], Any]) -> None:
    with pytest.raises(CsrRejected, match=r"^CSR signature is invalid$"):
        load_csr(_tamper_signature(_csr_pem(make())))


def _rejected(data: bytes | str) -> str:
    with pytest.raises(CsrRejected) as info:
        load_csr(data)
    assert isinstance(info.value, ValueError)
    return str(info.value)


def test_csr_rejections_say_why() -> None:
    good = _csr_pem(_p256())
    assert "no PEM block" in _rejected(b"garbage")
    assert "no PEM block" in _rejected(b"")
    assert _rejected(good + good) == "more than one PEM block: send exactly one CERTIFICATE REQUEST"
    assert "larger than 16 KiB" in _rejected(good + b"\n" * (MAX_CSR_BYTES - len(good) + 1))
    assert "larger than 16 KiB" in _rejected(good.decode() + " " * MAX_CSR_BYTES)
    load_csr(good + b"\n" * (MAX_CSR_BYTES - len(good)))  # exactly at the limit is fine
    cert_label = good.replace(b"CERTIFICATE REQUEST", b"CERTIFICATE")
    assert "not a CERTIFICATE REQUEST" in _rejected(cert_label)
    assert "outside the PEM block" in _rejected(b"subject: admin\n" + good)
    assert "not a valid PKCS#10" in _rejected(
        b"-----BEGIN CERTIFICATE REQUEST-----\nbm90IGEgY3Ny\n-----END CERTIFICATE REQUEST-----\n")
    assert "not terminated" in _rejected(good.split(b"-----END")[0])
    assert "non-ASCII" in _rejected(good.decode() + "\u00e9")


@pytest.mark.parametrize("make, reason", [
    (lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024),
     "RSA key of 1024 bits: 2048..4096 required"),
    (lambda: ec.generate_private_key(ec.SECP521R1()), "EC curve secp521r1 is not allowed"),
    (lambda: ec.generate_private_key(ec.SECP256K1()), "EC curve secp256k1 is not allowed"),
    (lambda: dsa.generate_private_key(1024), "DSA keys are not allowed"),
])
def test_csr_key_algorithms_outside_the_allow_list(make: Callable[[], Any], reason: str) -> None:
    assert _rejected(_csr_pem(make())).startswith(reason)


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        length = bytes([n])
    else:
        size = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(size)]) + size
    return bytes([tag]) + length + body


def test_csr_signed_with_sha1_is_refused() -> None:
    # cryptography no longer signs with SHA-1, so assemble the PKCS#10 structure by hand
    key = _p256()
    info = x509.load_pem_x509_csr(_csr_pem(key)).tbs_certrequest_bytes
    signature = key.sign(info, ec.ECDSA(hashes.SHA1()))
    ecdsa_with_sha1 = _der(0x30, _der(0x06, bytes.fromhex("2a8648ce3d0401")))
    der = _der(0x30, info + ecdsa_with_sha1 + _der(0x03, b"\x00" + signature))
    pem = x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM)
    assert _rejected(pem) == "CSR signed with SHA1: SHA-256 or stronger required"


# --- check_leaf ----------------------------------------------------------------------------------


def test_check_leaf_catches_each_problem(tmp_path: Path, ca_dir: Path, ca: CertificateAuthority) -> None:
    now = T0 + timedelta(hours=1)
    cert = _mint(ca, now=now)
    bundle = [ca.certificate]

    def problems(c: x509.Certificate, *, at: datetime = now, trust_domain: str = TD,
                 cas: list[x509.Certificate] = bundle) -> list[str]:
        return check_leaf(c, ca_bundle=cas, trust_domain=trust_domain, now=at)

    assert problems(cert) == []
    assert problems(cert, at=cert.not_valid_after_utc) == []  # the last valid second
    assert problems(cert, at=cert.not_valid_after_utc + timedelta(seconds=1)) == [
        "expired at 2030-01-01T13:10:00Z"]
    assert problems(cert, at=cert.not_valid_before_utc - timedelta(seconds=1)) == [
        "not valid before 2030-01-01T12:59:00Z"]
    assert problems(cert, trust_domain="other.test") == ["no identity URI SAN in trust domain other.test"]

    ca_true = _reissue(ca_dir, cert, add=((x509.BasicConstraints(ca=True, path_length=None), True),))
    assert problems(ca_true) == ["basicConstraints CA:TRUE: a CA certificate is not a client certificate"]
    no_bc = _reissue(ca_dir, cert, drop=(ExtensionOID.BASIC_CONSTRAINTS,))
    assert problems(no_bc) == ["no basicConstraints extension (CA:FALSE required)"]
    server_auth = _reissue(ca_dir, cert,
                           add=((x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),))
    assert problems(server_auth) == ["extended key usage lacks clientAuth"]
    no_eku = _reissue(ca_dir, cert, drop=(ExtensionOID.EXTENDED_KEY_USAGE,))
    assert problems(no_eku) == ["no extended key usage extension (clientAuth required)"]
    no_ext = _reissue(ca_dir, cert, drop=(L4PROXY_IDENTITY_OID,))
    assert problems(no_ext) == ["no l4proxy identity extension"]
    two_uris = _reissue(ca_dir, cert, add=((x509.SubjectAlternativeName([
        x509.UniformResourceIdentifier(f"spiffe://{TD}/p/dev/u/alice"),
        x509.UniformResourceIdentifier(f"spiffe://{TD}/p/dev/u/admin")]), False),))
    assert problems(two_uris) == ["more than one URI SAN"]
    critical = _reissue(ca_dir, cert, add=((x509.UnrecognizedExtension(
        x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00"), True),))
    assert problems(critical) == ["unknown critical extension 1.3.6.1.4.1.99999.1"]
    no_digital_signature = _reissue(ca_dir, cert, add=((x509.KeyUsage(
        digital_signature=False, content_commitment=False, key_encipherment=True, data_encipherment=False,
        key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False,
        decipher_only=False), True),))
    assert problems(no_digital_signature) == ["key usage lacks digitalSignature"]

    def identity_ext(text: bytes, critical: bool = False) -> tuple[tuple[x509.ExtensionType, bool]]:
        return ((x509.UnrecognizedExtension(L4PROXY_IDENTITY_OID, b"\x0c" + bytes([len(text)]) + text),
                 critical),)

    other_provider = _reissue(ca_dir, cert, add=identity_ext(
        b'{"groups":["admins"],"provider":"github","replay":"jti:1","v":1}'))
    assert problems(other_provider) == ["the identity extension and the URI SAN name different providers"]
    assert leaf_identity(other_provider, trust_domain=TD) is None
    version2 = _reissue(ca_dir, cert, add=identity_ext(b'{"groups":[],"provider":"dev","replay":"x","v":2}'))
    assert problems(version2) == ["unsupported l4proxy identity extension version"]
    critical_ext = _reissue(ca_dir, cert, add=identity_ext(
        b'{"groups":[],"provider":"dev","replay":"x","v":1}', critical=True))
    assert problems(critical_ext) == [f"unknown critical extension {L4PROXY_IDENTITY_OID.dotted_string}",
                                      "the l4proxy identity extension must not be critical"]
    garbled = _reissue(ca_dir, cert, add=((x509.UnrecognizedExtension(ExtensionOID.BASIC_CONSTRAINTS,
                                                                      b"\x04\x00"), True),))
    assert problems(garbled) == ["malformed certificate extensions"]
    assert leaf_identity(garbled, trust_domain=TD) is None
    with pytest.raises(ValueError, match="malformed"):
        read_identity_extension(garbled)

    # a leaf from a foreign CA of the same trust domain
    foreign_dir = tmp_path / "foreign"
    init_ca(foreign_dir, trust_domain=TD, now=T0)
    foreign = _mint(CertificateAuthority.load(foreign_dir), now=now)
    assert problems(foreign) == ["not signed by a CA in the trust bundle"]
    assert problems(cert, cas=[]) == ["not signed by a CA in the trust bundle"]
    # a leaf signed by the CA key but with a tampered body
    tampered = bytearray(cert.public_bytes(serialization.Encoding.DER))
    idx = tampered.index(b"dev/alice")
    tampered[idx:idx + 9] = b"dev/admin"
    assert problems(x509.load_der_x509_certificate(bytes(tampered))) == [
        "not signed by a CA in the trust bundle"]


# --- rotation --------------------------------------------------------------------------------------


def test_ca_rotation_keeps_old_leaves_verifiable_then_drops_the_old_ca(ca_dir: Path) -> None:
    old_ca = CertificateAuthority.load(ca_dir)
    t1 = T0 + timedelta(days=30)
    old_leaf = _mint(old_ca, ttl=MAX_LEAF_LIFETIME, now=t1)
    old_key_pem = (ca_dir / "ca.key").read_bytes()

    t2 = t1 + timedelta(hours=1)
    files = rotate_ca(ca_dir, now=t2)
    new_ca = CertificateAuthority.load(ca_dir)
    assert new_ca.certificate != old_ca.certificate
    assert new_ca.trust_domain == TD
    assert (ca_dir / "ca.key").read_bytes() != old_key_pem
    assert _mode(ca_dir / "ca.key") == 0o600
    # the old certificate is kept, its private key is not
    serial = f"{old_ca.certificate.serial_number:x}"
    kept = x509.load_pem_x509_certificate((files.old_dir / f"ca-{serial}.crt").read_bytes())
    assert kept == old_ca.certificate
    assert not [p for p in files.old_dir.iterdir() if p.suffix == ".key"]
    assert old_key_pem not in [p.read_bytes() for p in ca_dir.rglob("*") if p.is_file()]
    rotations = json.loads(files.rotations.read_text())["rotations"]
    assert rotations == [{"serial": serial, "file": f"ca-{serial}.crt",
                          "rotated_at": "2030-01-31T13:00:00Z",
                          "retain_until": "2030-02-01T13:00:00Z"}]
    # the server certificate now comes from the new CA, with the same names
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(new_ca.certificate)
    assert server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.DNSName) == ["localhost"]

    # the bundle holds both while old leaves may live
    bundle = trust_bundle(ca_dir, t2)
    assert bundle == [new_ca.certificate, old_ca.certificate]
    assert x509.load_pem_x509_certificates(files.bundle.read_bytes()) == bundle
    assert new_ca.bundle(now=t2) == bundle
    assert new_ca.bundle_pem(now=t2) == files.bundle.read_bytes()
    later = t2 + timedelta(hours=20)
    assert check_leaf(old_leaf, ca_bundle=trust_bundle(ca_dir, later), trust_domain=TD, now=later) == []
    # verified with the old CA's public key, explicitly
    old_public = kept.public_key()
    assert isinstance(old_public, ec.EllipticCurvePublicKey)
    assert old_leaf.signature_hash_algorithm is not None
    old_public.verify(old_leaf.signature, old_leaf.tbs_certificate_bytes,
                      ec.ECDSA(old_leaf.signature_hash_algorithm))
    new_public = new_ca.certificate.public_key()
    assert isinstance(new_public, ec.EllipticCurvePublicKey)
    with pytest.raises(InvalidSignature):
        new_public.verify(old_leaf.signature, old_leaf.tbs_certificate_bytes,
                          ec.ECDSA(old_leaf.signature_hash_algorithm))
    new_leaf = _mint(new_ca, now=later)
    assert check_leaf(new_leaf, ca_bundle=trust_bundle(ca_dir, later), trust_domain=TD, now=later) == []
    assert check_leaf(new_leaf, ca_bundle=[old_ca.certificate], trust_domain=TD, now=later) == [
        "not signed by a CA in the trust bundle"]

    # after the retention the old CA is gone from the bundle
    gone = t2 + MAX_LEAF_LIFETIME
    assert trust_bundle(ca_dir, gone - timedelta(seconds=1)) == [new_ca.certificate, old_ca.certificate]
    assert trust_bundle(ca_dir, gone) == [new_ca.certificate]
    assert CertificateAuthority.load(ca_dir).bundle(now=gone) == [new_ca.certificate]
    assert write_trust_bundle(ca_dir, now=gone) == [new_ca.certificate]
    assert x509.load_pem_x509_certificates(files.bundle.read_bytes()) == [new_ca.certificate]
    # by then every old leaf has expired anyway
    assert old_leaf.not_valid_after_utc < gone
    assert check_leaf(old_leaf, ca_bundle=trust_bundle(ca_dir, gone), trust_domain=TD, now=gone) == [
        "not signed by a CA in the trust bundle", "expired at 2030-02-01T12:00:00Z"]


def test_two_rotations_and_a_forced_init_distrusts_everything_old(ca_dir: Path) -> None:
    first = CertificateAuthority.load(ca_dir).certificate
    rotate_ca(ca_dir, now=T0 + timedelta(days=1))
    second = CertificateAuthority.load(ca_dir).certificate
    rotate_ca(ca_dir, now=T0 + timedelta(days=1, hours=12))
    third = CertificateAuthority.load(ca_dir).certificate
    assert trust_bundle(ca_dir, T0 + timedelta(days=1, hours=13)) == [third, second, first]
    assert trust_bundle(ca_dir, T0 + timedelta(days=2, hours=1)) == [third, second]
    assert trust_bundle(ca_dir, T0 + timedelta(days=2, hours=12)) == [third]

    rotate_ca(ca_dir, now=T0 + timedelta(days=3))
    now = T0 + timedelta(days=3, hours=1)
    assert len(trust_bundle(ca_dir, now)) == 2
    init_ca(ca_dir, trust_domain=TD, now=now, force=True)
    fresh = CertificateAuthority.load(ca_dir)
    assert trust_bundle(ca_dir, now) == [fresh.certificate]
    assert fresh.bundle(now=now) == [fresh.certificate]


def test_corrupt_rotation_records_are_a_ca_error(ca_dir: Path) -> None:
    rotate_ca(ca_dir, now=T0 + timedelta(days=1))
    path = ca_dir / "old" / "rotations.json"
    doc = json.loads(path.read_text())
    doc["rotations"][0]["file"] = "../ca.key"  # never a path outside old/
    path.write_text(json.dumps(doc))
    with pytest.raises(CaError, match="corrupt"):
        trust_bundle(ca_dir, T0 + timedelta(days=1))
    path.write_text('{"v": 1, "rotations": [{"file": "ca-1.crt"}]}')
    with pytest.raises(CaError, match="corrupt"):
        trust_bundle(ca_dir, T0 + timedelta(days=1))
    with pytest.raises(CaError, match="corrupt"):
        CertificateAuthority.load(ca_dir)


def test_recording_key_rotation_keeps_the_old_public_key(ca_dir: Path) -> None:
    first = CertificateAuthority.load(ca_dir).recording_key_id
    t1 = T0 + timedelta(days=7)
    second = rotate_recording_key(ca_dir, now=t1)
    assert second != first
    keyring = load_recording_keyring(ca_dir)
    assert set(keyring) == {first, second}
    assert all(recording_key_id(k) == key_id for key_id, k in keyring.items())
    ca = CertificateAuthority.load(ca_dir)
    assert ca.recording_key_id == second
    assert recording_key_id(ca.recording_key.public_key()) == second
    assert _mode(ca_dir / "recording.key") == 0o600
    assert read_recording_key_history(ca_dir) == [(first, T0), (second, t1)]
    # a recording signed by the old key still verifies with the keyring
    assert keyring[first] is not None and keyring[second] is not None
    # a keyring entry under the wrong name is refused
    (ca_dir / "recording-keys" / f"{second}.pub").rename(ca_dir / "recording-keys" / f"{'0' * 64}.pub")
    with pytest.raises(CaError, match="holds the key with id"):
        load_recording_keyring(ca_dir)


def test_public_surface() -> None:
    for module in (_ca, _csr):
        names = module.__all__
        assert len(names) == len(set(names))
        assert all(hasattr(module, name) for name in names)
    assert L4PROXY_IDENTITY_OID.dotted_string.startswith("2.25.")
