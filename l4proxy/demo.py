"""``l4proxy demo``: the whole system on one machine, on loopback.

Theory of operation: everything lives under a work directory (default ``./demo-work``):
the internal CA (created on the first run), the dev identity provider's key, chunkd's
data and its scoped API key, the gateway's configuration and state. Four processes start,
each a real command you could type: the dev identity provider, chunkd (holding a key
scoped to the demo's buckets and table), and ``l4proxy serve`` (control API + gateway).
The demo then prints how to log in as a sample user and use ``chunk`` through the
gateway; with ``--once`` it runs those commands itself, prints each with its output, and
exits. Ctrl-C stops everything.

The user never sees chunkd's key: the gateway injects it. The dev identity provider is
for demos only.
"""

from __future__ import annotations

import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

from .netaddr import free_loopback_port

__all__ = ["run_demo"]

L4PROXY = [sys.executable, "-m", "l4proxy.cli"]
CHUNK = [sys.executable, "-m", "l4proxy.client.cli"]
CHUNKD = [sys.executable, "-m", "l4proxy.chunkd.cli"]
TRUST_DOMAIN = "demo.l4proxy"


def _say(text: str) -> None:
    print(text, flush=True)


def _private(path: Path, text: str) -> Path:
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    return path


def _wait(predicate: object, what: str, proc: subprocess.Popen[bytes], log: Path,
          timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}); see {log}")
        try:
            if predicate():  # type: ignore[operator]
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not start within {timeout:.0f} s; see {log}")


class _Processes:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, args: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.work / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=out, cwd=self.work)
        self.procs.append(proc)
        return proc, log

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _config(work: Path, issuer: str, chunkd_port: int, control: int, ops: int, gateway: int) -> str:
    return f"""# written by `l4proxy demo`
[gateway]
id = "demo"
state_dir = "state"

[control]
listen = "127.0.0.1:{control}"
ops_listen = "127.0.0.1:{ops}"
admin_groups = ["admins"]

[ca]
dir = "certs"
trust_domain = "{TRUST_DOMAIN}"

[[identity.providers]]
name = "dev"
issuer = "{issuer}"
audience = "l4proxy"
jwks = "discovery"
groups_claim = "groups"
allowed_email_domains = ["example.com"]

[[targets]]
name = "chunks"
upstream = "127.0.0.1:{chunkd_port}"
protocol = "cwp"
credential = {{ file = "gateway.key" }}
client_credentials = "refuse"

[targets.access]
groups = ["eng"]

[targets.credential_scope]
buckets = ["demo-*"]
tables = ["events"]
access = ["read", "write"]

[recording]
dir = "recordings"
min_free_bytes = "64MiB"

[[listeners]]
name = "main"
listen = "127.0.0.1:{gateway}"
server_cert = "certs/server.crt"
server_key = "certs/server.key"
client_ca = "certs/bundle.pem"
targets = ["chunks"]
"""


def _run(args: list[str], *, cwd: Path, shown: str | None = None,
         capture: bool = False) -> subprocess.CompletedProcess[str]:
    if shown is not None:
        _say(f"\n$ {shown}")
    return subprocess.run(args, cwd=cwd, text=True, timeout=120, check=False,
                          capture_output=capture)


def run_demo(work: Path, *, port: int = 0, once: bool = False) -> int:
    """Run the demo; returns the exit status (non-zero if a step failed)."""
    work = work.resolve()
    work.mkdir(mode=0o700, parents=True, exist_ok=True)
    certs = work / "certs"
    if not (certs / "ca.crt").exists():
        from .identity import init_ca

        init_ca(certs, trust_domain=TRUST_DOMAIN, server_names=["127.0.0.1", "localhost"],
                now=datetime.now(UTC))
        _say(f"created the internal CA in {certs}")
    key = "ck_demo_" + secrets.token_urlsafe(24)
    _private(work / "gateway.key", key + "\n")
    key = (work / "gateway.key").read_text().strip()
    # chunkd's key for the gateway: scoped to the demo's buckets and table, no admin
    import hashlib

    _private(work / "chunkd-keys.toml", (
        "[[keys]]\nname = \"gateway\"\n"
        f"key_sha256 = \"{hashlib.sha256(key.encode()).hexdigest()}\"\n"
        "buckets = [\"demo-*\"]\ntables = [\"events\"]\naccess = [\"read\", \"write\"]\n\n"
        "[[keys]]\nname = \"setup\"\n"
        f"key_sha256 = \"{hashlib.sha256((key + '-setup').encode()).hexdigest()}\"\n"
        "buckets = [\"demo-*\"]\ntables = [\"events\"]\naccess = [\"read\", \"write\", \"admin\"]\n"))
    _private(work / "setup.key", key + "-setup\n")
    procs = _Processes(work)
    failed = 0
    try:
        idp_dir = certs / "dev-idp"
        (idp_dir / "issuer").unlink(missing_ok=True)
        idp, idp_log = procs.start("dev-idp", [*L4PROXY, "dev-idp", "serve", "--dir", str(idp_dir)])
        _wait(lambda: (idp_dir / "issuer").exists(), "the dev identity provider", idp, idp_log)
        issuer = (idp_dir / "issuer").read_text().strip()
        chunkd_port_file = work / "chunkd.port"
        chunkd_port_file.unlink(missing_ok=True)
        chunkd, chunkd_log = procs.start("chunkd", [
            *CHUNKD, "--listen", "127.0.0.1:0", "--data", str(work / "data"),
            "--api-keys", str(work / "chunkd-keys.toml"), "--port-file", str(chunkd_port_file)])
        _wait(chunkd_port_file.exists, "chunkd", chunkd, chunkd_log)
        chunkd_port = int(chunkd_port_file.read_text())
        # a little sample data, written with the setup key (never the user's business)
        setup = [*CHUNK, "--server", f"127.0.0.1:{chunkd_port}", "--api-key-file",
                 str(work / "setup.key")]
        (work / "events.jsonl").write_text(
            '{"id": 1, "who": "alice", "ok": true}\n{"id": 2, "who": "bob", "ok": false}\n')
        readme = Path(__file__).resolve().parent.parent / "README.md"
        if not readme.exists():  # installed without the source tree
            readme = work / "sample.txt"
            readme.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n"
                                      for i in range(300)))
        for step in (["create-bucket", "demo-data"],
                     ["put", "demo-data", "readme.txt", str(readme)],
                     ["create-table", "events", "id:int", "who:text", "ok:bool"],
                     ["insert", "events", str(work / "events.jsonl")]):
            result = _run([*setup, *step], cwd=work, capture=True)
            if result.returncode not in (0, 2):  # 2: already there from an earlier run
                raise RuntimeError(f"sample data: chunk {' '.join(step)}: {result.stderr.strip()}")
        control, ops = free_loopback_port(), free_loopback_port()
        gateway = port or free_loopback_port()
        config = work / "l4proxy.toml"
        config.write_text(_config(work, issuer, chunkd_port, control, ops, gateway))
        check = _run([*L4PROXY, "config", "check", str(config)], cwd=work, capture=True)
        if check.returncode != 0:
            raise RuntimeError(f"the demo configuration is invalid:\n{check.stdout}")
        server, server_log = procs.start("l4proxy", [*L4PROXY, "--log-level", "INFO", "serve",
                                                      "--config", str(config)])

        def ready() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{ops}/readyz", timeout=2) as resp:
                return bool(resp.status == 200)

        _wait(ready, "l4proxy serve", server, server_log)
        _say(f"dev identity provider  {issuer}   (DEV ONLY)\n"
             f"chunkd                 127.0.0.1:{chunkd_port}   "
             f"(its key is only in {work / 'gateway.key'})\n"
             f"control API            https://127.0.0.1:{control}   ops http://127.0.0.1:{ops}\n"
             f"gateway                127.0.0.1:{gateway}\n"
             f"logs                   {work}/*.log, audit {work / 'state' / 'audit.jsonl'}, "
             f"recordings {work / 'recordings'}")
        profile = work / "alice"
        token_file = work / "alice.token"
        commands = [
            (f"l4proxy dev-idp token --dir {idp_dir} --sub alice --email alice@example.com "
             f"--groups eng > {token_file}", None),
            (f"l4proxy login --enroll https://127.0.0.1:{control} --ca-file {certs / 'ca.crt'} "
             f"--id-token-file {token_file} --out {profile} --gateway 127.0.0.1:{gateway} "
             "--server-name 127.0.0.1 --ttl 10m", None),
            (f"chunk --profile {profile} ping", None),
            (f"chunk --profile {profile} list-buckets", None),
            (f"chunk --profile {profile} list demo-data", None),
            (f"chunk --profile {profile} chunk demo-data readme.txt --strategy cdc "
             "--avg-size 4KiB", None),
            (f"chunk --profile {profile} put demo-data notes.txt {config}", None),
            (f"chunk --profile {profile} --json stat demo-data notes.txt", None),
            (f"chunk --profile {profile} scan events --where ok=true", None),
            (f"chunk --profile {profile} create-bucket secrets", "refused: the gateway's key is scoped"),
        ]
        if not once:
            _say("\nLog in as a sample user and use chunk through the gateway "
                 "(Ctrl-C here stops everything):\n")
            for command, _note in commands:
                _say(f"  {command}")
            try:
                while all(p.poll() is None for p in procs.procs):
                    time.sleep(0.5)
                _say("a demo process exited unexpectedly; see the logs in " + str(work))
                return 1
            except KeyboardInterrupt:
                _say("\nstopping.")
                return 0
        for command, expect_failure in commands:
            args = shlex.split(command)
            redirect = None
            if ">" in args:
                at = args.index(">")
                redirect, args = Path(args[at + 1]), args[:at]
            prefix = L4PROXY if args[0] == "l4proxy" else CHUNK
            result = _run([*prefix, *args[1:]], cwd=work, shown=command, capture=True)
            if redirect is not None:
                redirect.write_text(result.stdout)
                _say(f"(token written to {redirect})")
            else:
                sys.stdout.write(result.stdout)
            if result.stderr:
                sys.stdout.write(result.stderr)
            if (result.returncode != 0) != bool(expect_failure):
                failed += 1
                _say(f"!! unexpected exit status {result.returncode}")
            elif expect_failure:
                _say(f"({expect_failure})")
        # every session above was recorded: verify the recordings as an auditor would
        recordings = sorted(str(p) for p in (work / "recordings").rglob("*.l4rec.zst"))
        if recordings:
            shown = f"replay verify --keyring {certs} --index {work / 'state' / 'state.sqlite3'} ..."
            result = _run([sys.executable, "-m", "replay.cli", "verify", "--keyring", str(certs),
                           "--index", str(work / "state" / "state.sqlite3"), *recordings],
                          cwd=work, shown=shown, capture=True)
            sys.stdout.write(result.stdout + result.stderr)
            if result.returncode != 0:
                failed += 1
                _say(f"!! replay verify exited {result.returncode}")
        else:
            failed += 1
            _say("!! no recordings were written")
        audit = (work / "state" / "audit.jsonl").read_text()
        if key in audit or key in server_log.read_text():
            failed += 1
            _say("!! the service credential appeared in the audit log or the logs")
        _say("\n" + ("demo complete." if not failed else f"{failed} step(s) failed."))
        return 1 if failed else 0
    finally:
        procs.stop()
