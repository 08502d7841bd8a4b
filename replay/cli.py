"""``replay``: the auditors' tool. Session recordings arrive with the recording issue;
for now it reports its version and says what is coming, and never imports trio."""

from __future__ import annotations

import argparse
import sys

from . import __version__

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="replay",
        description="Inspect and verify l4proxy session recordings (list, show, verify, dump, "
                    "play, export arrive with session recording).")
    parser.add_argument("--version", action="version", version=f"replay {__version__}")
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
