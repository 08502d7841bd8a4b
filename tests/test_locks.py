"""Locks end to end over the real control plane on loopback HTTPS: dev IdP token ->
`l4proxy login` profile -> the admin functions (`l4proxy.admin`) lock, list and unlock
through `/v1/admin/locks`; non-admins are refused; a locked identity or group cannot
enroll; every change is audited. Plus the pure parts: `until` parsing and the table."""

from __future__ import annotations

import datetime as dt
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from l4proxy import admin
from l4proxy.admin import AdminError, format_locks
from l4proxy.control._locks import parse_until
from l4proxy.login import login
from tests.test_control import Plane, _csr, _plane, call

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z
_T = TypeVar("_T")


async def run(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """A blocking admin call off the event loop (the control plane runs on it)."""
    return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


async def _login(plane: Plane, sub: str, groups: tuple[str, ...]) -> Path:
    out = plane.tmp / f"profile-{sub}"
    token = plane.token(sub, groups=groups)
    await run(login, enroll_url=plane.url, ca_file=plane.ca_dir / "ca.crt", id_token=token,
              out_dir=out)
    return out


async def _enroll(plane: Plane, sub: str, groups: tuple[str, ...] = ("eng",)) -> tuple[int, Any]:
    _key, csr = _csr()
    status, _h, body = await call(plane.url + "/v1/certificates", ctx=plane.context(),
                                  body={"csr": csr}, token=plane.token(sub, groups=groups))
    return status, json.loads(body)


def _audit(plane: Plane, event: str) -> list[dict[str, Any]]:
    if not plane.audit_path.exists():
        return []
    events = [json.loads(line) for line in plane.audit_path.read_text().splitlines()]
    return [e for e in events if e["event"] == event]


@pytest.fixture
async def plane(nursery: trio.Nursery, tmp_path: Path) -> Plane:
    return await _plane(nursery, tmp_path)


@pytest.fixture
async def root(plane: Plane) -> Path:
    """The profile of an admin (a member of control.admin_groups)."""
    return await _login(plane, "root", ("admins", "eng"))


# --- end to end ----------------------------------------------------------------------------


async def test_an_admin_locks_lists_and_unlocks(plane: Plane, root: Path) -> None:
    before = time.time()
    lock = await run(admin.lock, root, identity="dev/mallory", until="2h", reason="stolen laptop")
    assert set(lock) == {"id", "kind", "value", "until", "reason", "created_by", "created_at"}
    assert (lock["kind"], lock["value"], lock["reason"], lock["created_by"]) == \
        ("identity", "dev/mallory", "stolen laptop", "dev/root")
    until = dt.datetime.fromisoformat(lock["until"]).timestamp()
    assert before + 7200 - 2 <= until <= time.time() + 7200 + 1
    forever = await run(admin.lock, root, group="contractors")
    assert forever["until"] is None and forever["reason"] == ""
    serial = await run(admin.lock, root, serial="00:0A:FF", until="2030-01-01T00:00:00+01:00")
    assert serial["value"] == "aff" and serial["until"] == "2029-12-31T23:00:00Z"

    assert await run(admin.list_locks, root) == [lock, forever, serial]
    table = format_locks(await run(admin.list_locks, root))
    assert lock["id"] in table and "dev/mallory" in table and "stolen laptop" in table

    removed = await run(admin.unlock, root, lock["id"], reason="laptop found")
    assert removed == lock
    assert await run(admin.list_locks, root) == [forever, serial]
    with pytest.raises(AdminError) as info:
        await run(admin.unlock, root, lock["id"])
    assert info.value.exit_code == 2 and "HTTP 404" in str(info.value)
    assert "no such lock" in str(info.value)

    added = _audit(plane, "lock_added")
    assert [e["lock_id"] for e in added] == [lock["id"], forever["id"], serial["id"]]
    assert added[0]["by"] == "dev/root" and added[0]["reason"] == "stolen laptop"
    assert (added[0]["kind"], added[0]["value"], added[0]["until"]) == \
        ("identity", "dev/mallory", lock["until"])
    assert added[0]["client_address"] == "127.0.0.1"
    (gone,) = _audit(plane, "lock_removed")
    assert gone["lock_id"] == lock["id"] and gone["by"] == "dev/root"
    assert gone["reason"] == "laptop found" and gone["lock_reason"] == "stolen laptop"
    assert (gone["kind"], gone["value"], gone["locked_by"]) == ("identity", "dev/mallory", "dev/root")


async def test_locks_persist_in_the_state_store(plane: Plane, root: Path) -> None:
    lock = await run(admin.lock, root, identity="dev/mallory", reason="r")
    store = plane.addresses.api.store
    version = await store.locks_version()
    snapshot = await store.active_locks(now=time.time())
    assert snapshot.version == version >= 1
    found = snapshot.match("dev/mallory", (), 0)
    assert found is not None and found.id == lock["id"]
    await run(admin.unlock, root, lock["id"])
    assert await store.locks_version() == version + 1
    assert (await store.active_locks(now=time.time())).match("dev/mallory", (), 0) is None


async def test_non_admins_are_refused(plane: Plane, root: Path) -> None:
    user = await _login(plane, "plain", ("eng",))
    lock = await run(admin.lock, root, group="contractors")
    for call_admin in (functools.partial(admin.lock, user, identity="dev/root"),
                       functools.partial(admin.list_locks, user),
                       functools.partial(admin.unlock, user, lock["id"])):
        with pytest.raises(AdminError) as info:
            await run(call_admin)
        assert info.value.exit_code == 2
        assert "HTTP 403" in str(info.value) and "admin role required" in str(info.value)
    # nothing changed, and nothing was audited for the refused calls
    assert await run(admin.list_locks, root) == [lock]
    assert len(_audit(plane, "lock_added")) == 1 and _audit(plane, "lock_removed") == []
    # without a client certificate: 401
    status, _h, _b = await call(plane.url + "/v1/admin/locks", ctx=plane.context())
    assert status == 401


async def test_a_locked_identity_cannot_enroll(plane: Plane, root: Path) -> None:
    assert (await _enroll(plane, "mallory"))[0] == 200
    lock = await run(admin.lock, root, identity="dev/mallory", reason="stolen laptop")
    status, body = await _enroll(plane, "mallory")
    assert status == 403, body
    assert body["error"]["message"] == "identity locked"
    (refused,) = _audit(plane, "enrollment_refused")
    assert refused["identity"] == "dev/mallory" and refused["lock_id"] == lock["id"]
    # nobody else is affected, and unlocking lets mallory back in
    assert (await _enroll(plane, "alice"))[0] == 200
    await run(admin.unlock, root, lock["id"])
    assert (await _enroll(plane, "mallory"))[0] == 200
    issued = [e["identity"] for e in _audit(plane, "certificate_issued")]
    assert issued.count("dev/mallory") == 2


async def test_a_locked_group_cannot_enroll(plane: Plane, root: Path) -> None:
    lock = await run(admin.lock, root, group="contractors", until="10m")
    status, body = await _enroll(plane, "carol", ("eng", "contractors"))
    assert status == 403 and body["error"]["message"] == "identity locked"
    assert (await _enroll(plane, "dave", ("eng",)))[0] == 200
    # a serial lock never matches an enrollment (there is no certificate yet)
    await run(admin.unlock, root, lock["id"])
    await run(admin.lock, root, serial="1")
    assert (await _enroll(plane, "carol", ("eng", "contractors")))[0] == 200


async def test_bad_lock_requests_get_400(plane: Plane, root: Path) -> None:
    ctx = plane.context(root / "client.crt", root / "client.key")
    url = plane.url + "/v1/admin/locks"
    cases: list[tuple[Any, str]] = [
        ({}, "exactly one of identity, group, serial"),
        ({"identity": "dev/a", "group": "g"}, "exactly one"),
        ({"identity": "dev/a", "colour": "red"}, "unknown field 'colour'"),
        ({"identity": 7}, "identity must be a string"),
        ({"identity": "mallory"}, "PROVIDER/SUBJECT"),
        ({"identity": ""}, "non-empty"),
        ({"group": "eng\n"}, "control characters"),
        ({"serial": "zz"}, "hexadecimal"),
        ({"serial": "0"}, "positive"),
        ({"serial": 255}, "serial must be a string"),
        ({"group": "g", "until": "2h ago"}, "RFC 3339"),
        ({"group": "g", "until": "2020-01-01T00:00:00Z"}, "in the future"),
        ({"group": "g", "until": "2030-01-01T00:00:00"}, "RFC 3339"),  # no time zone
        ({"group": "g", "until": "2030-02-30T00:00:00Z"}, "not a valid time"),
        ({"group": "g", "until": "0s"}, "in the future"),
        ({"group": "g", "until": "99999999999d"}, "too far"),
        ({"group": "g", "until": 3600}, "until must be a string"),
        ({"group": "g", "reason": "x" * 501}, "longer than 500"),
        ({"group": "g", "reason": ["x"]}, "reason must be a string"),
        ({"group": "g", "reason": "a\x1b[31mb"}, "control characters"),
        (["group", "g"], "JSON object"),
    ]
    for body, message in cases:
        status, _h, raw = await call(url, ctx=ctx, body=body)
        assert status == 400, (body, raw)
        error = json.loads(raw)["error"]
        assert error["code"] == "bad_request" and message in error["message"], (body, error)
    status, _h, raw = await call(url, ctx=ctx, raw=b"{nope", method="POST")
    assert status == 400 and "not JSON" in raw.decode()
    status, _h, _b = await call(url, ctx=ctx, raw=b'{"group": "g"}', content_type="text/plain")
    assert status == 415
    # nothing was stored or audited
    assert await run(admin.list_locks, root) == []
    assert _audit(plane, "lock_added") == []
    # and the admin functions pass the server's message on
    with pytest.raises(AdminError) as info:
        await run(admin.lock, root, serial="not-hex")
    assert info.value.exit_code == 2 and "HTTP 400" in str(info.value)
    assert "hexadecimal" in str(info.value)


async def test_lock_routes_methods_and_ids(plane: Plane, root: Path) -> None:
    ctx = plane.context(root / "client.crt", root / "client.key")
    url = plane.url + "/v1/admin/locks"
    status, headers, _b = await call(url, ctx=ctx, method="PUT", body={})
    assert status == 405 and headers["Allow"] == "GET, POST"
    lock = await run(admin.lock, root, group="g")
    status, headers, _b = await call(f"{url}/{lock['id']}", ctx=ctx)
    assert status == 405 and headers["Allow"] == "DELETE"
    for bad_id in ("nope", lock["id"].upper(), lock["id"] + "0", "", "..%2F..%2Fstatus"):
        status, _h, _b = await call(f"{url}/{bad_id}", ctx=ctx, method="DELETE")
        assert status == 404, bad_id
    status, _h, _b = await call(f"{url}/{lock['id']}", ctx=ctx, method="DELETE",
                                body={"reason": "ok", "force": True})
    assert status == 400
    status, _h, raw = await call(f"{url}/{lock['id']}", ctx=ctx, method="DELETE")
    assert status == 200 and json.loads(raw)["id"] == lock["id"]
    assert _audit(plane, "lock_removed")[0]["reason"] == ""
    # the other admin routes still answer
    assert (await call(plane.url + "/v1/admin/status", ctx=ctx))[0] == 200
    assert (await call(plane.url + "/v1/admin/nothing", ctx=ctx))[0] == 404


async def test_admin_function_failures_have_exit_codes(plane: Plane, root: Path,
                                                       tmp_path: Path) -> None:
    with pytest.raises(AdminError) as info:
        await run(admin.lock, root, identity="dev/a", group="g")
    assert info.value.exit_code == 1 and "exactly one" in str(info.value)
    with pytest.raises(AdminError) as info:
        await run(admin.lock, root)
    assert info.value.exit_code == 1
    with pytest.raises(AdminError) as info:
        await run(admin.list_locks, tmp_path / "no-profile")
    assert info.value.exit_code == 1 and "l4proxy login" in str(info.value)
    # a control plane that is not there: 7
    unreachable = tmp_path / "unreachable"
    unreachable.mkdir()
    for name in ("client.crt", "client.key", "ca.crt"):
        (unreachable / name).write_bytes((root / name).read_bytes())
    profile = (root / "profile.toml").read_text().replace(plane.url, "https://127.0.0.1:9")
    assert profile != (root / "profile.toml").read_text()
    (unreachable / "profile.toml").write_text(profile)
    with pytest.raises(AdminError) as info:
        await run(admin.list_locks, unreachable, timeout=5)
    assert info.value.exit_code == 7 and "127.0.0.1:9" in str(info.value)
    # a profile without a control URL, or with a broken certificate: 1
    (unreachable / "profile.toml").write_text('control_url = "http://127.0.0.1:9"\n')
    with pytest.raises(AdminError) as info:
        await run(admin.list_locks, unreachable)
    assert info.value.exit_code == 1 and "control_url" in str(info.value)
    (unreachable / "profile.toml").write_text(profile)
    (unreachable / "client.crt").write_text("not a certificate")
    with pytest.raises(AdminError) as info:
        await run(admin.list_locks, unreachable)
    assert info.value.exit_code == 1 and "client.crt" in str(info.value)


async def test_an_expired_certificate_is_reported_locally(nursery: trio.Nursery,
                                                          tmp_path: Path) -> None:
    plane = await _plane(nursery, tmp_path, ca_age=dt.timedelta(hours=3))
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from l4proxy.identity import CertificateAuthority, Identity

    ca = CertificateAuthority.load(plane.ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.mint_client(public_key=key.public_key(),
                          identity=Identity(provider="dev", subject="old", groups=("admins",)),
                          replay_key="jti:old", ttl=dt.timedelta(minutes=5),
                          now=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=30))
    profile = tmp_path / "old"
    profile.mkdir()
    (profile / "client.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (profile / "client.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (profile / "ca.crt").write_bytes((plane.ca_dir / "ca.crt").read_bytes())
    (profile / "profile.toml").write_text(f'control_url = "{plane.url}"\n')
    with pytest.raises(AdminError) as info:
        await run(admin.list_locks, profile)
    assert info.value.exit_code == 1 and "expired" in str(info.value)


# --- the pure parts ------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("2h", T0 + 7200),
    ("90", T0 + 90),
    ("1d12h", T0 + 129_600),
    (" 30m ", T0 + 1800),
    ("2027-01-15T09:00:00Z", T0 + 3600),
    ("2027-01-15t09:00:00z", T0 + 3600),
    ("2027-01-15T10:00:00+01:00", T0 + 3600),
    ("2027-01-15T08:00:00.5Z", T0 + 0.5),
    ("2027-01-15T08:00:00.123456789Z", T0 + 0.123456),
])
def test_parse_until(text: str, expected: float) -> None:
    assert parse_until(text, now=T0) == pytest.approx(expected)


@pytest.mark.parametrize(("text", "message"), [
    ("", "RFC 3339"),
    ("soon", "RFC 3339"),
    ("-2h", "RFC 3339"),
    ("2027-01-15", "RFC 3339"),
    ("2027-01-15T09:00:00", "RFC 3339"),
    ("2027-01-15 09:00:00Z", "RFC 3339"),
    ("2027-13-01T00:00:00Z", "not a valid time"),
    ("2027-01-15T08:00:00Z", "in the future"),
    ("2020-01-15T08:00:00Z", "in the future"),
    ("0", "in the future"),
    ("9" * 400, "too far"),
    ("9999-12-31T23:59:59-01:00", "too far"),
])
def test_parse_until_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_until(text, now=T0)


def test_format_locks() -> None:
    assert format_locks([]) == "no active locks"
    locks: list[dict[str, Any]] = [
        {"id": "a" * 32, "kind": "identity", "value": "dev/mallory", "until": "2027-01-15T10:00:00Z",
         "reason": "stolen laptop", "created_by": "dev/root", "created_at": "2027-01-15T08:00:00Z"},
        {"id": "b" * 32, "kind": "group", "value": "contractors", "until": None, "reason": "",
         "created_by": "dev/root", "created_at": "2027-01-15T08:01:00Z"},
        {"id": "c" * 32, "kind": "serial", "value": "aff", "until": None,
         "reason": "evil\x1b[2Jtext\nnext line", "created_by": "dev/x", "created_at": "2027-01-15T08:02:00Z"},
    ]
    lines = format_locks(locks).splitlines()
    assert len(lines) == 4
    assert lines[0].split() == ["ID", "KIND", "VALUE", "UNTIL", "BY", "SINCE", "REASON"]
    assert lines[1].split(maxsplit=6) == ["a" * 32, "identity", "dev/mallory", "2027-01-15T10:00:00Z",
                                          "dev/root", "2027-01-15T08:00:00Z", "stolen laptop"]
    assert lines[2].split() == ["b" * 32, "group", "contractors", "-", "dev/root",
                                "2027-01-15T08:01:00Z", "-"]
    assert lines[3].endswith("evil?[2Jtext?next line")  # no terminal control, one line each
    # columns line up
    assert len({line.index("KIND") if i == 0 else len(line.split()[0]) + 2
                for i, line in enumerate(lines)}) == 1


async def test_a_locked_admin_cannot_use_the_admin_api(plane: Plane, root: Path) -> None:
    mallory = await _login(plane, "mallory", ("admins",))
    await run(admin.lock, root, identity="dev/mallory", reason="compromised")
    with pytest.raises(AdminError) as info:  # her certificate is still valid: locked anyway
        await run(admin.list_locks, mallory)
    assert info.value.exit_code == 2 and "401" in str(info.value)
    assert len(await run(admin.list_locks, root)) == 1  # she could not remove her lock


async def test_the_lock_commands_of_the_cli(plane: Plane, root: Path) -> None:
    import subprocess
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "l4proxy.cli", *args, "--profile", str(root)],
                              capture_output=True, text=True, timeout=60, check=False)

    made = await trio.to_thread.run_sync(lambda: cli("lock", "--group", "contractors",
                                                     "--until", "1h", "--reason", "audit"))
    assert made.returncode == 0, made.stderr
    listed = await trio.to_thread.run_sync(lambda: cli("locks", "--json"))
    assert listed.returncode == 0, listed.stderr
    (lock,) = json.loads(listed.stdout)
    assert (lock["kind"], lock["value"], lock["reason"]) == ("group", "contractors", "audit")
    gone = await trio.to_thread.run_sync(lambda: cli("unlock", lock["id"]))
    assert gone.returncode == 0 and lock["id"] in gone.stdout
    missing = await trio.to_thread.run_sync(lambda: cli("unlock", lock["id"]))
    assert missing.returncode == 2
