"""Small address helpers shared by configuration checks, fetchers and servers."""

from __future__ import annotations

import argparse
import ipaddress
import re
import socket

__all__ = ["free_loopback_port", "host_port_argument", "is_loopback_host", "parse_host_port"]

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(?:\.{_LABEL})*\.?", re.IGNORECASE)
_PORT = re.compile(r"[0-9]{1,5}")


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (127.0.0.0/8, ::1), brackets allowed."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` (port 0 lets the system pick).

    Raises:
        ValueError: why it is not an address (without echoing it).
    """
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError("missing ']:PORT' after an IPv6 address")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("not an IPv6 address inside the brackets") from None
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError("missing ':PORT'")
        if ":" in host:
            raise ValueError("an IPv6 address must be in brackets")
        if not host:
            raise ValueError("missing HOST")
        if re.fullmatch(r"[0-9.]+", host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ValueError("not an IPv4 address") from None
        elif not _HOSTNAME.fullmatch(host):
            raise ValueError("not a host name")
    if not _PORT.fullmatch(port_text) or int(port_text) > 65535:
        raise ValueError("the port must be a number from 0 to 65535")
    return host, int(port_text)


def host_port_argument(text: str) -> tuple[str, int]:
    """:func:`parse_host_port` as an argparse ``type=`` (port 0 picks a free one)."""
    try:
        return parse_host_port(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (expected HOST:PORT)") from None


def free_loopback_port() -> int:
    """A port on 127.0.0.1 nothing listens on right now (bind one, close it): for demos
    and tests that must write a port into a configuration before the server starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port
