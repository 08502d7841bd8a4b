"""``chunkd`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import trio

from l4proxy.netaddr import host_port_argument
from l4proxy.wire import Limits

from ._errors import ChunkdConfigError
from ._keys import load_key_file, load_keys_toml
from ._server import ChunkdConfig, serve

__all__ = ["main"]


def _size(text: str) -> int:
    from l4proxy.sizes import parse_size
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chunkd", description="The reference chunking service (CWP/1).")
    p.add_argument("--listen", type=host_port_argument, default=("127.0.0.1", 7070),
                   help="HOST:PORT to listen on (default 127.0.0.1:7070; port 0 picks one)")
    p.add_argument("--data", type=Path, required=True, help="data directory (created 0700)")
    keys = p.add_mutually_exclusive_group(required=True)
    keys.add_argument("--api-key-file", type=Path, help="file holding one all-powerful API key (mode 0600)")
    keys.add_argument("--api-keys", type=Path, help="TOML file of named, scoped keys (mode 0600)")
    p.add_argument("--tls-cert", type=Path, help="serve TLS with this certificate chain (PEM)")
    p.add_argument("--tls-key", type=Path, help="private key of --tls-cert (PEM)")
    p.add_argument("--max-frame", type=_size, default=Limits().max_frame_payload,
                   help="largest frame payload offered (default 1MiB)")
    p.add_argument("--idle-timeout", type=float, default=300.0, help="seconds (default 300)")
    p.add_argument("--max-connections", type=int, default=1024)
    p.add_argument("--port-file", type=Path,
                   help="write the bound port here once listening (for scripts)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if bool(args.tls_cert) != bool(args.tls_key):
        print("chunkd: --tls-cert and --tls-key go together", file=sys.stderr)
        return 1
    try:
        ring = load_key_file(args.api_key_file) if args.api_key_file else load_keys_toml(args.api_keys)
        limits = Limits(max_frame_payload=args.max_frame,
                        max_control_size=min(Limits().max_control_size, args.max_frame))
        config = ChunkdConfig(host=args.listen[0], port=args.listen[1], data_dir=args.data,
                              keys=ring, tls_cert=args.tls_cert, tls_key=args.tls_key,
                              limits=limits, idle_timeout=args.idle_timeout,
                              max_connections=args.max_connections)
    except ChunkdConfigError as exc:
        print(f"chunkd: {exc}", file=sys.stderr)
        return 1

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            addrs = await nursery.start(serve, config)
            print(f"chunkd listening on {addrs[0][0]}:{addrs[0][1]}", file=sys.stderr, flush=True)
            if args.port_file:
                tmp = args.port_file.with_suffix(".tmp")
                tmp.write_text(f"{addrs[0][1]}\n")
                tmp.replace(args.port_file)

    try:
        trio.run(run)
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"chunkd: cannot listen on {args.listen[0]}:{args.listen[1]}: {exc.strerror}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
