"""``l4proxy`` command line.

Subcommands: ``serve``, ``config check``, ``ca init|issue-server|rotate|rotate-recording-key|
issue``, ``login``, ``dev-idp serve|token``, ``demo``, ``version``. Heavy imports happen
inside each command, so ``l4proxy --help`` stays fast.

Exit codes: 0 ok; 1 usage, invalid configuration or local error; 2 refused by the server;
7 cannot connect.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from . import __version__
from .netaddr import host_port_argument

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(1)


def _duration(text: str) -> float:
    from .durations import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="l4proxy", description="Just-in-time access gateway for a chunking service.")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = sub.add_parser("serve", help="run the control plane and the gateway the configuration names")
    serve.add_argument("--config", type=Path, required=True)
    serve.add_argument("--log-format", choices=["json", "text"], default="json",
                       help="log lines as JSON objects (default) or plain text")

    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", required=True, parser_class=_Parser)
    check = config_sub.add_parser("check", help="validate a configuration file")
    check.add_argument("file", type=Path)

    ca = sub.add_parser("ca", help="the internal certificate authority")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True, parser_class=_Parser)
    init = ca_sub.add_parser("init", help="create the CA, server certificate and recording key")
    init.add_argument("--dir", type=Path, default=Path("certs"))
    init.add_argument("--trust-domain", default="l4proxy.local")
    init.add_argument("--server-name", action="append", default=[],
                      help="DNS name or IP of the gateway (repeatable; default localhost, 127.0.0.1)")
    init.add_argument("--force", action="store_true", help="overwrite existing files")
    issue_server = ca_sub.add_parser("issue-server", help="renew the server certificate")
    issue_server.add_argument("--dir", type=Path, default=Path("certs"))
    issue_server.add_argument("--server-name", action="append", default=[])
    rotate = ca_sub.add_parser("rotate", help="new CA; the bundle keeps the old one while needed")
    rotate.add_argument("--dir", type=Path, default=Path("certs"))
    rrk = ca_sub.add_parser("rotate-recording-key", help="new recording signing key")
    rrk.add_argument("--dir", type=Path, default=Path("certs"))
    bg = ca_sub.add_parser("issue", help="break-glass: mint a certificate locally (<= 1 h, audited)")
    bg.add_argument("--dir", type=Path, default=Path("certs"))
    bg.add_argument("--identity", required=True, help="breakglass/NAME")
    bg.add_argument("--ttl", type=_duration, default=1800.0, help="lifetime (default 30m, max 1h)")
    bg.add_argument("--out", type=Path, required=True, help="where client.key/client.crt/ca.crt go")
    bg.add_argument("--audit-log", type=Path, help="default: <dir>/breakglass-audit.jsonl")
    bg.add_argument("--groups", default="",
                    help="comma-separated groups (e.g. an admin group, to lift locks when every "
                         "admin is locked out)")

    login = sub.add_parser("login", help="exchange an OIDC ID token for a client certificate")
    login.add_argument("--enroll", required=True, help="the control API URL (https://HOST:PORT)")
    login.add_argument("--ca-file", type=Path, required=True)
    tok = login.add_mutually_exclusive_group(required=True)
    tok.add_argument("--id-token-file", type=Path)
    tok.add_argument("--id-token-env", metavar="VAR")
    login.add_argument("--out", type=Path, help="default ${XDG_CONFIG_HOME:-~/.config}/l4proxy")
    login.add_argument("--ttl", type=_duration, help="requested lifetime (default: the provider's)")
    login.add_argument("--gateway", help="gateway HOST:PORT to put in the profile")
    login.add_argument("--server-name", help="TLS server name of the gateway for the profile")

    idp = sub.add_parser("dev-idp", help="a loopback-only OIDC provider for demos and tests (DEV ONLY)")
    idp_sub = idp.add_subparsers(dest="idp_command", required=True, parser_class=_Parser)
    idp_serve = idp_sub.add_parser("serve", help="serve discovery and JWKS on loopback")
    idp_serve.add_argument("--listen", type=host_port_argument, default=("127.0.0.1", 0))
    idp_serve.add_argument("--dir", type=Path, default=Path("certs/dev-idp"))
    idp_token = idp_sub.add_parser("token", help="print a signed ID token")
    idp_token.add_argument("--dir", type=Path, default=Path("certs/dev-idp"))
    idp_token.add_argument("--sub", required=True)
    idp_token.add_argument("--email")
    idp_token.add_argument("--groups", default="", help="comma-separated")
    idp_token.add_argument("--ttl", type=_duration, default=300.0)
    idp_token.add_argument("--aud", default="l4proxy")

    lock = sub.add_parser("lock", help="lock an identity, a group or a certificate serial (admins)")
    what = lock.add_mutually_exclusive_group(required=True)
    what.add_argument("--identity", metavar="PROVIDER/SUBJECT")
    what.add_argument("--group")
    what.add_argument("--serial", metavar="HEX")
    lock.add_argument("--until", help="RFC 3339 time or a duration such as 2h (default: until unlocked)")
    lock.add_argument("--reason")
    lock.add_argument("--profile", type=Path, help="login profile (default: l4proxy login's)")
    locks = sub.add_parser("locks", help="list active locks (admins)")
    locks.add_argument("--profile", type=Path)
    locks.add_argument("--json", action="store_true")
    unlock = sub.add_parser("unlock", help="remove a lock (admins)")
    unlock.add_argument("lock_id")
    unlock.add_argument("--reason")
    unlock.add_argument("--profile", type=Path)

    demo = sub.add_parser("demo", help="run chunkd on loopback and show a round trip with chunk")
    demo.add_argument("--work-dir", type=Path, default=Path("demo-work"),
                      help="where keys, data and logs go (default ./demo-work)")
    demo.add_argument("--port", type=int, default=0, help="chunkd port (default: a free one)")
    demo.add_argument("--once", action="store_true", help="exit after the round trip")
    sub.add_parser("version", help="print the version")
    return p


def _fail(message: str, code: int = 1) -> int:
    print(f"l4proxy: {message}", file=sys.stderr)
    return code


def _config_check(path: Path) -> int:
    from .config import check_config

    result = check_config(path)
    for problem in result.problems:
        print(str(problem))
    for warning in result.warnings:
        print(f"warning: {warning}")
    if result.problems:
        return 1
    print(f"{path}: ok")
    return 0


def _serve(path: Path, log_format: str) -> int:
    from .config import ConfigError, load_config
    from .control import ControlPlaneError
    from .serve import JsonFormatter, Server

    if log_format == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())
    try:
        config = load_config(path)
    except ConfigError as exc:
        return _fail(f"invalid configuration:\n{exc}")
    import trio

    from ._alloc import tune_allocator, tune_gc

    logging.getLogger("l4proxy.serve").info("%s; %s", tune_allocator(), tune_gc())
    try:
        trio.run(Server(path, config).run)
    except BaseExceptionGroup as group:
        failure = _first(group, ControlPlaneError, OSError, _gateway_error())
        if failure is None:
            raise
        return _fail(str(failure) if not isinstance(failure, OSError)
                     else f"cannot listen: {failure}")
    except (ControlPlaneError, OSError, _gateway_error()) as exc:
        return _fail(str(exc))
    return 0


def _gateway_error() -> type[Exception]:
    from .gateway import GatewayConfigError

    return GatewayConfigError


def _first(group: BaseExceptionGroup, *types: type[BaseException]) -> BaseException | None:
    """The first leaf exception of one of ``types`` in a (nested) exception group."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found = _first(exc, *types)
            if found is not None:
                return found
        elif isinstance(exc, types):
            return exc
    return None


def _ca(args: argparse.Namespace) -> int:
    import datetime as dt

    from .identity import CaError, CaExists, CertificateAuthority, init_ca, rotate_ca, rotate_recording_key

    now = dt.datetime.now(dt.UTC)
    try:
        if args.ca_command == "init":
            files = init_ca(args.dir, trust_domain=args.trust_domain,
                            server_names=args.server_name or ["localhost", "127.0.0.1"],
                            now=now, force=args.force)
            print(f"CA for trust domain {args.trust_domain!r} written to {files.dir}")
            return 0
        if args.ca_command == "issue-server":
            ca = CertificateAuthority.load(args.dir)
            ca.issue_server(server_names=args.server_name or ["localhost", "127.0.0.1"], now=now)
            print(f"server certificate renewed in {args.dir}")
            return 0
        if args.ca_command == "rotate":
            rotate_ca(args.dir, now=now)
            print(f"new CA in {args.dir}; bundle.pem keeps the old CA until its leaves expire")
            return 0
        if args.ca_command == "rotate-recording-key":
            key_id = rotate_recording_key(args.dir, now=now)
            print(f"new recording key {key_id}")
            return 0
        if args.ca_command == "issue":
            return _breakglass(args, now)
    except CaExists as exc:
        return _fail(f"{exc} (use --force to overwrite)")
    except (CaError, ValueError, OSError) as exc:
        return _fail(str(exc))
    raise AssertionError(args.ca_command)  # pragma: no cover


def _breakglass(args: argparse.Namespace, now: object) -> int:
    import datetime as dt

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from .audit import AuditLog
    from .identity import CertificateAuthority
    from .login import write_private_file

    assert isinstance(now, dt.datetime)
    provider, _, name = args.identity.partition("/")
    if provider != "breakglass" or not name:
        return _fail("--identity must be breakglass/NAME")
    ca = CertificateAuthority.load(args.dir)
    key = ec.generate_private_key(ec.SECP256R1())
    groups = tuple(g for g in args.groups.split(",") if g)
    cert, clamped = ca.issue_breakglass(name=name, public_key=key.public_key(),
                                        ttl=dt.timedelta(seconds=args.ttl), now=now, groups=groups)
    args.out.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private_file(args.out / "client.key", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    write_private_file(args.out / "client.crt", cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    write_private_file(args.out / "ca.crt", ca.bundle_pem(now=now), mode=0o644)
    audit = AuditLog(args.audit_log or args.dir / "breakglass-audit.jsonl")
    try:
        audit.write("breakglass_issued", {
            "identity": f"breakglass/{name}", "serial": f"{cert.serial_number:x}",
            "lifetime_s": int((cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds()),
            "operator": os.environ.get("USER", "?"), "ttl_clamped": clamped,
            "groups": list(groups)})
    finally:
        audit.close()
    print(f"break-glass certificate for breakglass/{name} in {args.out}, expires "
          f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}" + (" (ttl capped at 1h)" if clamped else ""))
    return 0


def _login(args: argparse.Namespace) -> int:
    from .login import LoginError, default_profile_dir, login

    if args.id_token_file:
        try:
            token = args.id_token_file.read_text().strip()
        except OSError as exc:
            return _fail(f"cannot read --id-token-file: {exc.strerror}")
    else:
        token = os.environ.get(args.id_token_env, "").strip()
        if not token:
            return _fail(f"environment variable {args.id_token_env} is empty or unset")
    try:
        result = login(enroll_url=args.enroll, ca_file=args.ca_file, id_token=token,
                       out_dir=args.out or default_profile_dir(),
                       ttl_seconds=int(args.ttl) if args.ttl else None,
                       gateway=args.gateway, server_name=args.server_name)
    except LoginError as exc:
        return _fail(str(exc), exc.exit_code)
    print(f"logged in as {result.identity}; certificate expires {result.expires_at}"
          + (" (lifetime clamped to the provider's maximum)" if result.ttl_clamped else ""))
    print(f"files in {result.out_dir}")
    return 0


def _dev_idp(args: argparse.Namespace) -> int:
    import time

    from .devidp import DevIdp, read_issuer, serve_dev_idp

    if args.idp_command == "serve":
        import trio

        host, port = args.listen

        async def run() -> None:
            async with trio.open_nursery() as nursery:
                bound = await nursery.start(serve_dev_idp, args.dir, host, port)
                print(f"dev-idp (DEV ONLY) serving http://{bound[0]}:{bound[1]} "
                      f"(issuer written to {args.dir / 'issuer'})", flush=True)

        try:
            trio.run(run)
        except KeyboardInterrupt:
            return 0
        except BaseExceptionGroup as group:
            if _first(group, KeyboardInterrupt) is not None:
                return 0
            failure = _first(group, ValueError, OSError)
            if failure is None:
                raise
            return _fail(str(failure))
        except (ValueError, OSError) as exc:
            return _fail(str(exc))
        return 0
    try:
        issuer = read_issuer(args.dir)
    except OSError:
        return _fail(f"no issuer in {args.dir}: start `l4proxy dev-idp serve` first")
    idp = DevIdp(args.dir)
    groups = tuple(g for g in args.groups.split(",") if g)
    print(idp.mint_token(issuer=issuer, sub=args.sub, email=args.email, groups=groups,
                         ttl=args.ttl, aud=args.aud, now=time.time()))
    return 0


def _locks(args: argparse.Namespace) -> int:
    import json

    from . import admin
    from .login import default_profile_dir

    profile = args.profile or default_profile_dir()
    try:
        if args.command == "lock":
            made = admin.lock(profile, identity=args.identity, group=args.group, serial=args.serial,
                              until=args.until, reason=args.reason)
            print(admin.format_locks([made]))
        elif args.command == "locks":
            found = admin.list_locks(profile)
            print(json.dumps(found, indent=2) if args.json else admin.format_locks(found))
        else:
            removed = admin.unlock(profile, args.lock_id, reason=args.reason)
            print(f"removed lock {removed.get('id', args.lock_id)}")
    except admin.AdminError as exc:
        return _fail(str(exc), exc.exit_code)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.command == "version":
        print(f"l4proxy {__version__}")
        return 0
    if args.command == "config":
        return _config_check(args.file)
    if args.command == "serve":
        return _serve(args.config, args.log_format)
    if args.command == "ca":
        return _ca(args)
    if args.command == "login":
        return _login(args)
    if args.command == "dev-idp":
        return _dev_idp(args)
    if args.command in ("lock", "locks", "unlock"):
        return _locks(args)
    if args.command == "demo":
        from .demo import run_demo

        try:
            return run_demo(args.work_dir, port=args.port, once=args.once)
        except RuntimeError as exc:
            return _fail(f"demo: {exc}")
    raise AssertionError(args.command)  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
