"""``l4proxy serve``: the control plane and, when listeners are configured, the gateway, in
one process, sharing one state store, one audit log and one metrics registry.

Signals: SIGHUP re-reads and validates the whole configuration and swaps it in (on any
error the old state stays, the error is logged and counted); SIGTERM and SIGINT drain
(stop accepting, GOAWAY to sessions, end what is left at ``limits.drain_timeout``).
``POST /v1/admin/reload`` does what SIGHUP does.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from .audit import AuditLog
from .config import Config, ConfigError, load_config
from .control import ControlAddresses, run_control_plane
from .store import AsyncStateStore, SqliteStateStore

__all__ = ["JsonFormatter", "ServeAddresses", "Server", "serve_forever"]

log = logging.getLogger("l4proxy")


class JsonFormatter(logging.Formatter):
    """One JSON object per log line (time, level, logger, message, exception)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(), "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServeAddresses:
    control: ControlAddresses
    gateway: dict[str, tuple[str, int]]


class Server:
    """The running process: reload and drain act on it."""

    def __init__(self, config_path: Path, config: Config) -> None:
        self.config_path = config_path
        self.config = config
        self.gateway: Any = None
        self.control: ControlAddresses | None = None
        self.reload_failures = 0

    async def reload(self) -> dict[str, Any]:
        """Re-read, validate and apply the configuration file. Never raises."""
        try:
            new = await trio.to_thread.run_sync(load_config, self.config_path)
        except ConfigError as exc:
            self.reload_failures += 1
            log.error("reload refused: invalid configuration:\n%s", exc)
            return {"reloaded": False, "problems": [str(p) for p in exc.problems]}
        try:
            if self.gateway is not None:
                self.gateway.reload(new)
        except Exception as exc:
            self.reload_failures += 1
            log.error("reload refused: %s", exc)
            return {"reloaded": False, "problems": [str(exc)]}
        self.config = new
        if self.control is not None:
            self.control.api.config = new
        log.info("configuration reloaded from %s", self.config_path)
        return {"reloaded": True, "problems": []}

    async def run(self, *, task_status: trio.TaskStatus[ServeAddresses]
                  = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        sqlite = SqliteStateStore.open(config.gateway.state_dir)
        store = AsyncStateStore(sqlite)
        audit = AuditLog.for_gateway(config.gateway)
        try:
            async with trio.open_nursery() as nursery:
                self.control = await nursery.start(functools.partial(
                    run_control_plane, config, audit=audit, store=store))
                self.control.api.reload_hook = self.reload
                addresses: dict[str, tuple[str, int]] = {}
                if config.listeners:
                    from .gateway import Gateway

                    self.control.api.readiness.gateway_bound = False
                    self.gateway = Gateway(config, store=store, audit=audit,
                                           registry=self.control.api.registry)
                    if self.gateway.recorder is not None:
                        self.control.api.readiness.checks["recording_space"] = \
                            self.gateway.recorder.free_space_ok
                    addresses = await nursery.start(self.gateway.serve)
                    self.control.api.readiness.gateway_bound = True
                task_status.started(ServeAddresses(control=self.control, gateway=addresses))
                with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM,
                                               signal.SIGINT) as signals:
                    async for signum in signals:
                        if signum == signal.SIGHUP:
                            await self.reload()
                            continue
                        log.info("signal %s: draining", signal.Signals(signum).name)
                        if self.gateway is not None:
                            await self.gateway.drain()
                        nursery.cancel_scope.cancel()
                        break
        finally:
            sqlite.close()
            audit.close()


def serve_forever(config_path: Path) -> int:
    """Run until SIGTERM/SIGINT. Returns the exit status."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"l4proxy: invalid configuration:\n{exc}")
        return 1
    server = Server(config_path, config)
    trio.run(server.run)
    return 0
