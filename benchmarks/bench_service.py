"""Throughput of chunkd and the client library over loopback.

Run ``python -m benchmarks.bench_service [--quick]``. Starts chunkd as a subprocess in a
temp dir (plain TCP and TLS), then each round measures with the async client:

* ``put``: upload an object (MB/s), ``get``: download it (MB/s);
* ``chunk_cdc``: the service chunks the object with CDC (MB/s of object);
* ``ping_rtt``: 64-byte ping round trips on one connection (µs, median of the round).

Prints one JSON object: ``{"benchmark": "service", "results": [{"metric", "target", "unit",
"rounds", "min", "median", "max"}]}``. MB is 10**6 bytes. Bounded: < 60 s, ``--quick`` < 15 s.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import secrets
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from l4proxy.client import ChunkClient

MB = 1_000_000


def _self_signed(work: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = work / "bench.crt", work / "bench.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


def _start(work: Path, name: str, extra: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    port_file = work / f"{name}.port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "l4proxy.chunkd.cli", "--listen", "127.0.0.1:0", "--data",
         str(work / f"data-{name}"), "--api-key-file", str(work / "key"), "--port-file",
         str(port_file), "--log-level", "WARNING", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not port_file.exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError("chunkd did not start")
        time.sleep(0.05)
    return proc, int(port_file.read_text())


async def _round(port: int, key: str, ctx: ssl.SSLContext | None, size: int,
                 pings: int) -> dict[str, float]:
    body = os.urandom(1 << 20) * (size >> 20)
    out: dict[str, float] = {}
    async with ChunkClient.connect("127.0.0.1", port, api_key=key, ssl_context=ctx,
                                   server_name="localhost") as c:
        bucket = "b" + secrets.token_hex(4)
        await c.create_bucket(bucket)
        t = time.perf_counter()
        await c.put(bucket, "obj", body)
        out["put"] = size / (time.perf_counter() - t) / MB
        t = time.perf_counter()
        got, _ = await c.get(bucket, "obj")
        out["get"] = size / (time.perf_counter() - t) / MB
        assert len(got) == size
        t = time.perf_counter()
        await c.chunk(bucket, "obj", strategy="cdc")
        out["chunk_cdc"] = size / (time.perf_counter() - t) / MB
        rtts = []
        payload = b"x" * 64
        for _ in range(pings):
            t = time.perf_counter()
            await c.ping(payload)
            rtts.append((time.perf_counter() - t) * 1e6)
        out["ping_rtt"] = statistics.median(rtts)
        await c.delete_bucket(bucket, force=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    rounds, size, pings = (2, 32 << 20, 300) if args.quick else (5, 256 << 20, 2000)
    units = {"put": "MB/s", "get": "MB/s", "chunk_cdc": "MB/s", "ping_rtt": "us"}
    samples: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        work = Path(tmp)
        key = "ck_" + secrets.token_urlsafe(24)
        fd = os.open(work / "key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key)
        cert, tls_key = _self_signed(work)
        plain, plain_port = _start(work, "plain", [])
        tls, tls_port = _start(work, "tls", ["--tls-cert", str(cert), "--tls-key", str(tls_key)])
        ctx = ssl.create_default_context(cafile=str(cert))
        try:
            for _ in range(rounds):  # interleave the two targets round by round
                for target, port, context in (("tcp", plain_port, None), ("tls", tls_port, ctx)):
                    result = trio.run(_round, port, key, context, size, pings)
                    for metric, value in result.items():
                        samples.setdefault((metric, target), []).append(value)
        finally:
            for proc in (plain, tls):
                proc.terminate()
                proc.wait(timeout=10)
    results: list[dict[str, Any]] = [
        {"metric": metric, "target": target, "unit": units[metric],
         "rounds": [round(v, 1) for v in values], "min": round(min(values), 1),
         "median": round(statistics.median(values), 1), "max": round(max(values), 1)}
        for (metric, target), values in samples.items()
    ]
    print(json.dumps({"benchmark": "service", "object_bytes": size, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
