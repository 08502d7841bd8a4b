"""The state store against real SQLite files in a temp dir (no mocks): single-use tokens
with the retry rule, rate limits, locks, expiry, schema versions and migrations, file
modes, concurrency, and the async wrapper under trio.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
import threading
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import l4proxy.store
from l4proxy.store import (
    MAX_LOCK_REASON,
    MIGRATIONS,
    SCHEMA_VERSION,
    STATE_FILE_NAME,
    TOKEN_RETRY_WINDOW,
    AsyncStateStore,
    ClaimKind,
    Lock,
    LockKind,
    LockSet,
    LockSpec,
    RateDecision,
    SchemaTooNew,
    SqliteStateStore,
    StateStore,
    StoreCorrupt,
    StoreError,
    TokenClaim,
    is_lock_id,
    normalize_lock_value,
)
from l4proxy.store._sqlite import APPLICATION_ID, _migrate, _statements

KEY = "jti:4f1c2a"
ALICE_KEY = hashlib.sha256(b"alice's CSR public key").hexdigest()
OTHER_KEY = hashlib.sha256(b"someone else's CSR public key").hexdigest()
CERT = "-----BEGIN CERTIFICATE-----\nMIIB...\n-----END CERTIFICATE-----\n"
T0 = 1_700_000_000.0
EXP = T0 + 300

FIRST = TokenClaim(kind=ClaimKind.FIRST)
REUSED = TokenClaim(kind=ClaimKind.REUSED)
RETRY = TokenClaim(kind=ClaimKind.RETRY, certificate_pem=CERT)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def store(state_dir: Path) -> Iterator[SqliteStateStore]:
    with SqliteStateStore.open(state_dir) as s:
        assert isinstance(s, SqliteStateStore)
        yield s


def _issue(store: StateStore, key: str = KEY, *, at: float = T0) -> None:
    assert store.claim_token(key, binding=ALICE_KEY, expires_at=EXP, now=at) == FIRST
    store.record_issued(key, certificate_pem=CERT, now=at + 1)


# --- single-use tokens --------------------------------------------------------------------


def test_first_claim_then_reuse_is_refused(store: SqliteStateStore) -> None:
    assert store.claim_token(KEY, binding=ALICE_KEY, expires_at=EXP, now=T0) == FIRST
    # claimed, nothing issued yet (an in-flight first request): a second claim is a replay
    assert store.claim_token(KEY, binding=ALICE_KEY, expires_at=EXP, now=T0 + 1) == REUSED
    assert store.claim_token(KEY, binding=OTHER_KEY, expires_at=EXP, now=T0 + 1) == REUSED
    # other keys are independent
    assert store.claim_token("sha256:" + "0" * 64, binding=ALICE_KEY, expires_at=EXP,
                             now=T0 + 1) == FIRST


def test_retry_with_the_same_key_within_the_window_gets_the_same_certificate(
        store: SqliteStateStore) -> None:
    _issue(store)  # issued at T0 + 1
    assert store.claim_token(KEY, binding=ALICE_KEY, expires_at=EXP, now=T0 + 2) == RETRY
    # another CSR key is refused, and does not spoil the legitimate retry
    assert store.claim_token(KEY, binding=OTHER_KEY, expires_at=EXP, now=T0 + 3) == REUSED
    edge = T0 + 1 + TOKEN_RETRY_WINDOW
    assert store.claim_token(KEY, binding=ALICE_KEY, expires_at=EXP, now=edge) == RETRY
    assert store.claim_token(KEY, binding=ALICE_KEY, expires_at=EXP, now=edge + 0.5) == REUSED
    assert store.claim_token(KEY, binding=ALICE_KEY, expires_at=EXP, now=edge + 100) == REUSED


def test_retry_window_is_sixty_seconds() -> None:
    assert TOKEN_RETRY_WINDOW == 60.0


def test_record_issued_needs_a_claim_and_happens_once(store: SqliteStateStore) -> None:
    with pytest.raises(StoreError, match="no claim"):
        store.record_issued(KEY, certificate_pem=CERT, now=T0)
    _issue(store)
    with pytest.raises(StoreError, match="already recorded"):
        store.record_issued(KEY, certificate_pem="another", now=T0 + 2)
    # the first certificate is still the one a retry gets
    assert store.claim_token(KEY, binding=ALICE_KEY, expires_at=EXP, now=T0 + 3) == RETRY


def test_replay_is_refused_after_a_restart(state_dir: Path) -> None:
    with SqliteStateStore.open(state_dir) as store:
        _issue(store)
    with SqliteStateStore.open(state_dir) as store:
        assert store.claim_token(KEY, binding=OTHER_KEY, expires_at=EXP, now=T0 + 5) == REUSED
        # the retry rule survives too
        assert store.claim_token(KEY, binding=ALICE_KEY, expires_at=EXP, now=T0 + 5) == RETRY
        assert store.claim_token(KEY, binding=ALICE_KEY, expires_at=EXP, now=T0 + 90) == REUSED


def test_records_live_until_expires_at_and_are_then_purged(store: SqliteStateStore) -> None:
    _issue(store)
    assert store.claim_token("jti:other", binding=ALICE_KEY, expires_at=EXP + 100, now=T0) == FIRST
    assert store.purge_expired(EXP) == 0
    assert store.claim_token(KEY, binding=OTHER_KEY, expires_at=EXP, now=EXP) == REUSED  # boundary
    assert store.purge_expired(EXP + 1) == 1
    assert store.purge_expired(EXP + 1) == 0
    assert store.claim_token("jti:other", binding=OTHER_KEY, expires_at=EXP + 100,
                             now=EXP + 1) == REUSED
    assert store.purge_expired(EXP + 101) == 1


def test_an_expired_record_not_yet_purged_counts_as_unknown(store: SqliteStateStore) -> None:
    _issue(store)
    assert store.claim_token(KEY, binding=OTHER_KEY, expires_at=EXP + 300, now=EXP + 1) == FIRST
    # the new record replaced the old one entirely: no stale certificate for a retry
    assert store.claim_token(KEY, binding=OTHER_KEY, expires_at=EXP + 300, now=EXP + 2) == REUSED


@pytest.mark.parametrize("connections", ["shared", "one-per-thread"])
def test_concurrent_claims_give_exactly_one_first(state_dir: Path, connections: str) -> None:
    n = 8
    stores = [SqliteStateStore.open(state_dir)]
    if connections == "one-per-thread":
        stores += [SqliteStateStore.open(state_dir) for _ in range(n - 1)]
    barrier = threading.Barrier(n)
    results: list[TokenClaim | BaseException] = []
    lock = threading.Lock()

    def claim(i: int) -> None:
        store = stores[i % len(stores)]
        barrier.wait(timeout=10)
        try:
            result: TokenClaim | BaseException = store.claim_token(
                KEY, binding=ALICE_KEY, expires_at=EXP, now=T0)
        except BaseException as exc:  # reported below
            result = exc
        with lock:
            results.append(result)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    for s in stores:
        s.close()
    assert len(results) == n
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert sorted(r.kind for r in results if isinstance(r, TokenClaim)) == \
        [ClaimKind.FIRST] + [ClaimKind.REUSED] * (n - 1)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"replay_key": ""}, "replay_key"),
    ({"binding": ALICE_KEY.upper()}, "binding"),
    ({"binding": "abc"}, "binding"),
    ({"now": float("nan")}, "now"),
    ({"expires_at": float("inf")}, "expires_at"),
    ({"expires_at": T0 - 1}, "in the past"),
])
def test_claim_arguments_are_checked(store: SqliteStateStore, kwargs: dict[str, object],
                                     message: str) -> None:
    args: dict[str, object] = {"replay_key": KEY, "binding": ALICE_KEY, "expires_at": EXP,
                               "now": T0} | kwargs
    with pytest.raises(ValueError, match=message):
        store.claim_token(**args)  # type: ignore[arg-type]
    # nothing was recorded
    assert store.claim_token(KEY, binding=ALICE_KEY, expires_at=EXP, now=T0) == FIRST


def test_result_values_are_consistent() -> None:
    with pytest.raises(ValueError):
        TokenClaim(kind=ClaimKind.RETRY)
    with pytest.raises(ValueError):
        TokenClaim(kind=ClaimKind.FIRST, certificate_pem=CERT)
    with pytest.raises(ValueError):
        RateDecision(allowed=False)
    with pytest.raises(ValueError):
        RateDecision(allowed=True, retry_after=1.0)


# --- rate limits ---------------------------------------------------------------------------


def test_rate_limit_allows_limit_then_refuses_then_allows_after_the_window(
        store: SqliteStateStore) -> None:
    key = "identity:corp/alice"
    for i in range(3):
        assert store.rate_limit(key, limit=3, per_seconds=60, now=T0 + i) == RateDecision(allowed=True)
    refused = store.rate_limit(key, limit=3, per_seconds=60, now=T0 + 10)
    assert not refused.allowed
    assert refused.retry_after == pytest.approx(50.0)  # the event at T0 leaves the window
    # refusals are not counted: hammering does not push the slot further away
    for _ in range(5):
        assert not store.rate_limit(key, limit=3, per_seconds=60, now=T0 + 59.5).allowed
    # other keys are independent
    assert store.rate_limit("addr:127.0.0.1", limit=3, per_seconds=60, now=T0 + 10).allowed
    # sliding: one slot frees at T0 + 60, the next at T0 + 61
    assert store.rate_limit(key, limit=3, per_seconds=60, now=T0 + 60).allowed
    again = store.rate_limit(key, limit=3, per_seconds=60, now=T0 + 60.5)
    assert not again.allowed
    assert again.retry_after == pytest.approx(0.5)
    # a whole window later, the full limit is available again
    for i in range(3):
        assert store.rate_limit(key, limit=3, per_seconds=60, now=T0 + 200 + i).allowed
    assert not store.rate_limit(key, limit=3, per_seconds=60, now=T0 + 203).allowed


def test_rate_limit_never_allows_a_double_burst_at_a_window_edge(store: SqliteStateStore) -> None:
    key = "addr:10.0.0.1"
    allowed = sum(store.rate_limit(key, limit=10, per_seconds=60, now=T0 + t / 10).allowed
                  for t in range(0, 1200))  # one attempt every 0.1 s for 120 s
    assert allowed == 20  # 10 per any 60 s, exactly


def test_rate_limit_state_is_purged_after_its_window(store: SqliteStateStore) -> None:
    for i in range(3):
        store.rate_limit("addr:127.0.0.1", limit=5, per_seconds=10, now=T0 + i)
    assert store.purge_expired(T0 + 10) == 1
    assert store.purge_expired(T0 + 12) == 2
    assert store.purge_expired(T0 + 12) == 0


@pytest.mark.parametrize(("limit", "per"), [(0, 60.0), (-1, 60.0), (True, 60.0), (3, 0.0),
                                            (3, -1.0), (3, float("nan"))])
def test_rate_limit_arguments_are_checked(store: SqliteStateStore, limit: int, per: float) -> None:
    with pytest.raises(ValueError):
        store.rate_limit("addr:127.0.0.1", limit=limit, per_seconds=per, now=T0)


# --- locks ---------------------------------------------------------------------------------


def _spec(kind: LockKind = LockKind.IDENTITY, value: str = "corp/mallory", *,
          until: float | None = None, reason: str = "stolen laptop",
          created_by: str = "corp/root") -> LockSpec:
    return LockSpec(kind=kind, value=value, until=until, reason=reason, created_by=created_by)


def test_add_list_and_remove_a_lock(store: SqliteStateStore) -> None:
    assert store.list_locks(now=T0) == []
    lock = store.add_lock(_spec(), now=T0)
    assert is_lock_id(lock.id)
    assert lock == Lock(id=lock.id, kind=LockKind.IDENTITY, value="corp/mallory", until=None,
                        reason="stolen laptop", created_by="corp/root", created_at=T0)
    group = store.add_lock(_spec(LockKind.GROUP, "contractors", until=T0 + 60, reason=""),
                           now=T0 + 1)
    assert group.id != lock.id
    assert store.list_locks(now=T0 + 2) == [lock, group]  # oldest first
    assert store.get_lock(group.id) == group
    assert store.remove_lock(lock.id) is True
    assert store.remove_lock(lock.id) is False  # gone
    assert store.get_lock(lock.id) is None
    assert store.list_locks(now=T0 + 2) == [group]
    # unknown and malformed ids are simply not there
    assert store.remove_lock("0" * 32) is False
    assert store.remove_lock("../../etc") is False
    assert store.get_lock("") is None


def test_a_lock_ends_at_its_until(store: SqliteStateStore) -> None:
    timed = store.add_lock(_spec(until=T0 + 100), now=T0)
    forever = store.add_lock(_spec(LockKind.GROUP, "contractors"), now=T0)
    assert store.list_locks(now=T0 + 99.9) == [timed, forever]
    assert store.list_locks(now=T0 + 100) == [forever]  # until is exclusive
    assert store.active_locks(now=T0 + 100).locks == (forever,)
    assert timed.is_active(T0 + 99.9) and not timed.is_active(T0 + 100)
    # the expired lock is still a row (it can be looked up) until purged
    assert store.get_lock(timed.id) == timed
    version = store.locks_version()
    assert store.purge_expired(T0 + 99) == 0
    assert store.purge_expired(T0 + 100) == 1
    assert store.get_lock(timed.id) is None
    assert store.list_locks(now=T0 + 10_000) == [forever]
    # expiry and purging change no decision: the version stays
    assert store.locks_version() == version


def test_a_lock_must_end_in_the_future(store: SqliteStateStore) -> None:
    with pytest.raises(ValueError, match="future"):
        store.add_lock(_spec(until=T0), now=T0)
    with pytest.raises(ValueError, match="future"):
        store.add_lock(_spec(until=T0 - 1), now=T0)
    with pytest.raises(ValueError, match="now"):
        store.add_lock(_spec(), now=float("nan"))
    with pytest.raises(ValueError, match="LockSpec"):
        store.add_lock("corp/mallory", now=T0)  # type: ignore[arg-type]
    assert store.list_locks(now=T0) == [] and store.locks_version() == 0


def test_locks_version_counts_every_add_and_remove(store: SqliteStateStore) -> None:
    assert store.locks_version() == 0
    a = store.add_lock(_spec(), now=T0)
    assert store.locks_version() == 1
    b = store.add_lock(_spec(LockKind.SERIAL, "0AFF"), now=T0)
    assert store.locks_version() == 2
    assert store.active_locks(now=T0).version == 2
    assert store.remove_lock(a.id)
    assert store.locks_version() == 3
    assert not store.remove_lock(a.id)  # nothing removed, nothing changed
    assert store.locks_version() == 3
    snapshot = store.active_locks(now=T0)
    assert snapshot.version == 3 and snapshot.locks == (b,)
    # reads never bump it
    store.list_locks(now=T0)
    store.get_lock(b.id)
    assert store.locks_version() == 3


def test_lock_set_matches_identity_group_and_serial(store: SqliteStateStore) -> None:
    by_identity = store.add_lock(_spec(LockKind.IDENTITY, "corp/mallory"), now=T0)
    by_group = store.add_lock(_spec(LockKind.GROUP, "contractors"), now=T0)
    by_serial = store.add_lock(_spec(LockKind.SERIAL, "00:0A:FF"), now=T0)
    assert by_serial.value == "aff"
    locks = store.active_locks(now=T0)
    assert len(locks) == 3 and list(locks) == [by_identity, by_group, by_serial]
    assert locks.match("corp/mallory", (), 0) == by_identity
    assert locks.match("corp/alice", ["eng", "contractors"], 0) == by_group
    assert locks.match("corp/alice", ("eng",), 0xAFF) == by_serial
    # the identity is checked first, then groups, then the serial
    assert locks.match("corp/mallory", ("contractors",), 0xAFF) == by_identity
    assert locks.match("corp/alice", ("contractors",), 0xAFF) == by_group
    # nothing else matches: not a prefix, not another provider, not case-folded
    for name, groups, serial in [("corp/alice", ("eng",), 0xAFE), ("corp/mallory2", (), 1),
                                 ("other/mallory", (), 0), ("corp/Mallory", (), 0),
                                 ("corp/alice", ("Contractors", "contractor"), 0xAFF0),
                                 ("corp/alice", (), 0), ("corp/alice", (), -0xAFF)]:
        assert locks.match(name, groups, serial) is None, (name, groups, serial)
    assert LockSet().match("corp/mallory", ("contractors",), 0xAFF) is None


def test_serial_zero_never_matches(store: SqliteStateStore) -> None:
    # enrollment matches with serial 0 (no certificate yet); no lock can hold serial 0
    with pytest.raises(ValueError, match="positive"):
        _spec(LockKind.SERIAL, "00")
    store.add_lock(_spec(LockKind.SERIAL, "1"), now=T0)
    assert store.active_locks(now=T0).match("corp/alice", (), 0) is None
    assert store.active_locks(now=T0).match("corp/alice", (), 1) is not None


def test_a_cached_lock_set_stops_matching_when_a_lock_expires(store: SqliteStateStore) -> None:
    short = store.add_lock(_spec(until=T0 + 10), now=T0)
    longer = store.add_lock(_spec(until=T0 + 20), now=T0)
    locks = store.active_locks(now=T0)
    assert locks.next_expiry == T0 + 10
    # of two locks on one value, the one that lasts longer answers
    assert locks.match("corp/mallory", (), 0, now=T0 + 5) == longer
    assert locks.match("corp/mallory", (), 0, now=T0 + 15) == longer
    assert locks.match("corp/mallory", (), 0, now=T0 + 20) is None
    assert locks.match("corp/mallory", (), 0) == longer  # without now: as read
    forever = store.add_lock(_spec(), now=T0)
    locks = store.active_locks(now=T0)
    assert locks.match("corp/mallory", (), 0, now=T0 + 10**6) == forever
    assert locks.next_expiry == T0 + 10
    assert store.active_locks(now=T0 + 30).next_expiry is None
    assert short.until == T0 + 10


@pytest.mark.parametrize(("kind", "value", "normal"), [
    (LockKind.SERIAL, "0AFF", "aff"),
    (LockKind.SERIAL, "0x00aFf", "aff"),
    (LockKind.SERIAL, "0a:ff", "aff"),
    (LockKind.SERIAL, " 1 ", "1"),
    (LockKind.SERIAL, "7f" + "ff" * 19, "7f" + "ff" * 19),
    (LockKind.IDENTITY, "corp/a/b c", "corp/a/b c"),
    (LockKind.IDENTITY, "breakglass/oncall", "breakglass/oncall"),
    (LockKind.GROUP, "Ops Team", "Ops Team"),
    ("group", "eng", "eng"),
])
def test_lock_values_are_normalised(kind: LockKind, value: str, normal: str) -> None:
    assert normalize_lock_value(kind, value) == normal
    assert _spec(LockKind(kind), value).value == normal


@pytest.mark.parametrize(("kind", "value", "message"), [
    (LockKind.SERIAL, "", "non-empty"),
    (LockKind.SERIAL, "xyz", "hexadecimal"),
    (LockKind.SERIAL, "-1", "hexadecimal"),
    (LockKind.SERIAL, "0a::ff", "hexadecimal"),
    (LockKind.SERIAL, "0", "positive"),
    (LockKind.SERIAL, "1" + "00" * 20, "20 octets"),
    (LockKind.SERIAL, "a" * 100_000 + "!", "hexadecimal"),  # long input: rejected fast
    (LockKind.IDENTITY, "mallory", "PROVIDER/SUBJECT"),
    (LockKind.IDENTITY, "corp/", "PROVIDER/SUBJECT"),
    (LockKind.IDENTITY, "/mallory", "PROVIDER/SUBJECT"),
    (LockKind.IDENTITY, "Corp/mallory", "PROVIDER/SUBJECT"),
    (LockKind.IDENTITY, "corp/mal\nlory", "control characters"),
    (LockKind.GROUP, "", "non-empty"),
    (LockKind.GROUP, "a" * 1025, "longer than"),
    (LockKind.GROUP, "eng\x00", "control characters"),
    ("user", "corp/mallory", "not a valid LockKind"),
])
def test_malformed_lock_values_are_refused(kind: LockKind, value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        normalize_lock_value(kind, value)


def test_lock_spec_checks_its_fields() -> None:
    assert _spec(reason="").reason == ""
    assert _spec(reason="x" * MAX_LOCK_REASON).reason == "x" * MAX_LOCK_REASON
    with pytest.raises(ValueError, match="longer than 500"):
        _spec(reason="x" * (MAX_LOCK_REASON + 1))
    with pytest.raises(ValueError, match="control characters"):
        _spec(reason="line one\nline two")
    with pytest.raises(ValueError, match="created_by"):
        _spec(created_by="")
    with pytest.raises(ValueError, match="until"):
        _spec(until=float("inf"))
    assert _spec(until=T0).until == T0 and isinstance(_spec(until=int(T0)).until, float)


def test_identity_provider_names_agree_with_the_identity_package() -> None:
    from l4proxy.identity import PROVIDER_NAME
    from l4proxy.store._base import _PROVIDER_NAME

    assert _PROVIDER_NAME.pattern == PROVIDER_NAME.pattern


def test_locks_survive_a_restart(state_dir: Path) -> None:
    with SqliteStateStore.open(state_dir) as store:
        kept = store.add_lock(_spec(until=T0 + 3600), now=T0)
        gone = store.add_lock(_spec(LockKind.GROUP, "contractors"), now=T0)
        assert store.remove_lock(gone.id)
    with SqliteStateStore.open(state_dir) as store:
        assert store.list_locks(now=T0 + 1) == [kept]
        assert store.locks_version() == 3  # the counter only grows, across restarts too
        assert store.active_locks(now=T0 + 1).match("corp/mallory", (), 0) == kept


def test_locks_are_shared_between_connections(state_dir: Path) -> None:
    # a gateway and the control plane (or an admin command) on one file
    with SqliteStateStore.open(state_dir) as gateway, SqliteStateStore.open(state_dir) as control:
        seen = gateway.locks_version()
        lock = control.add_lock(_spec(), now=T0)
        assert gateway.locks_version() == seen + 1
        assert gateway.active_locks(now=T0).match("corp/mallory", (), 0) == lock


def test_a_closed_store_refuses_lock_calls(store: SqliteStateStore) -> None:
    lock = store.add_lock(_spec(), now=T0)
    store.close()
    for call in (lambda: store.add_lock(_spec(), now=T0), lambda: store.list_locks(now=T0),
                 lambda: store.get_lock(lock.id), lambda: store.remove_lock(lock.id),
                 lambda: store.active_locks(now=T0), lambda: store.locks_version()):
        with pytest.raises(StoreError, match="closed"):
            call()


# --- the file, the schema and migrations ---------------------------------------------------


def test_files_are_private_and_in_wal_mode(state_dir: Path, store: SqliteStateStore) -> None:
    _issue(store)
    store.rate_limit("addr:127.0.0.1", limit=1, per_seconds=1, now=T0)
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    path = state_dir / STATE_FILE_NAME
    assert store.path == path
    files = sorted(p.name for p in state_dir.iterdir())
    assert STATE_FILE_NAME in files and f"{STATE_FILE_NAME}-wal" in files
    for name in files:
        assert stat.S_IMODE((state_dir / name).stat().st_mode) == 0o600, name
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("PRAGMA application_id").fetchone() == (APPLICATION_ID,)
    db.close()


def test_a_loose_existing_file_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    path.touch(mode=0o644)
    os.chmod(path, 0o644)
    with SqliteStateStore(path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_schema_version_is_recorded(state_dir: Path, store: SqliteStateStore) -> None:
    assert SCHEMA_VERSION == len(MIGRATIONS) >= 1
    assert store.schema_version == SCHEMA_VERSION
    with sqlite3.connect(state_dir / STATE_FILE_NAME) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    db.close()


def test_migrations_from_an_empty_file_reach_the_current_version(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    path.write_bytes(b"")  # an empty file is an empty database
    with SqliteStateStore(path) as store:
        assert store.schema_version == SCHEMA_VERSION
    with sqlite3.connect(path) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    db.close()
    assert {"token_claims", "rate_events", "write_probe", "locks", "lock_version"} <= tables
    # reopening an up-to-date store migrates nothing and keeps the data
    with SqliteStateStore(path) as store:
        _issue(store)
    with SqliteStateStore(path) as store:
        assert store.schema_version == SCHEMA_VERSION
        assert store.claim_token(KEY, binding=OTHER_KEY, expires_at=EXP, now=T0 + 2) == REUSED


def test_a_version_1_store_is_migrated_and_keeps_its_data(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    try:
        assert _migrate(db, MIGRATIONS[:1], path=path) == 1  # what the first release created
        db.execute("INSERT INTO token_claims (replay_key, binding, claimed_at, expires_at) "
                   "VALUES (?, ?, ?, ?)", (KEY, ALICE_KEY, T0, EXP))
    finally:
        db.close()
    with SqliteStateStore(path) as store:
        assert store.schema_version == SCHEMA_VERSION == 3
        # the replay record survived the migration
        assert store.claim_token(KEY, binding=ALICE_KEY, expires_at=EXP, now=T0 + 1) == REUSED
        assert store.locks_version() == 0 and store.list_locks(now=T0) == []
        lock = store.add_lock(_spec(), now=T0)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (3,)
        assert db.execute("SELECT id, kind, value FROM locks").fetchall() == \
            [(lock.id, "identity", "corp/mallory")]
    db.close()


def test_each_migration_is_one_transaction(tmp_path: Path) -> None:
    migrations = (
        "CREATE TABLE a (x INTEGER);",
        "CREATE TABLE b (x TEXT DEFAULT 'semi;colon'); INSERT INTO b VALUES ('x;y');",
        "CREATE TABLE c (x INTEGER); INSERT INTO no_such_table VALUES (1);",
    )
    db = sqlite3.connect(tmp_path / "m.sqlite3", isolation_level=None)
    try:
        with pytest.raises(sqlite3.OperationalError, match="no_such_table"):
            _migrate(db, migrations, path=tmp_path / "m.sqlite3")
        assert not db.in_transaction
        assert db.execute("PRAGMA user_version").fetchone() == (2,)
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert tables == {"a", "b"}  # c was rolled back with its migration
        assert db.execute("SELECT x FROM b").fetchall() == [("x;y",)]
        # fixed, the remaining migration applies from version 2
        fixed = (*migrations[:2], "CREATE TABLE c (x INTEGER);")
        assert _migrate(db, fixed, path=tmp_path / "m.sqlite3") == 3
        with pytest.raises(SchemaTooNew):
            _migrate(db, fixed[:2], path=tmp_path / "m.sqlite3")
    finally:
        db.close()


def test_statement_splitting_respects_literals_and_triggers() -> None:
    script = """
    CREATE TABLE t (x TEXT);
    CREATE TRIGGER t_ins AFTER INSERT ON t BEGIN SELECT 1; SELECT 2; END;
    INSERT INTO t VALUES ('a;b');
    """
    assert len(_statements(script)) == 3
    with pytest.raises(ValueError, match="incomplete"):
        _statements("CREATE TABLE t (x TEXT); CREATE TABLE u (x")


def test_a_newer_schema_is_refused_and_left_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    db.execute("CREATE TABLE from_the_future (x)")
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 7}")
    db.commit()
    db.close()
    before = path.read_bytes()
    with pytest.raises(SchemaTooNew) as info:
        SqliteStateStore(path)
    assert info.value.found == SCHEMA_VERSION + 7
    assert info.value.supported == SCHEMA_VERSION
    assert f"version {SCHEMA_VERSION + 7}" in str(info.value)
    assert f"up to {SCHEMA_VERSION}" in str(info.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.sqlite3"]


@pytest.mark.parametrize("content", [b"garbage", os.urandom(8192),
                                     b"SQLite format 3\x00" + b"\xff" * 4000])
def test_a_file_that_is_not_a_database_is_corrupt(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "state.sqlite3"
    path.write_bytes(content)
    with pytest.raises(StoreCorrupt):
        SqliteStateStore(path)
    assert path.read_bytes() == content


def test_another_programs_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE users (name TEXT)")
    db.commit()
    db.close()
    with pytest.raises(StoreCorrupt, match="not an l4proxy state store"):
        SqliteStateStore(path)


def test_a_store_path_that_is_a_directory_is_an_error(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE_NAME).mkdir()
    with pytest.raises(StoreError):
        SqliteStateStore.open(tmp_path)


# --- health and lifecycle ------------------------------------------------------------------


def test_check_writable(state_dir: Path, store: SqliteStateStore) -> None:
    store.check_writable()
    store.check_writable()
    (state_dir / STATE_FILE_NAME).unlink()
    with pytest.raises(StoreError, match="gone"):
        store.check_writable()


def test_a_closed_store_says_so(store: SqliteStateStore) -> None:
    store.close()
    store.close()  # idempotent
    for call in (lambda: store.check_writable(),
                 lambda: store.purge_expired(T0),
                 lambda: store.locks_version(),
                 lambda: store.claim_token(KEY, binding=ALICE_KEY, expires_at=EXP, now=T0),
                 lambda: store.rate_limit("k", limit=1, per_seconds=1, now=T0)):
        with pytest.raises(StoreError, match="closed"):
            call()


def test_public_surface_is_explicit() -> None:
    names = l4proxy.store.__all__
    assert len(names) == len(set(names))
    assert all(hasattr(l4proxy.store, name) for name in names)
    public = {n for n, v in vars(l4proxy.store).items()
              if not n.startswith("_") and not isinstance(v, types.ModuleType)}
    assert public == set(names)


# --- the async wrapper ---------------------------------------------------------------------


class _ThreadRecordingStore(SqliteStateStore):
    """A real SQLite store that notes which thread each call ran in."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.threads: set[int] = set()

    def claim_token(self, replay_key: str, *, binding: str, expires_at: float,
                    now: float) -> TokenClaim:
        self.threads.add(threading.get_ident())
        return super().claim_token(replay_key, binding=binding, expires_at=expires_at, now=now)


async def test_async_wrapper_gives_the_same_results(state_dir: Path) -> None:
    async with AsyncStateStore(SqliteStateStore.open(state_dir)) as store:
        assert store.schema_version == SCHEMA_VERSION
        assert await store.claim_token(KEY, binding=ALICE_KEY, expires_at=EXP, now=T0) == FIRST
        assert await store.claim_token(KEY, binding=ALICE_KEY, expires_at=EXP, now=T0) == REUSED
        await store.record_issued(KEY, certificate_pem=CERT, now=T0 + 1)
        assert await store.claim_token(KEY, binding=ALICE_KEY, expires_at=EXP, now=T0 + 2) == RETRY
        assert await store.claim_token(KEY, binding=OTHER_KEY, expires_at=EXP, now=T0 + 2) == REUSED
        assert await store.rate_limit("k", limit=1, per_seconds=10, now=T0) == RateDecision(allowed=True)
        assert await store.rate_limit("k", limit=1, per_seconds=10, now=T0 + 4) == \
            RateDecision(allowed=False, retry_after=6.0)
        await store.check_writable()
        assert await store.purge_expired(EXP + 1) == 2
        with pytest.raises(ValueError):
            await store.rate_limit("k", limit=0, per_seconds=10, now=T0)
        # locks
        assert await store.locks_version() == 0
        lock = await store.add_lock(_spec(until=T0 + 60), now=T0)
        assert await store.list_locks(now=T0) == [lock]
        assert await store.get_lock(lock.id) == lock
        locks = await store.active_locks(now=T0)
        assert locks.version == await store.locks_version() == 1
        assert locks.match("corp/mallory", (), 0) == lock
        assert await store.remove_lock(lock.id) is True
        assert await store.remove_lock(lock.id) is False
        assert (await store.active_locks(now=T0)).match("corp/mallory", (), 0) is None
        assert await store.locks_version() == 2
    with pytest.raises(StoreError, match="closed"):
        await store.check_writable()


async def test_async_calls_run_off_the_event_loop_and_claims_stay_single(tmp_path: Path) -> None:
    sync_store = _ThreadRecordingStore(tmp_path / "state.sqlite3")
    results: list[TokenClaim] = []

    async def claim(astore: AsyncStateStore) -> None:
        results.append(await astore.claim_token(KEY, binding=ALICE_KEY, expires_at=EXP, now=T0))

    async with AsyncStateStore(sync_store) as astore:
        assert astore.store is sync_store
        async with trio.open_nursery() as nursery:
            for _ in range(16):
                nursery.start_soon(claim, astore)
    assert sorted(r.kind for r in results) == [ClaimKind.FIRST] + [ClaimKind.REUSED] * 15
    assert sync_store.threads and threading.get_ident() not in sync_store.threads


# --- the session index ---------------------------------------------------------------------


def test_session_index_open_close_and_reopen(tmp_path: Path) -> None:
    from l4proxy.store import SessionRecord

    path = tmp_path / "state.sqlite3"
    with SqliteStateStore(path) as store:
        assert store.schema_version >= 3
        store.index_session_start(SessionRecord(
            session_id="s1", identity="dev/alice", email="a@example.com", groups=("eng",),
            target="chunks", client_address="127.0.0.1", started_at=100.0, file="r/s1.l4rec.zst"))
        store.index_session_start(SessionRecord(
            session_id="s2", identity="dev/bob", target="chunks", client_address="127.0.0.1",
            started_at=101.0))
        assert [r.session_id for r in store.open_sessions()] == ["s1", "s2"]
        store.index_session_end("s1", ended_at=110.0, end_reason="client closed",
                                bytes_to_gateway=10, bytes_to_client=20, requests=3, denials=1,
                                trailer_head=b"h" * 32, trailer_sig=b"s" * 64)
        with pytest.raises(StoreError):
            store.index_session_end("nope", ended_at=1.0, end_reason="x", bytes_to_gateway=0,
                                    bytes_to_client=0)
        with pytest.raises(StoreError):  # a session id is indexed once
            store.index_session_start(SessionRecord(session_id="s2", identity="x", target="t",
                                                    client_address="-", started_at=1.0))
        # index rows commit without an fsync; everything else stays synchronous=FULL (2),
        # also after an index write failed
        assert store._db is not None
        assert store._db.execute("PRAGMA synchronous").fetchone() == (2,)
    with SqliteStateStore(path) as store:  # persists across a restart
        assert [r.session_id for r in store.open_sessions()] == ["s2"]
        s1 = store.get_session("s1")
        assert s1 is not None and s1.groups == ("eng",) and s1.trailer_head == b"h" * 32
        assert (s1.ended_at, s1.requests, s1.denials, s1.bytes_to_client) == (110.0, 3, 1, 20)
        assert store.get_session("missing") is None
