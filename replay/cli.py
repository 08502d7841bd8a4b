"""``replay``: the auditors' tool -- ``replay verify`` and ``replay dump``.

Recordings are untrusted input: every problem with a file, a key or the index ends with a
one-line message and an exit code, never a traceback. Exit codes: 0 intact, 2 tampered,
3 incomplete, 4 unreadable (or a key, index or output that cannot be used), 64 usage.
With several files ``verify`` exits with the highest code. Never imports trio.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, NoReturn

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from . import __version__
from ._format import FILE_SUFFIX, Direction, RecordingError, key_id
from ._reader import (
    IndexEntry,
    ReaderLimits,
    SessionIndex,
    UnreadableRecording,
    Verdict,
    VerifyStatus,
    dump,
    load_keyring,
    load_public_key,
    read_header,
    verify,
)

__all__ = ["EXIT_ERROR", "EXIT_USAGE", "main"]

#: Exit code for a command line that cannot be used (EX_USAGE).
EXIT_USAGE = 64
#: Exit code for an input that cannot be used (same as an unreadable recording).
EXIT_ERROR = int(VerifyStatus.UNREADABLE)


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error exits 64 (and ``--help`` still exits 0)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _parser() -> _Parser:
    parser = _Parser(prog="replay", description="Verify and dump l4proxy session recordings.")
    parser.add_argument("--version", action="version", version=f"replay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add_keys(p: argparse.ArgumentParser, *, required: bool) -> None:
        g = p.add_mutually_exclusive_group(required=required)
        g.add_argument("--pubkey", action="append", metavar="FILE", type=Path,
                       help="a trusted recording public key (PEM); repeat for several")
        g.add_argument("--keyring", metavar="DIR", type=Path,
                       help="a keyring directory of <key id>.pub files (or a CA directory holding "
                            "recording-keys/)")

    def add_limits(p: argparse.ArgumentParser) -> None:
        p.add_argument("--max-ratio", metavar="N", type=_positive_int, default=ReaderLimits().max_ratio,
                       help="decompress at most N times the file size (plus 64 MiB) without a verified "
                            "checkpoint (default %(default)s)")

    v = sub.add_parser("verify", help="check recordings' chains and signatures",
                       description="Verify recordings. Exit 0 intact, 2 tampered, 3 incomplete, "
                                   "4 unreadable; the highest code across files wins.")
    add_keys(v, required=True)
    v.add_argument("--index", metavar="DB", type=Path,
                   help="the session index (SQLite): a closed session must end with the trailer it records")
    v.add_argument("--json", action="store_true", help="one JSON verdict per file per line")
    add_limits(v)
    v.add_argument("files", nargs="+", metavar="FILE", type=Path)

    d = sub.add_parser("dump", help="write the recorded bytes of one direction",
                       description="Write exactly the bytes the client sent (to-gateway, sent) or "
                                   "received (to-client, received).")
    d.add_argument("session", metavar="SESSION", help="a recording file, or a session id with --index")
    d.add_argument("--direction", required=True,
                   choices=["to-gateway", "to-client", "sent", "received"])
    d.add_argument("-o", "--output", metavar="FILE", type=Path, help="write here (created 0600), "
                                                                     "not to standard output")
    d.add_argument("--index", metavar="DB", type=Path, help="the session index (SQLite)")
    add_keys(d, required=False)
    add_limits(d)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``replay``; returns the exit code (``--help`` and ``--version`` return 0)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (64)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        if args.command == "verify":
            return _verify(args)
        return _dump(args)
    except _UsageError as exc:
        print(f"replay: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (RecordingError, OSError) as exc:
        print(f"replay: error: {_os_message(exc)}", file=sys.stderr)
        return EXIT_ERROR


def _os_message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename + ': ' if exc.filename else ''}{exc.strerror}"
    return str(exc)


def _trusted(args: argparse.Namespace) -> dict[str, Ed25519PublicKey] | None:
    if args.keyring is not None:
        return load_keyring(args.keyring)
    if args.pubkey:
        keys: dict[str, Ed25519PublicKey] = {}
        for path in args.pubkey:
            key = load_public_key(path)
            keys[key_id(key)] = key
        return keys
    return None


def _index_entry(index: SessionIndex | None, path: Path) -> tuple[IndexEntry | None, str | None]:
    """The index row for the recording at ``path`` (looked up by its header's session id)
    and, if the file is named ``<id>.l4rec.zst`` for another session in the index, why that
    is wrong (another session's recording put in its place)."""
    if index is None:
        return None, None
    try:
        session_id = str(read_header(path)["session_id"])
    except UnreadableRecording:
        return None, None  # verify reports it
    mismatch = None
    named = path.name[:-len(FILE_SUFFIX)] if path.name.endswith(FILE_SUFFIX) else None
    if named and named != session_id and index.entry(named) is not None:
        mismatch = (f"the file is named for indexed session {named!r} but records session "
                    f"{session_id!r}")
    return index.entry(session_id), mismatch


def _verify(args: argparse.Namespace) -> int:
    trusted = _trusted(args)
    assert trusted is not None  # the group is required
    limits = ReaderLimits(max_ratio=args.max_ratio)
    index = SessionIndex(args.index) if args.index is not None else None
    worst = 0
    try:
        for path in args.files:
            entry, mismatch = _index_entry(index, path)
            verdict = verify(path, trusted=trusted, index_entry=entry, limits=limits)
            if mismatch is not None and verdict.status is not VerifyStatus.UNREADABLE:
                verdict = _tampered(verdict, mismatch)
            elif index is not None and entry is None and verdict.session_id is not None:
                verdict = dataclasses.replace(verdict, reasons=(*verdict.reasons, "not in the index"))
            if args.json:
                print(json.dumps(verdict.to_json(), sort_keys=True), flush=True)
            else:
                print(f"{path}: {verdict.summary()}", flush=True)
            worst = max(worst, verdict.exit_code)
    finally:
        if index is not None:
            index.close()
    return worst


def _tampered(verdict: Verdict, reason: str) -> Verdict:
    return dataclasses.replace(verdict, status=VerifyStatus.TAMPERED, reasons=(reason, *verdict.reasons))


def _dump(args: argparse.Namespace) -> int:
    direction = Direction.parse(args.direction)
    trusted = _trusted(args)
    index = SessionIndex(args.index) if args.index is not None else None
    try:
        path = Path(args.session)
        if not path.exists():
            if index is None:
                raise _UsageError(f"{args.session}: no such file (give --index to look up a session id)")
            found = index.file(args.session)
            if found is None:
                raise RecordingError(f"{args.session}: no such file, and no such session in {args.index}")
            path = found
        entry, mismatch = _index_entry(index, path)
        if mismatch is not None:
            print(f"replay: warning: {mismatch}", file=sys.stderr)
        out: IO[bytes]
        if args.output is not None:
            fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            out = os.fdopen(fd, "wb")
        else:
            out = sys.stdout.buffer
        try:
            result = dump(path, direction, out, trusted=trusted, index_entry=entry,
                          limits=ReaderLimits(max_ratio=args.max_ratio))
            out.flush()
        finally:
            if args.output is not None:
                out.close()
    finally:
        if index is not None:
            index.close()
    verdict = result.verdict
    for redaction in result.redactions:
        print(f"replay: redaction: {_describe(redaction)}", file=sys.stderr)
    print(f"replay: {result.bytes_written} bytes {direction.value}, sha256 {result.sha256.hex()}",
          file=sys.stderr)
    if trusted is None and verdict.status is not VerifyStatus.UNREADABLE:
        print("replay: note: signatures not checked (give --pubkey or --keyring to verify)", file=sys.stderr)
    if verdict.status is not VerifyStatus.INTACT:
        print(f"replay: {path}: {verdict.summary()}", file=sys.stderr)
        if result.bytes_written > result.verified_bytes:
            print(f"replay: warning: the last {result.bytes_written - result.verified_bytes} bytes written "
                  f"are not covered by a verified checkpoint", file=sys.stderr)
    return verdict.exit_code


def _describe(redaction: Any) -> str:
    if isinstance(redaction, Mapping):
        return json.dumps({str(k): (v.hex() if isinstance(v, bytes) else v) for k, v in redaction.items()},
                          sort_keys=True, default=repr)
    return ascii(redaction)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
