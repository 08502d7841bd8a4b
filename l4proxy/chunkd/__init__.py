"""chunkd: the reference chunking service (objects, chunking, typed tables) over CWP/1.

Used as the upstream by the demo, the tests and the benchmarks. See PROTOCOL.md for the
wire protocol and README.md for the command line.
"""

from ._errors import ChunkdConfigError, ServiceError
from ._keys import ApiKey, KeyRing, load_key_file, load_keys_toml
from ._server import ChunkdConfig, ChunkService, serve

__all__ = [
    "ApiKey",
    "ChunkService",
    "ChunkdConfig",
    "ChunkdConfigError",
    "KeyRing",
    "ServiceError",
    "load_key_file",
    "load_keys_toml",
    "serve",
]
