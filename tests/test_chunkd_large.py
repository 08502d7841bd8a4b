"""A large object streams through chunkd and the client with bounded memory.

Both run as subprocesses so their peak RSS (VmHWM) can be read on their own.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from .conftest import ChunkdProcess

SIZE = 1 << 30  # 1 GiB
#: the peak RSS growth we allow for streaming SIZE bytes each way
BUDGET = 32 << 20

CLIENT = textwrap.dedent(
    """
    import hashlib, sys
    from l4proxy.client import SyncChunkClient

    def vmhwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    class Source:
        # a file-like object producing SIZE pseudo-random bytes without holding them
        def __init__(self, size):
            self.left = size
            self.block = hashlib.sha256(b"seed").digest() * 32768  # 1 MiB
            self.digest = hashlib.sha256()
        def read(self, n):
            n = min(n, self.left, len(self.block))
            self.left -= n
            piece = self.block[:n]
            self.digest.update(piece)
            return piece

    class Sink:
        def __init__(self):
            self.digest = hashlib.sha256()
            self.size = 0
        def write(self, data):
            self.digest.update(data)
            self.size += len(data)

    host, port, key, size = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    with SyncChunkClient(host, port, api_key=key) as c:
        c.create_bucket("big")
        baseline = vmhwm()
        src = Source(size)
        put = c.put("big", "blob", src, size=size)
        assert put["sha256"] == src.digest.hexdigest(), "put digest"
        sink = Sink()
        _, res = c.get("big", "blob", sink=sink)
        assert sink.size == size and sink.digest.hexdigest() == put["sha256"], "get digest"
    print(baseline, vmhwm())
    """
)


def _vmhwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_one_gib_put_and_get_stay_within_a_few_mib(chunkd_process: ChunkdProcess) -> None:
    server_before = _vmhwm(chunkd_process.proc.pid)
    out = subprocess.run(
        [sys.executable, "-c", CLIENT, chunkd_process.host, str(chunkd_process.port),
         chunkd_process.api_key, str(SIZE)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    client_before, client_after = map(int, out.stdout.split())
    server_after = _vmhwm(chunkd_process.proc.pid)
    assert client_after - client_before < BUDGET, (client_before, client_after)
    assert server_after - server_before < BUDGET, (server_before, server_after)
