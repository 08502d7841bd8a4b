"""``l4proxy`` command line. For now: ``demo`` and ``version``; later issues add serve,
config, ca, login, approvals and locks."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(1)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="l4proxy", description="Just-in-time access gateway for a chunking service.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser("demo", help="run chunkd on loopback and show a round trip with chunk")
    demo.add_argument("--work-dir", type=Path, default=Path("demo-work"),
                      help="where keys, data and logs go (default ./demo-work)")
    demo.add_argument("--port", type=int, default=0, help="chunkd port (default: a free one)")
    demo.add_argument("--once", action="store_true", help="exit after the round trip")
    sub.add_parser("version", help="print the version")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "version":
        print(f"l4proxy {__version__}")
        return 0
    if args.command == "demo":
        from .demo import run_demo

        try:
            return run_demo(args.work_dir, port=args.port, once=args.once)
        except RuntimeError as exc:
            print(f"l4proxy demo: {exc}", file=sys.stderr)
            return 1
    raise AssertionError(args.command)  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
