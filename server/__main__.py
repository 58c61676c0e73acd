"""``avatar-server`` (or ``python -m server``): run the streaming avatar server with uvicorn.

    avatar-server [--host HOST] [--port PORT] [-v]

Settings come from environment variables (see ``server.config.Settings``);
``--host`` and ``--port`` override AVATAR_HOST and AVATAR_PORT. Exit 2 with one
line on stderr for a bad setting; 0 after a clean shutdown (Ctrl-C, SIGTERM).
"""
from __future__ import annotations

import dataclasses
import logging
import sys

import uvicorn

from avatar.cli_common import OneLineParser, configure_logging, run_cli
from server.app import create_app
from server.config import Settings, SettingsError

logger = logging.getLogger(__name__)

PROG = "avatar-server"


def build_parser() -> OneLineParser:
    """The command-line parser of ``avatar-server``."""
    parser = OneLineParser(prog=PROG, description="Streaming talking-portrait avatar server (HTTP, WebSocket, WebRTC).")
    parser.add_argument("--host", help="listen address (default: AVATAR_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="TCP port (default: AVATAR_PORT or 8080)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each session's life (INFO level)")
    return parser


def _serve(args) -> int:
    settings = Settings.from_env()
    overrides = {name: value for name, value in (("host", args.host), ("port", args.port)) if value is not None}
    if not 0 <= overrides.get("port", 0) <= 65535:
        raise SettingsError(f"--port must be in [0, 65535], got {overrides['port']}")
    settings = dataclasses.replace(settings, **overrides)
    app = create_app(settings)
    logger.info("listening on http://%s:%d", settings.host, settings.port)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info" if args.verbose else "warning",
                log_config=None, access_log=False)  # access lines would log session tokens (?token=)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``avatar-server``; returns the exit status."""
    args = build_parser().parse_args(argv)
    configure_logging(PROG, args.verbose)
    return run_cli(PROG, lambda: _serve(args), (SettingsError, OSError), args.verbose)


if __name__ == "__main__":
    sys.exit(main())
