"""The gateway side by side with direct TLS, haproxy and stunnel, all on loopback.

Run ``python -m benchmarks.run [--quick] [--out DIR] [--no-install] [--only GROUPS]`` (default
out: ``benchmarks/results``; groups: ``idle,bulk,handshakes,recording``).

Sets up in a temp dir: a CA (``init_ca``), chunkd over plain TCP and over TLS, ``l4proxy serve``
processes (recording off / ``[recording]`` on at the default zstd level / at level 1 when that
is not the default), each with a ``cwp`` listener and a ``tcp`` listener in front of the plain
chunkd, and haproxy and stunnel as mTLS-terminating TCP proxies (client certificate from our CA
required) in front of the same plain chunkd. Only what the selected groups use is started. A
peer that is missing and cannot be installed with apt-get, or a gateway without recording that
does not start, is marked skipped, never an error.

Every rate metric runs in interleaved rounds (each round visits every path, in a rotated
order), and every ratio is the median of per-round ratios. Idle sessions are one cumulative
pass per path (1,000 / 5,000 / 9,000 held sessions). Writes ``<out>/<YYYY-MM-DD>.json``, a
Markdown table next to it (``.md``), a PNG chart when matplotlib is installed, and prints the
table. MB is 10**6 bytes. Bounded: under 2 minutes with ``--quick``, under 10 without.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import resource
import secrets
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from benchmarks._payloads import PAYLOADS, payload
from l4proxy.client import ChunkClient
from l4proxy.config import LimitsConfig, RecordingConfig
from l4proxy.identity import CertificateAuthority, Identity, init_ca
from l4proxy.login import write_private_file
from l4proxy.netaddr import free_loopback_port
from l4proxy.tls import TlsStream
from l4proxy.wire import NEED_DATA, Connection, Hello, Role, Secret, Welcome

MB = 1_000_000
GB = 1_000_000_000
HOST = "127.0.0.1"
TRUST = "bench.local"
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: the metric groups, in the order they run (``--only`` picks a subset). Idle runs first, on
#: gateways that have not yet relayed bulk data, so that freed bulk buffers the allocator
#: keeps cannot hide what a held session costs
GROUPS = ("idle", "bulk", "handshakes", "recording")
#: the zstd level a gateway records at when the configuration does not say
DEFAULT_ZSTD_LEVEL: int = RecordingConfig.__dataclass_fields__["zstd_level"].default

# (metric, numerator path, denominator path, goal, op): the targets of issue 6, section 2
RATIO_GOALS: list[tuple[str, str, str, float, str]] = [
    ("put_throughput", "gateway-norec", "haproxy", 0.85, ">="),
    ("get_throughput", "gateway-norec", "haproxy", 0.85, ">="),
    ("put_throughput", "gateway-rec", "haproxy", 0.5, ">="),
    ("get_throughput", "gateway-rec", "haproxy", 0.5, ">="),
    ("added_latency_p50", "gateway-norec", "haproxy", 5.0, "<="),
    ("added_latency_p50", "gateway-rec", "haproxy", 5.0, "<="),
    ("handshakes_per_s", "gateway-norec", "haproxy", 0.6, ">="),
]
ADDED_LATENCY_GOAL_US = 250.0
#: RSS per idle CWP session on the recording gateway, recording state included (issue 6)
IDLE_RSS_GOAL_KIB = 64.0
#: which group produces which metric (ratio rows of groups that did not run are left out)
METRIC_GROUP = {"put_throughput": "bulk", "get_throughput": "bulk", "added_latency_p50": "bulk",
                "handshakes_per_s": "handshakes", "idle_rss_per_session": "idle"}


@dataclass
class Path_:
    """One way to reach chunkd: where to connect and what the client presents."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]  # the process whose CPU is charged to this path
    api_key: str | None  # None: the gateway injects the credential
    ops_port: int | None = None  # a gateway's ops endpoint (/metrics)
    rec_dir: Path | None = None  # a recording gateway's recording directory
    zstd_level: int | None = None  # ... and the level it records at


# --- setup ---------------------------------------------------------------------------------

def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((HOST, port), timeout=1):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                log = Path(getattr(proc, "log_path", ""))
                tail = log.read_text(errors="replace")[-600:] if log.is_file() else ""
                raise RuntimeError(f"{what} did not start: {tail.strip()}") from None
            time.sleep(0.05)


def _start_chunkd(work: Path, name: str, extra: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    """chunkd with room for the idle sessions: a connection limit just under the descriptor
    limit (its default, 1024, would refuse them) and an idle timeout longer than any run."""
    port_file = work / f"{name}.port"
    log = open(work / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "l4proxy.chunkd.cli", "--listen", f"{HOST}:0", "--data",
         str(work / f"data-{name}"), "--api-key-file", str(work / "chunkd.key"), "--port-file",
         str(port_file), "--log-level", "WARNING", "--idle-timeout", "3600",
         "--max-connections", str(max(1024, _nofile_soft() - IDLE_FD_MARGIN)), *extra],
        stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 20
    while not port_file.exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError(f"chunkd {name} did not start")
        time.sleep(0.05)
    return proc, int(port_file.read_text())


def _gateway_config(work: Path, chunkd_port: int, ports: dict[str, int], recording: bool,
                    zstd_level: int | None) -> str:
    """One gateway's TOML. The limits are the defaults except: sessions never time out while
    idle (the idle metric holds them for minutes), handshakes may take long (thousands queue
    up), and a stop drains for 1 s only."""
    certs = work / "certs"
    text = f"""
[gateway]
id = "gw-bench"
state_dir = "state"
[control]
listen = "{HOST}:{ports['control']}"
ops_listen = "{HOST}:{ports['ops']}"
[ca]
dir = "{certs}"
trust_domain = "{TRUST}"
[limits]
drain_timeout = "1s"
idle_timeout = "1h"
handshake_timeout = "60s"
[[targets]]
name = "chunks"
upstream = "{HOST}:{chunkd_port}"
protocol = "cwp"
credential = {{ file = "{work / 'chunkd.key'}" }}
[targets.access]
groups = ["bench"]
[targets.credential_scope]
buckets = ["bench-*"]
tables = []
access = ["read", "write"]
[[targets]]
name = "raw"
upstream = "{HOST}:{chunkd_port}"
protocol = "tcp"
[targets.access]
groups = ["bench"]
[[listeners]]
name = "cwp"
listen = "{HOST}:{ports['cwp']}"
server_cert = "{certs / 'server.crt'}"
server_key = "{certs / 'server.key'}"
client_ca = "{certs / 'bundle.pem'}"
targets = ["chunks"]
[[listeners]]
name = "tcp"
listen = "{HOST}:{ports['tcp']}"
server_cert = "{certs / 'server.crt'}"
server_key = "{certs / 'server.key'}"
client_ca = "{certs / 'bundle.pem'}"
targets = ["raw"]
"""
    if not recording:
        return text + "[recording]\nenabled = false\n"  # the bench-only switch
    text += '[recording]\ndir = "recordings"\nmin_free_bytes = 0\n'
    if zstd_level is not None:
        text += f"zstd_level = {zstd_level}\n"
    return text


def _start_gateway(work: Path, name: str, chunkd_port: int, recording: bool,
                   zstd_level: int | None = None) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    home = work / name
    home.mkdir()
    ports = {k: free_loopback_port() for k in ("control", "ops", "cwp", "tcp")}
    config = home / "l4proxy.toml"
    config.write_text(_gateway_config(work, chunkd_port, ports, recording, zstd_level))
    log = open(home / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "l4proxy.cli", "serve", "--config", str(config)],
                            cwd=home, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{ports['ops']}/readyz", timeout=2):
                return proc, ports
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"{name} did not start: "
                                   + (home / "serve.log").read_text()[-600:].strip()) from None
            time.sleep(0.1)


def _ensure_tool(binary: str, package: str, install: bool) -> str | None:
    path = shutil.which(binary)
    if path is None and install and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        try:
            subprocess.run(["apt-get", "install", "-y", "-qq", package], env=env, timeout=180,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        except (OSError, subprocess.SubprocessError):
            pass
        path = shutil.which(binary)
    return path


def _maxconn() -> int:
    """haproxy needs about two descriptors per connection under the hard limit."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 10000 if hard == resource.RLIM_INFINITY else max(100, min(10000, (hard - 200) // 2))


def _raise_nofile() -> None:
    """Soft descriptor limit up to the hard one (the children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _nofile_soft() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


def _nofile_hard() -> int | None:
    """The hard descriptor limit (None: unlimited)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return None if hard == resource.RLIM_INFINITY else hard


def _start_haproxy(binary: str, work: Path, upstream: int) -> tuple[subprocess.Popen[bytes], int]:
    certs = work / "certs"
    pem = work / "haproxy.pem"
    pem.write_bytes((certs / "server.crt").read_bytes() + (certs / "server.key").read_bytes())
    pem.chmod(0o600)
    port = free_loopback_port()
    cfg = work / "haproxy.cfg"
    cfg.write_text(f"""global
    maxconn {_maxconn()}
defaults
    mode tcp
    timeout connect 10s
    timeout client 1h
    timeout server 1h
frontend fe
    bind {HOST}:{port} ssl crt {pem} ca-file {certs / 'bundle.pem'} verify required
    default_backend be
backend be
    server chunkd {HOST}:{upstream}
""")
    log = open(work / "haproxy.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([binary, "-db", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    proc.log_path = str(work / "haproxy.log")  # type: ignore[attr-defined]
    _wait_port(port, proc, "haproxy")
    return proc, port


def _start_stunnel(binary: str, work: Path, upstream: int) -> tuple[subprocess.Popen[bytes], int]:
    certs = work / "certs"
    port = free_loopback_port()
    cfg = work / "stunnel.conf"
    cfg.write_text(f"""foreground = yes
pid =
debug = err
[chunkd]
accept = {HOST}:{port}
connect = {HOST}:{upstream}
cert = {certs / 'server.crt'}
key = {certs / 'server.key'}
CAfile = {certs / 'bundle.pem'}
verify = 2
""")
    log = open(work / "stunnel.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([binary, str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    proc.log_path = str(work / "stunnel.log")  # type: ignore[attr-defined]
    _wait_port(port, proc, "stunnel")
    return proc, port


def _client_context(work: Path) -> ssl.SSLContext:
    ca = CertificateAuthority.load(work / "certs")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.mint_client(public_key=key.public_key(),
                          identity=Identity(provider="dev", subject="bench", groups=("bench",)),
                          replay_key="jti:bench", ttl=dt.timedelta(hours=1),
                          now=dt.datetime.now(dt.UTC))
    crt = work / "client.crt"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = work / "client.key"
    write_private_file(key_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    ctx = ssl.create_default_context(cafile=str(work / "certs" / "ca.crt"))
    ctx.load_cert_chain(str(crt), str(key_path))
    return ctx


# --- measurement ---------------------------------------------------------------------------

def _cpu_s(proc: subprocess.Popen[bytes]) -> float:
    """User + system CPU seconds of a process (all its threads) so far."""
    try:
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return float("nan")


def _connect(p: Path_, ctx: ssl.SSLContext) -> Any:
    if p.name == "direct-plain":
        return ChunkClient.connect(HOST, p.port, api_key=p.api_key)
    return ChunkClient.connect(HOST, p.port, api_key=p.api_key, ssl_context=ctx, server_name=HOST)


async def _bulk_round(p: Path_, ctx: ssl.SSLContext, body: bytes,
                      pings: int) -> dict[str, float]:
    out: dict[str, float] = {}
    size = len(body)
    payload = b"x" * 64
    async with _connect(p, ctx) as c:
        bucket = "bench-" + secrets.token_hex(4)
        await c.create_bucket(bucket)
        cpu, t = _cpu_s(p.proc), time.perf_counter()
        await c.put(bucket, "obj", body)
        elapsed = time.perf_counter() - t
        out["put_throughput"] = size / elapsed / MB
        out["put_cpu_s_per_gb"] = (_cpu_s(p.proc) - cpu) / (size / GB)
        cpu, t = _cpu_s(p.proc), time.perf_counter()
        got, _ = await c.get(bucket, "obj")
        elapsed = time.perf_counter() - t
        out["get_throughput"] = size / elapsed / MB
        out["get_cpu_s_per_gb"] = (_cpu_s(p.proc) - cpu) / (size / GB)
        if len(got) != size:
            raise RuntimeError(f"{p.name}: got {len(got)} bytes, expected {size}")
        del got
        for _ in range(min(50, pings)):  # warm up
            await c.ping(payload)
        rtts = []
        cpu = _cpu_s(p.proc)
        for _ in range(pings):
            t = time.perf_counter()
            await c.ping(payload)
            rtts.append((time.perf_counter() - t) * 1e6)
        out["ping_cpu_us"] = (_cpu_s(p.proc) - cpu) * 1e6 / pings
        rtts.sort()
        out["ping_p50"] = statistics.median(rtts)
        out["ping_p99"] = rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))]
        await c.delete_bucket(bucket, force=True)
    return out


async def _handshake_round(p: Path_, ctx: ssl.SSLContext, seconds: float) -> dict[str, float]:
    payload = b"x" * 64
    n = 0
    cpu = _cpu_s(p.proc)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        async with _connect(p, ctx) as c:
            await c.ping(payload)
        n += 1
    elapsed = time.perf_counter() - t0
    return {"handshakes_per_s": n / elapsed,
            "handshake_cpu_ms": (_cpu_s(p.proc) - cpu) * 1e3 / n}


# --- idle sessions -------------------------------------------------------------------------

#: opens in flight at once: well under the gateway's 128 handshakes per client address
IDLE_CONCURRENCY = 32
#: descriptors a process needs besides its sessions (listeners, logs, state store, pipes)
IDLE_FD_MARGIN = 256
#: relay descriptors per session: the client side and the upstream
IDLE_FDS_PER_SESSION = 2
IDLE_READ = 16 << 10
IDLE_OPEN_TIMEOUT = 30.0
#: how long the relay may take to end the held sessions once they are closed (the gateway
#: seals each recording: about 5 ms a session here)
IDLE_DRAIN_S = 60


def _rss_kib(proc: subprocess.Popen[bytes]) -> float:
    """Resident set size of a process, KiB (``VmRSS``)."""
    try:
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return float(line.split()[1])
    except (OSError, IndexError, ValueError):
        pass
    return float("nan")


def _fd_count(proc: subprocess.Popen[bytes]) -> int:
    try:
        return len(os.listdir(f"/proc/{proc.pid}/fd"))
    except OSError:
        return -1


def _idle_level_problem(n: int, p: Path_) -> str | None:
    """Why ``n`` sessions cannot be held on ``p`` (None: they can). Every process here has
    the harness's soft limit; the relay needs the most descriptors (two per session)."""
    soft, hard = _nofile_soft(), _nofile_hard()
    need = IDLE_FDS_PER_SESSION * n + IDLE_FD_MARGIN
    if need > soft:
        return (f"needs about {need} descriptors in the relay; the limit is {soft} "
                f"(hard {hard if hard is not None else 'unlimited'})")
    cap = LimitsConfig().max_sessions if p.name.startswith("gateway") else _maxconn()
    if n > cap:
        return f"above the relay's session limit ({cap})"
    return None


async def _gateway_metrics(p: Path_) -> str:
    """The gateway's Prometheus text (ops endpoint)."""
    def fetch() -> str:
        with urllib.request.urlopen(f"http://{HOST}:{p.ops_port}/metrics", timeout=5) as resp:
            return str(resp.read().decode())
    return await trio.to_thread.run_sync(fetch)


def _metric_sum(text: str, name: str) -> float:
    """Sum of every sample of ``name`` (all label values)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _wait_drained(p: Path_, fds: int | None, seconds: float) -> bool:
    """Wait until the relay is back to ``fds`` descriptors (give or take a few; None: do not
    look) and, for a gateway, has no live session: every session ended, its recording
    sealed. Bounded by ``seconds``."""
    with trio.move_on_after(seconds):
        while True:
            if fds is None or _fd_count(p.proc) <= fds + 8:
                if p.ops_port is None:
                    return True
                try:
                    metrics = await _gateway_metrics(p)
                except OSError:  # busy ending thousands of sessions: not drained yet
                    metrics = None
                if metrics is not None and _metric_sum(metrics, "l4proxy_sessions_active") == 0:
                    return True
            await trio.sleep(0.2)
    return False


async def _settled(proc: subprocess.Popen[bytes]) -> tuple[float, float]:
    """RSS (KiB) once it stops moving -- two samples 0.5 s apart within 1 %, after at least
    1 s, at most 6 s -- and the process's CPU use (% of a core) meanwhile, which is what the
    held sessions cost while idle (timers, flushers)."""
    await trio.sleep(0.5)
    cpu, t = _cpu_s(proc), time.monotonic()
    prev = _rss_kib(proc)
    rss = prev
    for i in range(11):
        await trio.sleep(0.5)
        rss = _rss_kib(proc)
        if i >= 1 and abs(rss - prev) <= 0.01 * prev:
            break
        prev = rss
    return rss, (_cpu_s(proc) - cpu) / (time.monotonic() - t) * 100


async def _welcome(stream: TlsStream, conn: Connection) -> None:
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            conn.receive_data(await stream.receive_some(IDLE_READ))
        elif isinstance(event, Welcome):
            return
        else:
            raise RuntimeError(f"expected WELCOME, got {type(event).__name__} "
                               f"{getattr(event, 'message', '')}".strip())


@dataclass
class _IdleClient:
    """Opens real CWP sessions on one path -- TLS with our client certificate, HELLO,
    WELCOME -- and holds them without reading or writing (no task per session).

    TLS sessions are resumed (each opener offers the ticket of its own previous
    connection), which cuts the relay's handshake CPU; the gateway still checks the client
    certificate of a resumed session. The raw ``TlsStream`` + ``Connection`` client is used
    rather than ``ChunkClient``, which can neither resume nor do without a reader task."""

    p: Path_
    ctx: ssl.SSLContext
    streams: list[TlsStream] = field(default_factory=list)
    session: ssl.SSLSession | None = None  # the latest ticket, to start a new opener with
    opening: int = 0
    resumed: int = 0
    failures: int = 0
    last_error: str = ""

    async def _open(self, session: ssl.SSLSession | None) -> TlsStream:
        tcp = await trio.open_tcp_stream(HOST, self.p.port)
        tls = TlsStream(tcp, self.ctx, server_side=False, server_hostname=HOST, session=session,
                        read_size=IDLE_READ)
        try:
            conn = Connection(Role.CLIENT)
            key = Secret(self.p.api_key) if self.p.api_key else None
            await tls.send_all(conn.send(Hello(client="bench-idle", api_key=key)))
            await _welcome(tls, conn)
        except BaseException:
            await trio.aclose_forcefully(tls)
            raise
        return tls

    async def _opener(self, n: int, limit: int) -> None:
        session = self.session
        while len(self.streams) + self.opening < n and self.failures <= limit:
            self.opening += 1
            try:
                with trio.fail_after(IDLE_OPEN_TIMEOUT):
                    tls = await self._open(session)
            except (OSError, RuntimeError, trio.TooSlowError, trio.BrokenResourceError) as exc:
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                await trio.sleep(0.1)
                continue
            finally:
                self.opening -= 1
            self.streams.append(tls)
            self.resumed += tls.session_reused
            session = self.session = tls.session

    async def open_to(self, n: int, seconds: float) -> str | None:
        """Hold ``n`` sessions in all (None), or say why not within ``seconds``."""
        limit = max(20, n // 100)
        with trio.move_on_after(seconds):
            async with trio.open_nursery() as nursery:
                for _ in range(IDLE_CONCURRENCY):
                    nursery.start_soon(self._opener, n, limit)
        if len(self.streams) >= n:
            return None
        why = f"{self.failures} opens failed, last: {self.last_error}" if self.failures else \
            f"timed out after {seconds:.0f} s"
        return f"only {len(self.streams)} of {n} sessions opened ({why})"

    async def close_all(self) -> None:
        streams, self.streams = self.streams, []
        for tls in streams:
            await trio.aclose_forcefully(tls)


def _idle_open_seconds(added: int) -> float:
    """Time allowed to open ``added`` more sessions: 40 ms each (the gateway opens 50-100 a
    second on this machine, haproxy 150-250), at least 30 s."""
    return max(30.0, 0.04 * added)


async def _idle_path(p: Path_, ctx: ssl.SSLContext, levels: list[int],
                     budget_s: float) -> list[dict[str, Any]]:
    """Hold 1,000, then 5,000, ... sessions on ``p`` (cumulatively); one entry per level:
    ``{"sessions", "kib_per_session", ...}`` or ``{"sessions", "skipped": reason}``. Opening
    stops ``budget_s`` after the first level starts (a level not complete by then is
    skipped)."""
    client = _IdleClient(p, ctx)
    fds = _fd_count(p.proc)
    out: list[dict[str, Any]] = []
    try:
        # warm up: first-use costs (imports, caches, worker threads) are not per session
        if await client.open_to(IDLE_CONCURRENCY, 60) is not None:
            raise RuntimeError(f"{p.name}: cannot open sessions: {client.last_error}")
        await client.close_all()
        if not await _wait_drained(p, fds, 30):
            raise RuntimeError(f"{p.name}: the warm-up sessions did not end")
        client.resumed = 0
        before, _ = await _settled(p.proc)
        deadline = time.monotonic() + budget_s
        for i, n in enumerate(levels):
            added = n - len(client.streams)
            problem = _idle_level_problem(n, p)
            t, cpu = time.monotonic(), _cpu_s(p.proc)
            if problem is None and deadline - t < 5:
                problem = "time budget of the idle group used up"
            if problem is None:
                problem = await client.open_to(n, min(_idle_open_seconds(added), deadline - t))
                if problem is not None:  # was the relay busy (with what it holds already)?
                    busy = (_cpu_s(p.proc) - cpu) / (time.monotonic() - t) * 100
                    problem += f"; the relay used {busy:.0f} % of a core meanwhile"
            if problem is not None:
                out.append({"sessions": n, "skipped": problem})
                out += [{"sessions": m, "skipped": _idle_level_problem(m, p)
                         or f"not tried: the {n} level was skipped"} for m in levels[i + 1:]]
                break
            opened = time.monotonic() - t
            rss, cpu_pct = await _settled(p.proc)
            out.append({"sessions": n, "kib_per_session": (rss - before) / n,
                        "rss_before_kib": before, "rss_after_kib": rss,
                        "idle_cpu_pct": round(cpu_pct, 1),
                        "opens_per_s": round(added / opened, 1),
                        "resumed_pct": round(100 * client.resumed / n, 1)})
            print(f"  {p.name}: {n} sessions, {(rss - before) / n:.1f} KiB each, "
                  f"{cpu_pct:.0f} % CPU while idle, {added / opened:.0f} opens/s", file=sys.stderr)
    finally:
        with trio.CancelScope(shield=True):
            await client.close_all()
            if not await _wait_drained(p, fds, IDLE_DRAIN_S):
                print(f"  {p.name}: sessions still open {IDLE_DRAIN_S} s after closing",
                      file=sys.stderr)
    return out


# --- recording -----------------------------------------------------------------------------

def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


async def _relayed_and_written(p: Path_) -> tuple[float, int]:
    """(bytes the gateway relayed so far, both directions; bytes of recordings on disk)."""
    relayed = _metric_sum(await _gateway_metrics(p), "l4proxy_bytes_total")
    written = await trio.to_thread.run_sync(_dir_bytes, p.rec_dir) if p.rec_dir else 0
    return relayed, written


async def _recording_round(p: Path_, ctx: ssl.SSLContext, bodies: dict[str, bytes]) -> dict[str, float]:
    """Per payload, on a fresh session: put, get, delete; then wait until the gateway has
    ended the session (its last flush unit and trailer are on disk). CPU and bytes are
    counted from after the bucket exists to the end of the session. The wait first watches
    the gateway's descriptors, which costs it nothing, and only then asks its /metrics
    whether the session has ended (each ask costs the gateway a little CPU)."""
    out: dict[str, float] = {}
    fds = _fd_count(p.proc)
    for kind, body in bodies.items():
        async with _connect(p, ctx) as c:
            bucket = "bench-" + secrets.token_hex(4)
            await c.create_bucket(bucket)
            relayed, written = await _relayed_and_written(p)
            cpu = _cpu_s(p.proc)
            await c.put(bucket, "obj", body)
            got, _ = await c.get(bucket, "obj")
            if len(got) != len(body):
                raise RuntimeError(f"{p.name}: got {len(got)} bytes, expected {len(body)}")
            del got
            await c.delete_bucket(bucket, force=True)
        for _ in range(500):  # 10 s at most
            if _fd_count(p.proc) <= fds:
                break
            await trio.sleep(0.02)
        if not await _wait_drained(p, None, 60):
            raise RuntimeError(f"{p.name}: the session did not end within 60 s")
        cpu = _cpu_s(p.proc) - cpu
        relayed_after, written_after = await _relayed_and_written(p)
        relayed = relayed_after - relayed
        out[f"recording_cpu_s_per_gb.{kind}"] = cpu / (relayed / GB)
        if p.rec_dir is not None:
            out[f"recording_bytes_per_byte.{kind}"] = (written_after - written) / relayed
    return out


UNITS = {"put_throughput": "MB/s", "get_throughput": "MB/s", "ping_p50": "us", "ping_p99": "us",
         "added_latency_p50": "us", "ping_cpu_us": "us", "handshakes_per_s": "1/s",
         "handshake_cpu_ms": "ms", "idle_rss_per_session": "KiB", "recording_bytes_per_byte": "B/B",
         "recording_cpu_s_per_gb": "s/GB"}


def _summ(values: list[float], digits: int = 2) -> dict[str, Any]:
    return {"rounds": [round(v, digits) for v in values], "min": round(min(values), digits),
            "median": round(statistics.median(values), digits), "max": round(max(values), digits)}


def _run_rounds(paths: list[Path_], rounds: int, budget_s: float,
                fn: Callable[[Path_], dict[str, float]]) -> dict[tuple[str, str], list[float]]:
    """Run ``fn`` on every path, round by round in a rotated order; stop adding rounds past
    ``budget_s`` (at least 2 rounds). Returns {(metric, path): [value per round]}."""
    samples: dict[tuple[str, str], list[float]] = {}
    t0 = time.monotonic()
    for r in range(rounds):
        if r >= 2 and time.monotonic() - t0 > budget_s * r / rounds:
            print(f"  (stopping after {r} rounds: time budget)", file=sys.stderr)
            break
        order = paths[r % len(paths):] + paths[:r % len(paths)]
        for p in order:
            t = time.monotonic()
            for metric, value in fn(p).items():
                samples.setdefault((metric, p.name), []).append(value)
            print(f"  round {r + 1} {p.name}: {time.monotonic() - t:.1f}s", file=sys.stderr)
    return samples


def _versions(haproxy: str | None, stunnel: str | None) -> dict[str, str]:
    import zstandard

    def out(cmd: list[str], pattern: str) -> str:
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            return "unknown"
        m = re.search(pattern, res.stdout + res.stderr)
        return m.group(1) if m else "unknown"

    return {
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "trio": trio.__version__,
        "zstandard": zstandard.__version__,
        "haproxy": out([haproxy, "-v"], r"version (\S+)") if haproxy else "not used or not installed",
        "stunnel": out([stunnel, "-version"], r"stunnel (\S+)") if stunnel else "not used or not installed",
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ratios(samples: dict[tuple[str, str], list[float]], idle: list[dict[str, Any]],
            groups: list[str]) -> list[dict[str, Any]]:
    out = []
    for metric, num, den, goal, op in RATIO_GOALS:
        if METRIC_GROUP[metric] not in groups:
            continue
        a, b = samples.get((metric, num)), samples.get((metric, den))
        entry: dict[str, Any] = {"metric": metric, "num": num, "den": den, "goal": goal, "op": op}
        if not a or not b:
            entry.update(value=None, met=None, note="not measured (path skipped)")
        else:
            per_round = [x / y for x, y in zip(a, b, strict=False) if y > 0]
            if not per_round:
                entry.update(value=None, met=None, note="denominator not positive in any round")
            else:
                value = statistics.median(per_round)
                entry.update(rounds=[round(v, 3) for v in per_round], value=round(value, 3),
                             met=bool(value >= goal if op == ">=" else value <= goal))
        out.append(entry)
    for name in ("gateway-norec", "gateway-rec"):
        v = samples.get(("added_latency_p50", name))
        if v:
            med = statistics.median(v)
            out.append({"metric": "added_latency_p50", "num": name, "den": "absolute_us",
                        "value": round(med, 1), "goal": ADDED_LATENCY_GOAL_US, "op": "<=",
                        "met": med <= ADDED_LATENCY_GOAL_US})
    for level in idle:
        if level["target"] != "gateway-rec":
            continue
        entry = {"metric": "idle_rss_per_session", "num": "gateway-rec", "den": "absolute_kib",
                 "sessions": level["sessions"], "goal": IDLE_RSS_GOAL_KIB, "op": "<="}
        if "skipped" in level:
            entry.update(value=None, met=None, note=level["skipped"])
        else:
            kib = level["kib_per_session"]
            entry.update(value=round(kib, 1), met=kib <= IDLE_RSS_GOAL_KIB)
        out.append(entry)
    return out


def _results(samples: dict[tuple[str, str], list[float]], idle: list[dict[str, Any]],
             levels: dict[str, int]) -> list[dict[str, Any]]:
    """The result rows, in table order. ``levels``: each recording path's zstd level."""
    results: list[dict[str, Any]] = []
    for level in idle:
        if "skipped" in level:
            continue
        extra = {k: v for k, v in level.items() if k not in ("target", "sessions", "kib_per_session")}
        results.append({"metric": "idle_rss_per_session", "target": level["target"],
                        "sessions": level["sessions"], "unit": "KiB",
                        **_summ([level["kib_per_session"]], 1), **extra})
    order = ["put_throughput", "get_throughput", "ping_p50", "ping_p99", "added_latency_p50",
             "handshakes_per_s"]
    for metric in order:
        for (m, target), values in samples.items():
            if m != metric or not values:
                continue
            entry: dict[str, Any] = {"metric": metric, "target": target, "unit": UNITS[metric],
                                     **_summ(values)}
            proxied = not target.startswith("direct")  # direct: the CPU is chunkd's own, not a relay's
            if metric in ("put_throughput", "get_throughput") and proxied:
                cpu = samples.get((metric.split("_")[0] + "_cpu_s_per_gb", target))
                if cpu:
                    entry["cpu_s_per_gb"] = round(statistics.median(cpu), 2)
            if metric == "ping_p50" and proxied and samples.get(("ping_cpu_us", target)):
                entry["cpu_us_per_rtt"] = round(statistics.median(samples[("ping_cpu_us", target)]), 1)
            if metric == "handshakes_per_s" and proxied and samples.get(("handshake_cpu_ms", target)):
                entry["cpu_ms_per_handshake"] = round(
                    statistics.median(samples[("handshake_cpu_ms", target)]), 2)
            results.append(entry)
    for metric, digits in (("recording_bytes_per_byte", 4), ("recording_cpu_s_per_gb", 2)):
        for kind in PAYLOADS:
            for (m, target), values in samples.items():
                if m == f"{metric}.{kind}" and values:
                    results.append({"metric": metric, "payload": kind, "target": target,
                                    "zstd_level": levels.get(target), "unit": UNITS[metric],
                                    **_summ(values, digits)})
    return results


def _header(doc: dict[str, Any]) -> str:
    """The table's first line: the run's settings, group by group."""
    v = doc["versions"]
    parts = [f"Run {doc['date']} on {doc['machine']['cores']} cores ({doc['machine']['cpu']})"]
    groups = doc["groups"]
    if "idle" in groups:
        parts.append(f"idle sessions held: {', '.join(str(n) for n in doc['idle_sessions'])} "
                     f"(descriptor limit: hard {doc['machine']['nofile_hard']})")
    if "bulk" in groups:
        parts.append(f"{doc['object_mib']} MiB objects, {doc['pings']} pings/round")
    if "handshakes" in groups:
        parts.append(f"{doc['handshake_seconds']} s of handshakes/round")
    if "recording" in groups:
        rec = doc["recording"]
        parts.append(f"recording: {rec['object_mib']} MiB put + get per payload, default "
                     f"zstd_level {rec['default_zstd_level']}")
    return ("; ".join(parts) + f"; haproxy {v['haproxy']}, stunnel {v['stunnel']}, {v['openssl']}, "
            f"Python {v['python']}.")


def _row_name(r: dict[str, Any]) -> tuple[str, str]:
    metric, target = r["metric"], r["target"]
    if "sessions" in r:
        metric += f" @{r['sessions']}"
    if "payload" in r:
        metric += f" [{r['payload']}]"
    if r.get("zstd_level") is not None:
        target += f" (zstd {r['zstd_level']})"
    return metric, target


def _table(doc: dict[str, Any]) -> str:
    lines = [_header(doc), "",
             "| metric | path | unit | median | min | max | rounds | proxy CPU |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for r in doc["results"]:
        cpu = ""
        if "cpu_s_per_gb" in r:
            cpu = f"{r['cpu_s_per_gb']} s/GB"
        elif r["metric"] in ("ping_p50",) and "cpu_us_per_rtt" in r:
            cpu = f"{r['cpu_us_per_rtt']} µs/rtt"
        elif "cpu_ms_per_handshake" in r:
            cpu = f"{r['cpu_ms_per_handshake']} ms/hs"
        elif "idle_cpu_pct" in r:
            cpu = f"{r['idle_cpu_pct']} % of a core while idle"
        metric, target = _row_name(r)
        lines.append(f"| {metric} | {target} | {r['unit']} | {r['median']} | {r['min']} "
                     f"| {r['max']} | {len(r['rounds'])} | {cpu} |")
    for s in doc["skipped"]:
        metric = s.get("metric", "(all)") + (f" @{s['sessions']}" if "sessions" in s else "")
        lines.append(f"| {metric} | {s['target']} | | skipped | | | | {s['reason']} |")
    if doc["ratios"]:
        lines += ["", "| ratio | num / den | value (median of per-round) | goal | met |",
                  "|---|---|---:|---:|---|"]
    units = {"absolute_us": " µs", "absolute_kib": " KiB"}
    for q in doc["ratios"]:
        met = {True: "yes", False: "**no**", None: "n/a"}[q["met"]]
        value = "n/a" if q["value"] is None else q["value"]
        metric = q["metric"] + (f" @{q['sessions']}" if "sessions" in q else "")
        lines.append(f"| {metric} | {q['num']} / {q['den']} | {value} | {q['op']} "
                     f"{q['goal']}{units.get(q['den'], 'x')} | {met} |")
    return "\n".join(lines) + "\n"


def _chart(doc: dict[str, Any], path: Path) -> bool:
    """One panel per kind of result present: throughput, idle RSS per session against the
    number of sessions (with the goal), recording output and CPU per payload and level."""
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return False
    rows = doc["results"]
    panels: list[tuple[str, list[dict[str, Any]]]] = [
        (name, [r for r in rows if pick(r)]) for name, pick in (
            ("throughput", lambda r: r["unit"] == "MB/s"),
            ("idle", lambda r: r["metric"] == "idle_rss_per_session"),
            ("rec_bytes", lambda r: r["metric"] == "recording_bytes_per_byte"),
            ("rec_cpu", lambda r: r["metric"] == "recording_cpu_s_per_gb"))]
    panels = [(name, sel) for name, sel in panels if sel]
    if not panels:
        return False
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3.2 * len(panels)), squeeze=False)
    for ax, (name, sel) in zip(axes[:, 0], panels, strict=True):
        if name == "idle":
            for target in dict.fromkeys(r["target"] for r in sel):
                mine = [r for r in sel if r["target"] == target]
                ax.plot([r["sessions"] for r in mine], [r["median"] for r in mine], marker="o",
                        label=target)
            ax.axhline(IDLE_RSS_GOAL_KIB, color="red", linestyle="--", label="goal (gateway-rec)")
            ax.set_xlabel("idle CWP sessions held")
            ax.set_ylabel("RSS KiB / session")
            ax.set_xlim(0, 1.1 * max(r["sessions"] for r in sel))
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=7)
            continue
        labels = [(f"{r['payload']}\n{_row_name(r)[1]}" if name != "throughput"
                   else f"{r['metric'].split('_')[0]}\n{r['target']}") for r in sel]
        ax.bar(range(len(sel)), [r["median"] for r in sel],
               yerr=[[r["median"] - r["min"] for r in sel], [r["max"] - r["median"] for r in sel]])
        ax.set_xticks(range(len(sel)), labels, fontsize=6)
        ax.set_ylabel({"throughput": "MB/s", "rec_bytes": "recorded bytes / relayed byte",
                       "rec_cpu": "gateway CPU s / GB relayed"}[name])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --- main ----------------------------------------------------------------------------------

@dataclass
class _Plan:
    """What one run measures, with which sizes and time budgets."""

    groups: list[str]
    rounds: int
    size: int  # bulk object, bytes
    pings: int
    hs_seconds: float
    bulk_budget: float
    hs_budget: float
    idle_levels: list[int]
    idle_budget: dict[str, float]  # seconds of opening, per path
    rec_size: int
    rec_rounds: int
    rec_budget: float

    @classmethod
    def make(cls, quick: bool, groups: list[str]) -> _Plan:
        """The settings of benchmarks/README.md. Quick: about 105 s here. Full: 9,000 idle
        sessions take about 4 of the 10 minutes, which is why its objects are smaller than
        the first harness's (512 MiB, 3000 pings, 5 s of handshakes)."""
        if quick:
            return cls(groups, rounds=3, size=64 << 20, pings=500, hs_seconds=1.0,
                       bulk_budget=55, hs_budget=20, idle_levels=[1000],
                       idle_budget={"gateway-rec": 45, "haproxy": 20},
                       rec_size=16 << 20, rec_rounds=3, rec_budget=15)
        return cls(groups, rounds=5, size=128 << 20, pings=2000, hs_seconds=3.0,
                   bulk_budget=170, hs_budget=85, idle_levels=[1000, 5000, 9000],
                   idle_budget={"gateway-rec": 170, "haproxy": 55},
                   rec_size=32 << 20, rec_rounds=5, rec_budget=40)

    def needs(self, *groups: str) -> bool:
        return any(g in self.groups for g in groups)


def _groups(text: str) -> list[str]:
    chosen = [g.strip() for g in text.split(",") if g.strip()]
    unknown = sorted(set(chosen) - set(GROUPS))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"unknown group(s) {', '.join(unknown) or '(none)'}; "
                                         f"choose from {','.join(GROUPS)}")
    return [g for g in GROUPS if g in chosen]


def _start_all(work: Path, plan: _Plan, tools: dict[str, str | None], key: str,
               procs: list[subprocess.Popen[bytes]], skipped: list[dict[str, str]]) -> list[Path_]:
    """Start what the selected groups use; returns every path that is up."""
    plain, plain_port = _start_chunkd(work, "plain", [])
    procs.append(plain)
    paths = [Path_("direct-plain", plain_port, plain, key)]
    if plan.needs("bulk", "handshakes"):
        tls, tls_port = _start_chunkd(work, "tls", [
            "--tls-cert", str(work / "certs" / "server.crt"),
            "--tls-key", str(work / "certs" / "server.key")])
        procs.append(tls)
        paths.append(Path_("direct-tls", tls_port, tls, key))
    gateways: list[tuple[str, bool, int | None]] = []
    if plan.needs("bulk", "handshakes", "recording"):
        gateways.append(("gateway-norec", False, None))
    gateways.append(("gateway-rec", True, None))
    if plan.needs("recording") and DEFAULT_ZSTD_LEVEL != 1:
        gateways.append(("gateway-rec-l1", True, 1))
    for name, recording, level in gateways:
        home = "gw-" + name.removeprefix("gateway-")
        try:
            proc, ports = _start_gateway(work, home, plain_port, recording, level)
        except RuntimeError as exc:
            if name == "gateway-rec":
                raise  # every group needs it
            skipped.append({"target": name, "reason": " ".join(str(exc).split())})
            continue
        procs.append(proc)
        rec_dir = work / home / "recordings" if recording else None
        rec_level = (DEFAULT_ZSTD_LEVEL if level is None else level) if recording else None
        paths.append(Path_(name, ports["cwp"], proc, None, ports["ops"], rec_dir, rec_level))
        if name == "gateway-rec":
            paths.append(Path_("gateway-tcp-rec", ports["tcp"], proc, key))
    for name, start in (("haproxy", _start_haproxy), ("stunnel", _start_stunnel)):
        if name not in tools:
            continue
        binary = tools[name]
        if binary is None:
            skipped.append({"target": name, "reason": "not installed"})
            continue
        try:
            proc, port = start(binary, work, plain_port)
        except RuntimeError as exc:
            skipped.append({"target": name, "reason": str(exc)})
            continue
        procs.append(proc)
        paths.append(Path_(name, port, proc, key))
    return paths


def _measure(plan: _Plan, paths: list[Path_], ctx: ssl.SSLContext,
             skipped: list[dict[str, str]]) -> tuple[dict[tuple[str, str], list[float]],
                                                     list[dict[str, Any]]]:
    """Run the selected groups in order. Returns the per-round samples and the idle levels."""
    samples: dict[tuple[str, str], list[float]] = {}
    idle: list[dict[str, Any]] = []
    by_name = {p.name: p for p in paths}
    if "idle" in plan.groups:
        for name in ("gateway-rec", "haproxy"):
            p = by_name.get(name)
            if p is None:
                continue
            print(f"idle sessions: {name}", file=sys.stderr)
            try:
                levels = trio.run(_idle_path, p, ctx, plan.idle_levels, plan.idle_budget[name])
            except (RuntimeError, OSError) as exc:  # the path broke: report it, measure the rest
                levels = [{"sessions": n, "skipped": str(exc)} for n in plan.idle_levels]
            for level in levels:
                idle.append({"target": name, **level})
                if "skipped" in level:
                    skipped.append({"target": name, "metric": "idle_rss_per_session",
                                    "sessions": level["sessions"], "reason": level["skipped"]})
    if "bulk" in plan.groups:
        bulk_paths = [p for p in paths if p.name != "gateway-rec-l1"]
        body = os.urandom(plan.size)
        print("bulk throughput + ping latency", file=sys.stderr)
        samples.update(_run_rounds(bulk_paths, plan.rounds, plan.bulk_budget,
                                   lambda p: trio.run(_bulk_round, p, ctx, body, plan.pings)))
        del body
        # added latency over direct to the same (plain) chunkd the proxies relay to, round by
        # round: the proxy's whole cost, its TLS included
        direct = samples.get(("ping_p50", "direct-plain"), [])
        for p in bulk_paths[1:]:
            mine = samples.get(("ping_p50", p.name), [])
            samples[("added_latency_p50", p.name)] = [a - d for a, d in zip(mine, direct,
                                                                              strict=False)]
    if "handshakes" in plan.groups:
        hs_paths = [p for p in paths if p.name in ("direct-tls", "gateway-norec", "gateway-rec",
                                                   "haproxy", "stunnel")]
        print("handshakes", file=sys.stderr)
        samples.update(_run_rounds(hs_paths, plan.rounds, plan.hs_budget,
                                   lambda p: trio.run(_handshake_round, p, ctx, plan.hs_seconds)))
    if "recording" in plan.groups:
        rec_paths = [p for p in paths if p.name in ("gateway-norec", "gateway-rec", "gateway-rec-l1")]
        bodies = {kind: payload(kind, plan.rec_size) for kind in PAYLOADS}
        print("recording", file=sys.stderr)
        samples.update(_run_rounds(rec_paths, plan.rec_rounds, plan.rec_budget,
                                   lambda p: trio.run(_recording_round, p, ctx, bodies)))
    return samples, idle


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small objects, few rounds (< 2 min)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--no-install", action="store_true", help="never apt-get install peers")
    parser.add_argument("--only", type=_groups, default=list(GROUPS), metavar="GROUPS",
                        help=f"comma-separated metric groups to run (default: all of {','.join(GROUPS)})")
    args = parser.parse_args(argv)
    plan = _Plan.make(args.quick, args.only)
    started = time.monotonic()
    _raise_nofile()
    tools: dict[str, str | None] = {}
    if plan.needs("bulk", "handshakes", "idle"):
        tools["haproxy"] = _ensure_tool("haproxy", "haproxy", not args.no_install)
    if plan.needs("bulk", "handshakes"):
        tools["stunnel"] = (_ensure_tool("stunnel4", "stunnel4", not args.no_install)
                            or shutil.which("stunnel"))
    procs: list[subprocess.Popen[bytes]] = []
    skipped: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="l4proxy-bench-") as tmp:
        work = Path(tmp)
        try:
            init_ca(work / "certs", trust_domain=TRUST, server_names=[HOST],
                    now=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5))
            key = "ck_" + secrets.token_urlsafe(24)
            write_private_file(work / "chunkd.key", key.encode())
            ctx = _client_context(work)
            paths = _start_all(work, plan, tools, key, procs, skipped)
            print(f"setup done in {time.monotonic() - started:.1f}s; paths: "
                  f"{', '.join(p.name for p in paths)}", file=sys.stderr)
            samples, idle = _measure(plan, paths, ctx, skipped)
            levels = {p.name: p.zstd_level for p in paths if p.zstd_level is not None}
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)

    today = dt.date.today().isoformat()
    doc: dict[str, Any] = {
        "schema": 2, "date": today,
        "machine": {"cores": os.cpu_count(), "cpu": _cpu_name(), "nofile_soft": _nofile_soft(),
                    "nofile_hard": _nofile_hard()},
        "versions": _versions(tools.get("haproxy"), tools.get("stunnel")),
        "quick": args.quick, "groups": plan.groups, "object_mib": plan.size >> 20,
        "pings": plan.pings, "handshake_seconds": plan.hs_seconds,
        "idle_sessions": plan.idle_levels,
        "recording": {"object_mib": plan.rec_size >> 20, "default_zstd_level": DEFAULT_ZSTD_LEVEL,
                      "zstd_levels": levels},
        "results": _results(samples, idle, levels), "ratios": _ratios(samples, idle, plan.groups),
        "skipped": skipped,
        "not_measured": ["tcp echo latency (the tcp path's ping is a CWP ping relayed opaquely)",
                         "the tcp target with recording off",
                         "negative zstd levels through the gateway (benchmarks.bench_recording "
                         "sweeps them in process)"],
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{today}.json").write_text(json.dumps(doc, indent=2) + "\n")
    table = _table(doc)
    (args.out / f"{today}.md").write_text(table)
    if _chart(doc, args.out / f"{today}.png"):
        print(f"chart: {args.out / f'{today}.png'}", file=sys.stderr)
    print(table)
    print(f"wrote {args.out / f'{today}.json'} in {doc['elapsed_s']} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
