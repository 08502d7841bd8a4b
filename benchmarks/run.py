"""The gateway side by side with direct TLS, haproxy and stunnel, all on loopback.

Run ``python -m benchmarks.run [--quick] [--out DIR]`` (default ``benchmarks/results``).

Sets up in a temp dir: a CA (``init_ca``), chunkd over plain TCP and over TLS, two
``l4proxy serve`` processes (recording off / ``[recording]`` on), each with a ``cwp`` listener
and a ``tcp`` listener in front of the plain chunkd, and haproxy and stunnel as mTLS-terminating
TCP proxies (client certificate from our CA required) in front of the same plain chunkd. A peer
that is missing and cannot be installed with apt-get is marked skipped, never an error.

Every metric runs in interleaved rounds (each round visits every path, in a rotated order), and
every ratio is the median of per-round ratios. Writes ``<out>/<YYYY-MM-DD>.json``, a Markdown
table next to it (``.md``), a PNG chart when matplotlib is installed, and prints the table.
MB is 10**6 bytes. Bounded: about 1.5 minutes with ``--quick``, under 10 without.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from l4proxy.client import ChunkClient
from l4proxy.identity import CertificateAuthority, Identity, init_ca

MB = 1_000_000
GB = 1_000_000_000
HOST = "127.0.0.1"
TRUST = "bench.local"
CLK_TCK = os.sysconf("SC_CLK_TCK")

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


@dataclass
class Path_:
    """One way to reach chunkd: where to connect and what the client presents."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]  # the process whose CPU is charged to this path
    api_key: str | None  # None: the gateway injects the credential


# --- setup ---------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _write_private(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


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
    port_file = work / f"{name}.port"
    log = open(work / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "l4proxy.chunkd.cli", "--listen", f"{HOST}:0", "--data",
         str(work / f"data-{name}"), "--api-key-file", str(work / "chunkd.key"), "--port-file",
         str(port_file), "--log-level", "WARNING", *extra],
        stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 20
    while not port_file.exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError(f"chunkd {name} did not start")
        time.sleep(0.05)
    return proc, int(port_file.read_text())


def _gateway_config(work: Path, chunkd_port: int, ports: dict[str, int], recording: bool) -> str:
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
    if recording:
        text += '[recording]\ndir = "recordings"\nmin_free_bytes = 0\n'
    return text


def _start_gateway(work: Path, name: str, chunkd_port: int,
                   recording: bool) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    home = work / name
    home.mkdir()
    ports = {k: _free_port() for k in ("control", "ops", "cwp", "tcp")}
    config = home / "l4proxy.toml"
    config.write_text(_gateway_config(work, chunkd_port, ports, recording))
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
                                   + (home / "serve.log").read_text()[-2000:]) from None
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
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _start_haproxy(binary: str, work: Path, upstream: int) -> tuple[subprocess.Popen[bytes], int]:
    certs = work / "certs"
    pem = work / "haproxy.pem"
    pem.write_bytes((certs / "server.crt").read_bytes() + (certs / "server.key").read_bytes())
    pem.chmod(0o600)
    port = _free_port()
    cfg = work / "haproxy.cfg"
    cfg.write_text(f"""global
    maxconn {_maxconn()}
defaults
    mode tcp
    timeout connect 10s
    timeout client 5m
    timeout server 5m
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
    port = _free_port()
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
    key_path = _write_private(work / "client.key", key.private_bytes(
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


UNITS = {"put_throughput": "MB/s", "get_throughput": "MB/s", "ping_p50": "us", "ping_p99": "us",
         "added_latency_p50": "us", "ping_cpu_us": "us", "handshakes_per_s": "1/s",
         "handshake_cpu_ms": "ms"}


def _summ(values: list[float]) -> dict[str, Any]:
    return {"rounds": [round(v, 2) for v in values], "min": round(min(values), 2),
            "median": round(statistics.median(values), 2), "max": round(max(values), 2)}


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
        "haproxy": out([haproxy, "-v"], r"version (\S+)") if haproxy else "skipped (not installed)",
        "stunnel": out([stunnel, "-version"], r"stunnel (\S+)") if stunnel else "skipped (not installed)",
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ratios(samples: dict[tuple[str, str], list[float]]) -> list[dict[str, Any]]:
    out = []
    for metric, num, den, goal, op in RATIO_GOALS:
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
    return out


def _table(doc: dict[str, Any]) -> str:
    lines = [f"Run {doc['date']} on {doc['machine']['cores']} cores ({doc['machine']['cpu']}); "
             f"{doc['object_mib']} MiB objects, {doc['pings']} pings/round, "
             f"{doc['handshake_seconds']} s of handshakes/round; haproxy "
             f"{doc['versions']['haproxy']}, stunnel {doc['versions']['stunnel']}, "
             f"{doc['versions']['openssl']}, Python {doc['versions']['python']}.", "",
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
        lines.append(f"| {r['metric']} | {r['target']} | {r['unit']} | {r['median']} | {r['min']} "
                     f"| {r['max']} | {len(r['rounds'])} | {cpu} |")
    for s in doc["skipped"]:
        lines.append(f"| (all) | {s['target']} | | skipped | | | | {s['reason']} |")
    lines += ["", "| ratio | num / den | value (median of per-round) | goal | met |",
              "|---|---|---:|---:|---|"]
    for q in doc["ratios"]:
        met = {True: "yes", False: "**no**", None: "n/a"}[q["met"]]
        value = "n/a" if q["value"] is None else q["value"]
        unit = " µs" if q["den"] == "absolute_us" else "x"
        lines.append(f"| {q['metric']} | {q['num']} / {q['den']} | {value} | {q['op']} "
                     f"{q['goal']}{unit} | {met} |")
    return "\n".join(lines) + "\n"


def _chart(doc: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return False
    rows = [r for r in doc["results"] if r["unit"] == "MB/s"]
    fig, ax = plt.subplots(figsize=(9, 4))
    labels = [f"{r['metric'].split('_')[0]}\n{r['target']}" for r in rows]
    ax.bar(range(len(rows)), [r["median"] for r in rows],
           yerr=[[r["median"] - r["min"] for r in rows], [r["max"] - r["median"] for r in rows]])
    ax.set_xticks(range(len(rows)), labels, fontsize=6)
    ax.set_ylabel("MB/s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


# --- main ----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small objects, few rounds (< 2 min)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--no-install", action="store_true", help="never apt-get install peers")
    args = parser.parse_args(argv)
    if args.quick:
        rounds, size, pings, hs_seconds, bulk_budget, hs_budget = 3, 64 << 20, 500, 2.0, 50, 35
    else:
        rounds, size, pings, hs_seconds, bulk_budget, hs_budget = 5, 512 << 20, 3000, 5.0, 360, 150
    started = time.monotonic()
    _raise_nofile()
    haproxy = _ensure_tool("haproxy", "haproxy", not args.no_install)
    stunnel = _ensure_tool("stunnel4", "stunnel4", not args.no_install) or shutil.which("stunnel")
    procs: list[subprocess.Popen[bytes]] = []
    skipped: list[dict[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="l4proxy-bench-") as tmp:
        work = Path(tmp)
        try:
            init_ca(work / "certs", trust_domain=TRUST, server_names=[HOST],
                    now=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5))
            key = "ck_" + secrets.token_urlsafe(24)
            _write_private(work / "chunkd.key", key.encode())
            ctx = _client_context(work)
            plain, plain_port = _start_chunkd(work, "plain", [])
            procs.append(plain)
            tls, tls_port = _start_chunkd(work, "tls", [
                "--tls-cert", str(work / "certs" / "server.crt"),
                "--tls-key", str(work / "certs" / "server.key")])
            procs.append(tls)
            norec, norec_ports = _start_gateway(work, "gw-norec", plain_port, recording=False)
            procs.append(norec)
            rec, rec_ports = _start_gateway(work, "gw-rec", plain_port, recording=True)
            procs.append(rec)
            paths = [Path_("direct-plain", plain_port, plain, key),
                     Path_("direct-tls", tls_port, tls, key),
                     Path_("gateway-norec", norec_ports["cwp"], norec, None),
                     Path_("gateway-rec", rec_ports["cwp"], rec, None),
                     Path_("gateway-tcp-rec", rec_ports["tcp"], rec, key)]
            for name, binary, start in (("haproxy", haproxy, _start_haproxy),
                                        ("stunnel", stunnel, _start_stunnel)):
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
            print(f"setup done in {time.monotonic() - started:.1f}s; paths: "
                  f"{', '.join(p.name for p in paths)}", file=sys.stderr)

            body = os.urandom(size)
            print("bulk throughput + ping latency", file=sys.stderr)
            samples = _run_rounds(paths, rounds, bulk_budget,
                                  lambda p: trio.run(_bulk_round, p, ctx, body, pings))
            body = b""
            # added latency over direct to the same (plain) chunkd the proxies relay to, round by
            # round: the proxy's whole cost, its TLS included
            direct = samples.get(("ping_p50", "direct-plain"), [])
            for p in paths[1:]:
                mine = samples.get(("ping_p50", p.name), [])
                samples[("added_latency_p50", p.name)] = [a - d for a, d in zip(mine, direct,
                                                                                  strict=False)]
            hs_paths = [p for p in paths if p.name in ("direct-tls", "gateway-norec", "gateway-rec",
                                                       "haproxy", "stunnel")]
            print("handshakes", file=sys.stderr)
            samples.update(_run_rounds(hs_paths, rounds, hs_budget,
                                       lambda p: trio.run(_handshake_round, p, ctx, hs_seconds)))
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()

    results: list[dict[str, Any]] = []
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
    today = dt.date.today().isoformat()
    doc: dict[str, Any] = {
        "schema": 1, "date": today,
        "machine": {"cores": os.cpu_count(), "cpu": _cpu_name()},
        "versions": _versions(haproxy, stunnel),
        "quick": args.quick, "object_mib": size >> 20, "pings": pings,
        "handshake_seconds": hs_seconds,
        "results": results, "ratios": _ratios(samples), "skipped": skipped,
        "not_measured": ["idle-session RSS (1,000 / 5,000 / 9,000 sessions)",
                         "recording bytes written per byte relayed, and zstd level -1/1 sweep",
                         "tcp echo latency (the tcp path's ping is a CWP ping relayed opaquely)"],
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
