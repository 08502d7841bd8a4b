"""The ``chunk`` command line against a real chunkd (a subprocess), a scripted peer and TLS.

Most tests call ``main([...])`` in-process (it runs ``trio.run`` itself, so these tests are
sync) and read stdout/stderr as bytes; stdin pipes, Ctrl-C and terminals use a real
``python -m l4proxy.client.cli`` subprocess. Every run asserts that the API key never
shows up in what the CLI printed. All waits are bounded.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import pty
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from l4proxy.client.cli import (
    ExitCode,
    UsageError,
    clean,
    format_notice,
    main,
    parse_rows,
    parse_server,
    parse_where,
    render_table,
)
from l4proxy.netaddr import free_loopback_port
from l4proxy.wire import (
    NEED_DATA,
    Cancel,
    Connection,
    ConnectionClosed,
    Error,
    ErrorCode,
    Event,
    Hello,
    Notice,
    NoticeKind,
    Request,
    Result,
    Role,
    Welcome,
)

from .conftest import ChunkdProcess, spawn_chunkd, stop_process, write_private

SUBPROCESS_TIMEOUT = 30.0


@dataclass
class Run:
    code: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode()

    @property
    def err(self) -> str:
        return self.stderr.decode()

    def json(self) -> object:
        return json.loads(self.out)

    def json_lines(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.out.splitlines()]


def _check_clean(run: Run, secret: str) -> Run:
    assert secret.encode() not in run.stdout + run.stderr, "the API key was printed"
    assert b"Traceback" not in run.stderr
    return run


CLI = Callable[..., Run]


def _in_process(capture: pytest.CaptureFixture[bytes], secret: str, prefix: list[str]) -> CLI:
    def run(*args: str, connect: bool = True) -> Run:
        capture.readouterr()
        code = main([*(prefix if connect else []), *args])
        out, err = capture.readouterr()
        return _check_clean(Run(code, out, err), secret)

    return run


@pytest.fixture
def cli(chunkd_process: ChunkdProcess, capsysbinary: pytest.CaptureFixture[bytes]) -> CLI:
    """Run ``chunk`` in-process against the chunkd subprocess (address and key file given
    unless ``connect=False``)."""
    return _in_process(capsysbinary, chunkd_process.api_key, [
        "--server", chunkd_process.address, "--api-key-file", str(chunkd_process.api_key_file)])


@pytest.fixture
def offline_cli(capsysbinary: pytest.CaptureFixture[bytes], api_key: str, api_key_file: Path) -> CLI:
    """Run ``chunk`` in-process with a key file but no server (for usage errors)."""
    return _in_process(capsysbinary, api_key, ["--api-key-file", str(api_key_file)])


def run_subprocess(args: Sequence[str], *, secret: str, stdin: bytes | None = None,
                   env: dict[str, str] | None = None) -> Run:
    proc = subprocess.run([sys.executable, "-m", "l4proxy.client.cli", *args], input=stdin,
                          capture_output=True, timeout=SUBPROCESS_TIMEOUT,
                          env={**os.environ, **(env or {})})
    return _check_clean(Run(proc.returncode, proc.stdout, proc.stderr), secret)


# --- objects -----------------------------------------------------------------------------------


def test_objects_round_trip_human(cli: CLI, tmp_path: Path) -> None:
    body = os.urandom(300_000)
    src = tmp_path / "cat.jpg"
    src.write_bytes(body)
    sha = hashlib.sha256(body).hexdigest()

    ping = cli("ping")
    assert ping.code == 0 and ping.out.startswith("pong from chunkd in ")
    assert cli("create-bucket", "photos").out == "created bucket photos\n"
    assert cli("list-buckets").out == "photos\n"
    put = cli("put", "photos", "2026/cat.jpg", str(src))
    assert put.code == 0
    assert put.out == f"put photos/2026/cat.jpg: 293.0 KiB (300000 bytes), sha256 {sha}\n"
    assert put.err == ""  # no progress bar: stderr is not a terminal
    assert cli("put", "photos", "empty", os.devnull).out.startswith("put photos/empty: 0 B, sha256 e3b0")

    stat = cli("stat", "photos", "2026/cat.jpg").out.splitlines()
    assert stat[:4] == ["bucket:    photos", "key:       2026/cat.jpg",
                        "size:      293.0 KiB (300000 bytes)", f"sha256:    {sha}"]
    assert stat[4].startswith("modified:  20") and stat[4].endswith(" UTC")

    listing = cli("list", "photos").out.splitlines()
    assert listing[0].split() == ["KEY", "SIZE", "MODIFIED", "SHA256"]
    assert listing[-1] == "2 objects"
    rows = listing[1:-1]
    assert [r.split()[0] for r in rows] == ["2026/cat.jpg", "empty"]
    # aligned: numbers and times end under their header, the sha256 starts under its header
    header = listing[0]
    assert [r.index(r.split()[-1]) for r in rows] == [header.index("SHA256")] * 2
    assert [r.index(" UTC") + 4 for r in rows] == [header.index("MODIFIED") + len("MODIFIED")] * 2
    assert [r.index(size) + len(size) for r, size in zip(rows, ["293.0 KiB", "0 B"], strict=True)] == [
        header.index("SIZE") + len("SIZE")] * 2
    limited = cli("list", "photos", "--prefix", "2026/", "--limit", "0").out.splitlines()
    assert limited[-1] == "0 objects (more exist; raise --limit)"

    out_file = tmp_path / "out" / "cat.jpg"
    out_file.parent.mkdir()
    saved = cli("get", "photos", "2026/cat.jpg", "-o", str(out_file))
    assert saved.code == 0 and out_file.read_bytes() == body
    assert saved.out == f"saved photos/2026/cat.jpg to {out_file}: 293.0 KiB (300000 bytes), sha256 {sha}\n"
    assert os.listdir(out_file.parent) == ["cat.jpg"]  # the temporary file is gone
    to_stdout = cli("get", "photos", "2026/cat.jpg")
    assert to_stdout.code == 0 and to_stdout.stdout == body and to_stdout.stderr == b""
    part = cli("get", "photos", "2026/cat.jpg", "--offset", "1KiB", "--length", "10")
    assert part.stdout == body[1024:1034]

    chunks = cli("chunk", "photos", "2026/cat.jpg", "--strategy", "fixed", "--size", "64KiB").out.splitlines()
    assert chunks[0].split() == ["INDEX", "OFFSET", "LENGTH", "SHA256"]
    assert [r.split()[:4] for r in chunks[1:3]] == [
        ["0", "0", "64.0", "KiB"], ["1", "65536", "64.0", "KiB"]]
    assert chunks[1].split()[4] == hashlib.sha256(body[:65536]).hexdigest()
    assert chunks[-1] == "5 chunks, 293.0 KiB"
    assert cli("create-bucket", "pieces").code == 0
    stored = cli("chunk", "photos", "2026/cat.jpg", "--avg-size", "16384", "--into", "pieces").out
    summary = stored.splitlines()[-1]
    n = int(summary.split()[0])
    assert summary == f"{n} chunks, 293.0 KiB, {n} new stored in pieces"

    assert cli("delete", "photos", "empty").out == "deleted photos/empty\n"
    assert cli("delete-bucket", "photos", "--force").out == "deleted bucket photos (1 object)\n"
    assert cli("list-buckets").out == "pieces\n"


def test_objects_round_trip_json(cli: CLI, tmp_path: Path) -> None:
    body = os.urandom(70_000)
    src = tmp_path / "blob"
    src.write_bytes(body)
    sha = hashlib.sha256(body).hexdigest()

    ping = cli("--json", "ping").json()
    assert isinstance(ping, dict) and ping.keys() == {"server", "session", "time", "rtt_ms"}
    assert ping["server"] == "chunkd"
    assert cli("create-bucket", "b", "--json").json() == {"bucket": "b"}  # global option after
    assert cli("--json", "list-buckets").json() == {"buckets": ["b"]}
    assert cli("--json", "put", "b", "k", str(src)).json() == {
        "bucket": "b", "key": "k", "size": 70_000, "sha256": sha}
    st = cli("--json", "stat", "b", "k").json()
    assert isinstance(st, dict) and isinstance(st.pop("modified"), float)
    assert st == {"bucket": "b", "key": "k", "size": 70_000, "sha256": sha}

    listing = cli("--json", "list", "b").json_lines()
    assert [set(r) for r in listing[:-1]] == [{"key", "size", "sha256", "modified"}]
    assert (listing[0]["key"], listing[0]["size"], listing[0]["sha256"]) == ("k", 70_000, sha)
    assert listing[-1] == {"result": {"count": 1, "truncated": False}}

    target = tmp_path / "got"
    assert cli("--json", "get", "b", "k", "-o", str(target)).json() == {
        "bucket": "b", "key": "k", "size": 70_000, "sha256": sha, "file": str(target)}
    assert target.read_bytes() == body
    raw = cli("--json", "get", "b", "k")  # without -o stdout holds only the bytes
    assert raw.stdout == body

    lines = cli("--json", "chunk", "b", "k", "--strategy", "fixed", "--size", "32KiB").json_lines()
    assert lines[:-1] == [
        {"index": i, "offset": i * 32768, "length": len(body[i * 32768:(i + 1) * 32768]),
         "sha256": hashlib.sha256(body[i * 32768:(i + 1) * 32768]).hexdigest()} for i in range(3)]
    assert lines[-1] == {"result": {"chunks": 3, "bytes": 70_000, "stored": 0}}

    assert cli("--json", "delete", "b", "k").json() == {"bucket": "b", "key": "k"}
    assert cli("--json", "delete-bucket", "b").json() == {"bucket": "b", "deleted_objects": 0}


# --- tables ------------------------------------------------------------------------------------


def test_tables_round_trip_human_and_json(cli: CLI, tmp_path: Path) -> None:
    created = cli("create-table", "events", "id:int", "who:text", "score:float", "ok:bool", "blob:bytes")
    assert created.out == "created table events\n"
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        '{"id": 1, "who": "ann", "score": 1.5, "ok": true, "blob": {"$base64": "AAEC"}}\n'
        "\n"
        '{"blob": null, "ok": false, "score": 2.0, "who": "bob\\u001b[31m", "id": 2}\n'
        '{"id": 3, "who": "7", "score": null, "ok": true, "blob": {"$base64": "' + "A" * 40 + '"}}\n')
    assert cli("insert", "events", str(rows)).out == "inserted 3 rows into events\n"

    table = cli("scan", "events").out.splitlines()
    assert table[0].split() == ["ID", "WHO", "SCORE", "OK", "BLOB"]
    assert table[1].split() == ["1", "ann", "1.5", "true", "0x000102"]
    assert table[2].split() == ["2", "bob\\x1b[31m", "2.0", "false", "NULL"]  # no raw escape
    assert table[3].split() == ["3", "7", "NULL", "true", "<30", "bytes>"]
    assert table[-1] == "3 rows"

    lines = cli("--json", "scan", "events").json_lines()
    assert lines[0] == {"id": 1, "who": "ann", "score": 1.5, "ok": True, "blob": {"$base64": "AAEC"}}
    assert lines[1]["who"] == "bob\x1b[31m" and lines[1]["blob"] is None
    assert lines[-1] == {"result": {"rows": 3, "truncated": False}}

    # where values: JSON when they parse (true, 2, "7"), else plain text (ann)
    assert cli("--json", "scan", "events", "--where", "ok=true", "--columns", "id",
               "--limit", "1").json_lines() == [{"id": 1}, {"result": {"rows": 1, "truncated": True}}]
    assert cli("--json", "scan", "events", "--where", "who=ann", "--where", "ok=true",
               "--columns", "id,who").json_lines()[0] == {"id": 1, "who": "ann"}
    assert cli("--json", "scan", "events", "--where", "id=2",
               "--columns", "who").json_lines()[0] == {"who": "bob\x1b[31m"}
    assert cli("--json", "scan", "events", "--where", 'who="7"',
               "--columns", "id").json_lines()[0] == {"id": 3}
    assert cli("--json", "scan", "events", "--where", "score=null",
               "--columns", "id").json_lines()[0] == {"id": 3}
    assert cli("--json", "scan", "events", "--where", 'blob={"$base64": "AAEC"}',
               "--columns", "id").json_lines()[0] == {"id": 1}
    mismatch = cli("scan", "events", "--where", "who=3")  # 3 is an int, who is text
    assert mismatch.code == ExitCode.SERVER_ERROR and "INVALID_ARGUMENT" in mismatch.err

    assert cli("--json", "insert", "events", str(rows)).json() == {"table": "events", "inserted": 3}
    assert cli("--json", "drop-table", "events").json() == {"table": "events"}
    assert cli("--json", "create-table", "t", "a:text").json() == {"table": "t"}
    assert cli("drop-table", "t").out == "dropped table t\n"


def test_put_and_insert_from_stdin_in_process(cli: CLI, monkeypatch: pytest.MonkeyPatch) -> None:
    body = os.urandom(5000)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(body)))
    assert cli("create-bucket", "b").code == 0
    assert cli("--json", "put", "b", "from-stdin", "-").json() == {
        "bucket": "b", "key": "from-stdin", "size": 5000, "sha256": hashlib.sha256(body).hexdigest()}
    assert cli("get", "b", "from-stdin").stdout == body

    assert cli("create-table", "t", "n:int").code == 0
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'{"n": 1}\n{"n": 2}\n')))
    assert cli("insert", "t", "-").out == "inserted 2 rows into t\n"
    assert cli("--json", "scan", "t").json_lines()[:2] == [{"n": 1}, {"n": 2}]


def test_stdin_stdout_and_environment_in_a_subprocess(chunkd_process: ChunkdProcess) -> None:
    env = {"CHUNK_SERVER": chunkd_process.address, "CHUNK_API_KEY_FILE": str(chunkd_process.api_key_file),
           "CHUNK_REASON": "ticket OPS-1"}
    key = chunkd_process.api_key
    body = os.urandom(3 * (1 << 20) + 17)  # several frames
    assert run_subprocess(["create-bucket", "b"], secret=key, env=env).code == 0
    put = run_subprocess(["put", "b", "big", "-"], secret=key, env=env, stdin=body)
    assert put.code == 0, put.err
    assert put.out == f"put b/big: 3.0 MiB ({len(body)} bytes), sha256 {hashlib.sha256(body).hexdigest()}\n"
    got = run_subprocess(["get", "b", "big"], secret=key, env=env)
    assert got.code == 0 and got.stdout == body
    # a flag wins over its environment variable
    nowhere = f"127.0.0.1:{free_loopback_port()}"
    refused = run_subprocess(["ping"], secret=key, env={**env, "CHUNK_SERVER": nowhere})
    assert refused.code == ExitCode.CONNECTION_ERROR
    assert run_subprocess(["--server", chunkd_process.address, "ping"], secret=key,
                          env={**env, "CHUNK_SERVER": f"127.0.0.1:{free_loopback_port()}"}).code == 0


def test_environment_variables_stand_in_for_flags(cli: CLI, chunkd_process: ChunkdProcess,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHUNK_SERVER", chunkd_process.address)
    monkeypatch.setenv("CHUNK_API_KEY_FILE", str(chunkd_process.api_key_file))
    monkeypatch.setenv("CHUNK_REASON", "because")
    run = cli("-v", "create-bucket", "envb", connect=False)
    assert run.code == 0 and run.out == "created bucket envb\n"
    assert run.err.startswith("chunk: session ") and "(server chunkd)" in run.err
    monkeypatch.setenv("CHUNK_SERVER", "not an address")
    bad = cli("ping", connect=False)
    assert bad.code == ExitCode.USAGE and bad.err.startswith("chunk: CHUNK_SERVER: expected HOST:PORT")
    monkeypatch.delenv("CHUNK_API_KEY_FILE")
    monkeypatch.setenv("CHUNK_SERVER", chunkd_process.address)
    no_key = cli("ping", connect=False)
    assert no_key.code == ExitCode.SERVER_ERROR and "AUTH_FAILED" in no_key.err


# --- errors and exit codes -------------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    ([], "the following arguments are required: SUBCOMMAND"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["chunk", "b", "k", "--size", "12XB"], "not a size: '12XB'"),
    (["chunk", "b", "k", "--size", "64KiB"], "--size: only applies to strategy 'fixed'"),
    (["chunk", "b", "k", "--avg-size", "1000"], "--avg-size: must be a power of two"),
    (["get", "b", "k", "--offset", "lots"], "not a size: 'lots'"),
    (["list", "b", "--limit", "-1"], "must not be negative"),
    (["create-table", "t", "a:decimal"], "TYPE one of text, int, float, bool, bytes"),
    (["scan", "t", "--where", "novalue"], "--where expects COLUMN=VALUE"),
    (["--server", "a:b:c", "ping"], "--server: expected HOST:PORT"),
    (["--key", "client.key", "ping"], "--key (CHUNK_KEY) needs --cert (CHUNK_CERT)"),
    (["--ca-file", "/nonexistent/ca.pem", "ping"], "cannot load CA file /nonexistent/ca.pem"),
    (["--api-key-file", "/nonexistent/key", "ping"], "cannot read API key file /nonexistent/key"),
    (["put", "b", "k", "/nonexistent/file"], "cannot read /nonexistent/file"),
    (["get", "b", "k", "-o", "/nonexistent/dir/file"], "directory /nonexistent/dir does not exist"),
    (["insert", "t", "/nonexistent/rows"], "cannot read /nonexistent/rows"),
])
def test_usage_errors_exit_1(offline_cli: CLI, args: list[str], message: str) -> None:
    run = offline_cli(*args)
    assert run.code == ExitCode.USAGE and run.stdout == b""
    last = run.err.splitlines()[-1]
    assert last.startswith("chunk: ") and message in last


def test_bad_insert_input_names_the_line(cli: CLI, tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"a": 1, "b": 2}\n{"a": 1}\n')
    run = cli("insert", "t", str(rows))
    assert run.code == ExitCode.USAGE
    assert run.err == f"chunk: {rows}:2: missing 'b' (every line needs the keys of the first line)\n"
    rows.write_text('{"a": 1}\n[1]\n')
    assert cli("insert", "t", str(rows)).err == f"chunk: {rows}:2: expected a JSON object per line\n"
    rows.write_text("{nope\n")
    assert cli("insert", "t", str(rows)).err.startswith(f"chunk: {rows}:1: not valid JSON")


def test_help_documents_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "exit codes:" in text and "CHUNK_API_KEY_FILE" in text
    for code in range(9):
        assert f"\n  {code}  " in text
    assert main(["scan", "--help"]) == 0
    assert "--where COL=VALUE" in capsys.readouterr().out


def test_server_errors_exit_2(cli: CLI, chunkd_process: ChunkdProcess, tmp_path: Path) -> None:
    missing = cli("stat", "nope", "k")
    assert missing.code == ExitCode.SERVER_ERROR
    assert missing.err == "chunk: NOT_FOUND: bucket 'nope' does not exist\n" and missing.stdout == b""
    assert cli("get", "nope", "k", "-o", str(tmp_path / "x")).code == ExitCode.SERVER_ERROR
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))
    wrong_key = "ck_wrong_" + "x" * 20
    wrong = write_private(tmp_path / "wrong.key", wrong_key + "\n")
    denied = cli("--server", chunkd_process.address, "--api-key-file", str(wrong), "ping", connect=False)
    assert denied.code == ExitCode.SERVER_ERROR and denied.err == "chunk: AUTH_FAILED: invalid API key\n"
    assert wrong_key not in denied.out + denied.err


def test_failed_download_leaves_no_file(cli: CLI, tmp_path: Path) -> None:
    out = tmp_path / "dl" / "file"
    out.parent.mkdir()
    assert cli("create-bucket", "b").code == 0
    run = cli("get", "b", "missing", "-o", str(out))
    assert run.code == ExitCode.SERVER_ERROR and "NOT_FOUND" in run.err
    assert os.listdir(out.parent) == []


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_key_file_readable_by_others_is_refused(cli: CLI, chunkd_process: ChunkdProcess,
                                                tmp_path: Path, mode: int) -> None:
    loose = tmp_path / "loose.key"
    shutil.copy(chunkd_process.api_key_file, loose)
    loose.chmod(mode)
    run = cli("--server", chunkd_process.address, "--api-key-file", str(loose), "ping", connect=False)
    assert run.code == ExitCode.USAGE
    assert run.err == (f"chunk: API key file {loose} is accessible by group or others "
                       f"(mode {mode:04o}); run: chmod 600 {loose}\n")


def test_connection_errors_exit_7(cli: CLI, chunkd_process: ChunkdProcess) -> None:
    nothing = cli("--server", f"127.0.0.1:{free_loopback_port()}", "ping", connect=False)
    assert nothing.code == ExitCode.CONNECTION_ERROR
    assert nothing.err.startswith("chunk: cannot connect to 127.0.0.1:")
    tls_to_plain = cli("--tls", "ping")
    assert tls_to_plain.code == ExitCode.CONNECTION_ERROR and "TLS error" in tls_to_plain.err


# --- TLS -----------------------------------------------------------------------------------------


@dataclass
class Pki:
    ca: Path
    other_ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _mint_ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(minutes=10))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def _mint_leaf(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, cn: str,
               usage: x509.ObjectIdentifier,
               dns: str | None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(minutes=10))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, key_cert_sign=False, crl_sign=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if dns is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A throwaway CA, a server certificate for chunkd.test, a client certificate, and an
    unrelated CA; all valid for ten minutes."""
    ca, ca_key = _mint_ca("chunk test CA")
    other, _ = _mint_ca("some other CA")
    server, server_key = _mint_leaf(ca, ca_key, "chunkd.test", ExtendedKeyUsageOID.SERVER_AUTH, "chunkd.test")
    client, client_key = _mint_leaf(ca, ca_key, "alice", ExtendedKeyUsageOID.CLIENT_AUTH, None)
    pem = serialization.Encoding.PEM
    d = tmp_path / "pki"
    d.mkdir()
    for cert in (ca, server, client):  # the extensions the verifiers rely on
        assert cert.extensions.get_extension_for_class(x509.BasicConstraints).critical
        assert cert.extensions.get_extension_for_class(x509.KeyUsage).critical
    (d / "ca.pem").write_bytes(ca.public_bytes(pem))
    (d / "other-ca.pem").write_bytes(other.public_bytes(pem))
    (d / "server.pem").write_bytes(server.public_bytes(pem))
    (d / "client.pem").write_bytes(client.public_bytes(pem))
    return Pki(ca=d / "ca.pem", other_ca=d / "other-ca.pem", server_cert=d / "server.pem",
               server_key=write_private(d / "server.key", _pem_key(server_key)),
               client_cert=d / "client.pem",
               client_key=write_private(d / "client.key", _pem_key(client_key)))


@contextlib.contextmanager
def tls_chunkd(tmp_path: Path, api_key_file: Path, pki: Pki) -> Iterator[int]:
    proc, port = spawn_chunkd(tmp_path, ["--data", str(tmp_path / "tls-data"),
                                         "--api-key-file", str(api_key_file),
                                         "--tls-cert", str(pki.server_cert),
                                         "--tls-key", str(pki.server_key)])
    try:
        yield port
    finally:
        stop_process(proc)


def test_tls_with_ca_file_server_name_and_client_cert(
        tmp_path: Path, api_key: str, api_key_file: Path, pki: Pki,
        capsysbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    def run(*args: str) -> Run:
        capsysbinary.readouterr()
        code = main(list(args))
        out, err = capsysbinary.readouterr()
        return _check_clean(Run(code, out, err), api_key)

    with tls_chunkd(tmp_path, api_key_file, pki) as port:
        server = f"127.0.0.1:{port}"
        common = ["--server", server, "--api-key-file", str(api_key_file)]
        ok = run(*common, "--ca-file", str(pki.ca), "--server-name", "chunkd.test",
                 "--cert", str(pki.client_cert), "--key", str(pki.client_key), "--json", "ping")
        assert ok.code == 0, ok.err
        assert ok.json()["server"] == "chunkd"  # type: ignore[index]

        wrong_ca = run(*common, "--ca-file", str(pki.other_ca), "--server-name", "chunkd.test", "ping")
        assert wrong_ca.code == ExitCode.CONNECTION_ERROR and "CERTIFICATE_VERIFY_FAILED" in wrong_ca.err
        wrong_name = run(*common, "--ca-file", str(pki.ca), "--server-name", "other.test", "ping")
        assert wrong_name.code == ExitCode.CONNECTION_ERROR and "CERTIFICATE_VERIFY_FAILED" in wrong_name.err
        no_tls = run(*common, "ping")  # plain CWP/1 to a TLS port
        assert no_tls.code in (ExitCode.CONNECTION_ERROR, ExitCode.PROTOCOL_ERROR)

        for name, value in [("CHUNK_SERVER", server), ("CHUNK_API_KEY_FILE", str(api_key_file)),
                            ("CHUNK_CA_FILE", str(pki.ca)), ("CHUNK_SERVER_NAME", "chunkd.test"),
                            ("CHUNK_CERT", str(pki.client_cert)), ("CHUNK_KEY", str(pki.client_key))]:
            monkeypatch.setenv(name, value)
        assert run("create-bucket", "over-tls").out == "created bucket over-tls\n"
        bad_cert = run("--cert", str(pki.ca), "--key", str(pki.client_key), "ping")
        assert bad_cert.code == ExitCode.USAGE and "cannot load client certificate" in bad_cert.err


# --- Ctrl-C and the terminal ---------------------------------------------------------------------


def _read_line(stream: IO[bytes], timeout: float) -> bytes:
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, "no output in time"
    return stream.readline()


@pytest.mark.parametrize("pipeline", [False, True])
def test_ctrl_c_cancels_the_request_in_flight(chunkd_process: ChunkdProcess, cli: CLI,
                                              pipeline: bool) -> None:
    """Ctrl-C during ``put -``: CANCEL, exit 5, nothing stored. With ``pipeline`` stdin
    also ends right after the signal, as when Ctrl-C kills the producer of a pipe."""
    assert cli("create-bucket", "b").code == 0
    with subprocess.Popen(
            [sys.executable, "-m", "l4proxy.client.cli", "--server", chunkd_process.address,
             "--api-key-file", str(chunkd_process.api_key_file), "-v", "put", "b", "slow", "-"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        try:
            assert _read_line(proc.stderr, SUBPROCESS_TIMEOUT).startswith(b"chunk: session ")
            proc.stdin.write(b"x" * 100_000)  # the upload is under way
            proc.stdin.flush()
            time.sleep(0.3)
            proc.send_signal(signal.SIGINT)
            if pipeline:
                proc.stdin.close()
            proc.wait(timeout=SUBPROCESS_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        out, err = proc.stdout.read(), proc.stderr.read()
    assert (proc.returncode, out, err) == (ExitCode.CANCELLED, b"", b"chunk: cancelled\n")
    assert chunkd_process.api_key.encode() not in out + err
    assert cli("--json", "list", "b").json_lines() == [{"result": {"count": 0, "truncated": False}}]


def _run_on_a_tty(args: list[str]) -> tuple[int, bytes]:
    """Run the CLI with stderr on a pseudo-terminal; returns (exit code, terminal output)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    proc = subprocess.Popen([sys.executable, "-m", "l4proxy.client.cli", *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    seen = bytearray()
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                seen += data
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=10)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    return code, bytes(seen)


def test_progress_bar_only_on_a_terminal_and_not_with_json(chunkd_process: ChunkdProcess, cli: CLI,
                                                            tmp_path: Path) -> None:
    src = tmp_path / "big"
    src.write_bytes(os.urandom(2 << 20))
    assert cli("create-bucket", "b").code == 0
    common = ["--server", chunkd_process.address, "--api-key-file", str(chunkd_process.api_key_file)]
    code, tty = _run_on_a_tty([*common, "put", "b", "big", str(src)])
    assert code == 0 and b"B/s" in tty and b"big" in tty
    code, tty = _run_on_a_tty([*common, "get", "b", "big", "-o", str(tmp_path / "copy")])
    assert code == 0 and b"B/s" in tty
    assert (tmp_path / "copy").read_bytes() == src.read_bytes()
    code, tty = _run_on_a_tty([*common, "--json", "get", "b", "big", "-o", str(tmp_path / "copy2")])
    assert code == 0 and b"B/s" not in tty
    assert chunkd_process.api_key.encode() not in tty


# --- a scripted peer: notices and the intermediary's error codes ----------------------------------


Script = Callable[[Request], list[Event | bytes]]


class ScriptedPeer:
    """A CWP/1 server on loopback (blocking sockets in a thread) that answers each
    REQUEST with scripted events, the way a gateway would. One connection."""

    def __init__(self, script: Script, *, on_cancel: Callable[[Cancel], list[Event]] | None = None) -> None:
        self.script = script
        self.on_cancel = on_cancel
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(SUBPROCESS_TIMEOUT)
        self.port: int = self.listener.getsockname()[1]
        self.cancels: list[int] = []
        self.failures: list[BaseException] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            sock, _ = self.listener.accept()
            with sock:
                sock.settimeout(SUBPROCESS_TIMEOUT)
                conn = Connection(Role.SERVER)
                while True:
                    data = sock.recv(65536)
                    conn.receive_data(data)
                    while (event := conn.next_event()) is not NEED_DATA:
                        if isinstance(event, Hello):
                            sock.sendall(conn.send(Welcome(server="fake-gateway", session_id="s-1")))
                        elif isinstance(event, Request):
                            for item in self.script(event):
                                sock.sendall(item if isinstance(item, bytes) else conn.send(item))
                        elif isinstance(event, Cancel):
                            self.cancels.append(event.request_id)
                            for answer in self.on_cancel(event) if self.on_cancel else []:
                                sock.sendall(conn.send(answer))
                        elif isinstance(event, ConnectionClosed):
                            return
                    if not data:
                        return
        except (OSError, ConnectionError):
            pass
        except BaseException as exc:
            self.failures.append(exc)
        finally:
            self.listener.close()

    def join(self) -> None:
        self.thread.join(timeout=SUBPROCESS_TIMEOUT)
        assert not self.thread.is_alive() and not self.failures


def test_notices_go_to_stderr(capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    def script(req: Request) -> list[Event | bytes]:
        rid = req.request_id
        return [Notice(request_id=rid, kind=NoticeKind.HELD, message="waiting for approval",
                       approval_id="apr-7", hold_seconds=30),
                Notice(request_id=rid, kind=NoticeKind.APPROVED, message="approved by \x1b[2Jbob"),
                Result(request_id=rid, fields={"bucket": "prod"})]

    peer = ScriptedPeer(script)
    code = main(["--server", f"127.0.0.1:{peer.port}", "--reason", "OPS-1", "create-bucket", "prod"])
    peer.join()
    out, err = capsysbinary.readouterr()
    assert code == 0 and out == b"created bucket prod\n"
    assert err.decode().splitlines() == [
        "chunk: notice: waiting for approval (approval apr-7, held up to 30 s)",
        "chunk: notice: approved by \\x1b[2Jbob"]


@pytest.mark.parametrize(("answer", "exit_code", "message"), [
    (Error(request_id=1, code=ErrorCode.NOT_FOUND, message="no"), 2, "NOT_FOUND: no"),
    (Error(request_id=1, code=ErrorCode.DENIED_BY_POLICY, message="drop is denied"), 3,
     "DENIED_BY_POLICY: drop is denied"),
    (Error(request_id=1, code=ErrorCode.APPROVAL_DENIED, message="carol said no"), 4,
     "APPROVAL_DENIED: carol said no"),
    (Error(request_id=1, code=ErrorCode.APPROVAL_EXPIRED, message="nobody answered"), 5,
     "APPROVAL_EXPIRED: nobody answered"),
    (Error(request_id=0, code=ErrorCode.IDENTITY_LOCKED, message="locked"), 8, "IDENTITY_LOCKED: locked"),
    (Error(request_id=0, code=ErrorCode.CERTIFICATE_EXPIRED, message="renew"), 8,
     "CERTIFICATE_EXPIRED: renew"),
    (Error(request_id=0, code=ErrorCode.UPSTREAM_UNAVAILABLE, message="down"), 7,
     "UPSTREAM_UNAVAILABLE: down"),
    (b"\x7f" * 12, 6, "server broke the protocol"),
])
def test_intermediary_errors_map_to_exit_codes(capsysbinary: pytest.CaptureFixture[bytes],
                                               answer: Event | bytes, exit_code: int, message: str) -> None:
    peer = ScriptedPeer(lambda _req: [answer])
    code = main(["--server", f"127.0.0.1:{peer.port}", "drop-table", "t"])
    peer.join()
    out, err = capsysbinary.readouterr()
    assert (code, out) == (exit_code, b"")
    assert err.decode().startswith(f"chunk: {message}") and err.count(b"\n") == 1


# --- pure helpers -----------------------------------------------------------------------------------


def test_parse_where_reads_json_scalars_else_text() -> None:
    assert parse_where(["a=1", "b=2.5", "c=true", "d=null", 'e="007"', "f=ann", "g=", "h=[1]",
                        'i={"$base64": "AAE="}', "j=a=b", "k=NaN"]) == {
        "a": 1, "b": 2.5, "c": True, "d": None, "e": "007", "f": "ann", "g": "", "h": "[1]",
        "i": b"\x00\x01", "j": "a=b", "k": "NaN"}
    with pytest.raises(UsageError, match="twice"):
        parse_where(["a=1", "a=2"])
    with pytest.raises(UsageError, match="invalid base64"):
        parse_where(['a={"$base64": "!!"}'])


def test_parse_rows() -> None:
    cols, rows = parse_rows([b'{"a": 1, "b": {"$base64": "AA=="}}\n', b"\n",
                             b'{"b": null, "a": 9223372036854775807}\n'], "in")
    assert cols == ["a", "b"] and rows == [[1, b"\x00"], [9223372036854775807, None]]
    for lines, message in [([], "in: no rows"), ([b"{}"], "in:1: the first object has no keys"),
                           ([b'{"a": [1]}'], "in:1: a: expected null"),
                           ([b'{"a": 9223372036854775808}'], "in:1: a: integer out of"),
                           ([b'{"a": 1}', b'{"a": 1, "b": 2}'], "in:2: unexpected key 'b'"),
                           ([b"\xff"], "in:1: not UTF-8"), ([b'{"a": NaN}'], "in:1: not valid JSON")]:
        with pytest.raises(UsageError) as exc:
            parse_rows(lines, "in")
        assert str(exc.value).startswith(message)


def test_parse_server() -> None:
    assert parse_server("db.internal:7443") == ("db.internal", 7443)
    assert parse_server("db.internal") == ("db.internal", 7070)
    assert parse_server("[::1]:7000") == ("::1", 7000)
    assert parse_server("[::1]") == ("::1", 7070)
    for bad in ("::1", "h:0", "h:70000", ":7", "h:x", "[::1]x"):
        with pytest.raises(ValueError):
            parse_server(bad)


def test_format_notice_and_clean() -> None:
    n = Notice(request_id=3, kind=NoticeKind.EXPIRING, message="cert\nexpires", expires_at=0.0)
    assert format_notice(n) == "chunk: notice: cert\\nexpires (expires 1970-01-01 00:00:00 UTC)"
    assert clean("ok ü") == "ok ü" and clean("\x1b]0;x\x07\u202e") == "\\x1b]0;x\\x07\\u202e"


def test_render_table_aligns_columns() -> None:
    assert render_table(["NAME", "N"], [["a", "1"], ["long name", "100"]], right={1}) == [
        "NAME         N", "a            1", "long name  100"]


@pytest.mark.parametrize("mode", ["answered", "second-ctrl-c", "unanswered"])
def test_ctrl_c_while_held_for_approval(mode: str) -> None:
    """Ctrl-C sends CANCEL; exit 5 on the answer, on a second Ctrl-C, or after the grace time."""

    def script(req: Request) -> list[Event | bytes]:
        return [Notice(request_id=req.request_id, kind=NoticeKind.HELD, message="held for approval",
                       approval_id="apr-9", hold_seconds=600)]

    def on_cancel(cancel: Cancel) -> list[Event]:
        if mode != "answered":
            return []
        return [Error(request_id=cancel.request_id, code=ErrorCode.APPROVAL_CANCELLED, message="withdrawn")]

    peer = ScriptedPeer(script, on_cancel=on_cancel)
    with subprocess.Popen([sys.executable, "-m", "l4proxy.client.cli", "--server", f"127.0.0.1:{peer.port}",
                           "drop-table", "t"],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        try:
            notice = _read_line(proc.stderr, SUBPROCESS_TIMEOUT)
            assert notice == b"chunk: notice: held for approval (approval apr-9, held up to 600 s)\n"
            proc.send_signal(signal.SIGINT)
            if mode == "second-ctrl-c":
                deadline = time.monotonic() + SUBPROCESS_TIMEOUT
                while not peer.cancels and time.monotonic() < deadline:
                    time.sleep(0.01)
                proc.send_signal(signal.SIGINT)
            proc.wait(timeout=SUBPROCESS_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        out, err = proc.stdout.read(), proc.stderr.read()
    peer.join()
    assert (proc.returncode, out, err) == (ExitCode.CANCELLED, b"", b"chunk: cancelled\n")
    assert peer.cancels == [1]
