"""Entry point of ``claudemesh-daemon`` (and ``claudemesh daemon run``).

Takes the per-home lock (a second daemon exits at once with
:data:`~.home.EXIT_ALREADY_RUNNING`), sets up JSON-lines logging with size
rotation, and runs the :class:`~.service.Daemon` until SIGTERM/SIGINT or
``daemon.stop``, then drains and exits 0.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import signal
import sys
import time
from typing import Final

import trio

from .home import EXIT_ALREADY_RUNNING, EXIT_BAD_HOME, AlreadyRunning, Home, HomeError, default_home
from .service import Daemon

LOG_BYTES: Final = 1024 * 1024
LOG_BACKUPS: Final = 3


class JsonFormatter(logging.Formatter):
    """One JSON object per line; messages never include secrets by construction."""

    def format(self, record: logging.LogRecord) -> str:
        d = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            d["exc"] = self.formatException(record.exc_info)
        return json.dumps(d)


def setup_logging(home: Home) -> None:
    root = logging.getLogger("claudemesh")
    root.setLevel(logging.INFO)
    fh = logging.handlers.RotatingFileHandler(
        home.logs_dir / "daemon.log", maxBytes=LOG_BYTES, backupCount=LOG_BACKUPS
    )
    fh.setFormatter(JsonFormatter())
    root.addHandler(fh)
    (home.logs_dir / "daemon.log").chmod(0o600)
    err = logging.StreamHandler(sys.stderr)
    err.setFormatter(JsonFormatter())
    err.setLevel(logging.WARNING)
    root.addHandler(err)


async def _run(home: Home) -> None:
    daemon = Daemon(home)
    async with trio.open_nursery() as nursery:

        async def on_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    daemon.stop_requested.set()
                    return

        nursery.start_soon(on_signals)
        await daemon.run()
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    """Run the daemon in the foreground; returns the process exit code."""
    t0 = time.monotonic()
    os.umask(0o077)  # everything the daemon creates is private to the user
    home = Home(default_home())
    try:
        home.ensure()
        home.acquire_lock()
    except AlreadyRunning as exc:
        print(f"claudemesh-daemon: {exc}", file=sys.stderr)
        return EXIT_ALREADY_RUNNING
    except (HomeError, OSError) as exc:
        print(f"claudemesh-daemon: cannot use {home.root}: {exc}", file=sys.stderr)
        return EXIT_BAD_HOME
    try:
        setup_logging(home)
        logging.getLogger("claudemesh.daemon").info(
            "starting in %s (setup %.0f ms)", home.root, (time.monotonic() - t0) * 1000
        )
        trio.run(_run, home)
    except HomeError as exc:
        print(f"claudemesh-daemon: {exc}", file=sys.stderr)
        return EXIT_BAD_HOME
    except KeyboardInterrupt:
        pass
    finally:
        home.release_lock()
    return 0
