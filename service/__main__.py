"""Start the service: ``python -m service --model PATH_OR_ID [--host 127.0.0.1] [--port 8000] ...``.

Every ServiceSettings field is a flag (``max_pixels`` -> ``--max-pixels``), so the settings class
stays the one source of truth; a flag overrides the matching ``VLKIT_*`` environment variable.
"""
from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import os
import sys
import types
import typing

# Only the standard library at the top: every other import happens inside main(), under its Ctrl-C guard
# (which the `vlkit-service` script, calling main() itself, has too).
if typing.TYPE_CHECKING:
    from service.settings import ServiceSettings


class _OneLineParser(argparse.ArgumentParser):
    """A refused flag is one line, as every other settings error (argparse's own printed its whole
    usage, ~30 lines of flags, before it)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message} (`{self.prog} --help` lists the flags)\n")


def build_parser() -> argparse.ArgumentParser:
    from service.settings import ServiceSettings

    parser = _OneLineParser(
        prog="python -m service",
        description="OpenAI-compatible Qwen3-VL service (vlkit's 8gb profile). "
                    "Flags override VLKIT_* environment variables.",
        argument_default=argparse.SUPPRESS,
    )
    for name, field in ServiceSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.default
        help_text = (field.description or "") + (f" (default: {default})" if default is not None else "")
        help_text = help_text.replace("%", "%%")
        kind, choices = _flag_type(field.annotation)
        if kind is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag, dest=name, type=kind, choices=choices, help=help_text)
    return parser


def _flag_type(annotation) -> tuple[type, list | None]:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return type(args[0]), list(args)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _flag_type(args[0])
    if annotation in (bool, int, float):
        return annotation, None
    return str, None  # paths too: the settings make the Path (argparse's would turn '' into '.' first)


def settings_table() -> str:
    """The Markdown table of every setting (docs/SERVICE.md carries it; a test keeps the two equal)."""
    from service.settings import ENV_PREFIX, ServiceSettings

    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for name, field in ServiceSettings.model_fields.items():
        default = "" if field.default is None else f"`{field.default}`"
        meaning = (field.description or "").replace("|", "/")
        rows.append(f"| `--{name.replace('_', '-')}` | `{ENV_PREFIX}{name.upper()}` | {default} | {meaning} |")
    return "\n".join(rows) + "\n"


def settings_from_args(argv: list[str] | None = None) -> ServiceSettings:
    from service.settings import ServiceSettings

    overrides = vars(build_parser().parse_args(argv))
    return ServiceSettings(**overrides)


def settings_errors(exc) -> list[str]:
    """A pydantic ValidationError of ServiceSettings as one line per setting, named as the user gives
    it: the flag and the environment variable (an env file's line names the variable)."""
    from service.settings import ENV_PREFIX

    lines = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        name = f"--{field.replace('_', '-')} / {ENV_PREFIX}{field.upper()}" if field else "settings"
        given = f" (got {error['input']!r})" if field and not isinstance(error.get("input"), dict) else ""
        lines.append(f"error: {name}: {error['msg'].removeprefix('Value error, ')}{given}")
    return lines


def exposure_warning(settings: ServiceSettings) -> str | None:
    """The start-up warning for an address others may reach, with no API key; None on loopback or with a key.
    In a container whose port is published on the host's loopback (vlkit's compose: --published-host),
    binding 0.0.0.0 inside reaches no one else."""
    if settings.api_key or _is_loopback(settings.published_host or settings.host):
        return None
    where = (f"--published-host {settings.published_host}" if settings.published_host
             else f"--host {settings.host}")
    return (f"{where}: the API is reachable from the network without an API key (anyone who reaches "
            f"port {settings.port} can use it; in a container, wherever its port is published): "
            "set --api-key / VLKIT_API_KEY to require one")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name (or ''): it may stand for any interface
        return False


def main(argv: list[str] | None = None) -> int:
    """The service's entry point, `python -m service`'s and the `vlkit-service` script's alike."""
    try:
        return _serve(argv)
    except KeyboardInterrupt:  # before the server ran (_serve answers it from there on): the imports take seconds
        exit_interrupted("the service was starting")


def _serve(argv: list[str] | None) -> int:
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    try:
        settings = settings_from_args(argv)
    except ValidationError as exc:  # a value out of range, or a malformed VLKIT_* variable
        print("\n".join(settings_errors(exc)), file=sys.stderr)
        return 2
    except SettingsError as exc:  # VLKIT_ENV_FILE missing or unreadable, or a line of it that does not parse
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if warning := exposure_warning(settings):
        logging.getLogger("service").warning(warning)
    from service.errors import ModelUnavailable
    from service.engine.loading import check_max_model_len, resolve_model_path

    try:  # fail fast, before binding the port and loading the weights
        check_max_model_len(resolve_model_path(settings.model), settings)
    except ModelUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from service.http_limits import bind_sockets

    try:
        sockets = bind_sockets(settings.host, settings.port)  # now: uvicorn binds after the start-up, i.e. the load
    except OSError as exc:
        print(f"error: {bind_error(settings, exc)}", file=sys.stderr)
        return 2

    import uvicorn

    from service.api import create_app
    from service.http_limits import uvicorn_server

    failed: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_load_failure(exc: BaseException) -> None:
        failed.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_load_failure=on_load_failure)
    server = uvicorn_server(app, settings)
    interrupted = False
    try:
        server.run(sockets=sockets)
    except KeyboardInterrupt:  # Ctrl-C: uvicorn re-raises it once shut down (uvicorn.run swallows it too)
        interrupted = True
    # A shutdown before the load had ended that the load's own failure did not ask for was a signal's,
    # whether or not asyncio turned the signal uvicorn re-raised into a KeyboardInterrupt (it does not
    # always); a failure with the signal: the shutdown cut the warm-up short.
    if not app.state.service.started and (interrupted or not failed):
        exit_interrupted("the model was loading")
    if failed:
        print(f"error: {failed[0]}", file=sys.stderr)
        return 1
    return 0


def bind_error(settings: ServiceSettings, exc: OSError) -> str:
    """Why the server cannot listen, naming the settings to change."""
    where = f"{settings.host}:{settings.port}"
    if exc.errno == errno.EADDRINUSE:
        return (f"--port / VLKIT_PORT: {where} is taken (address already in use): another program listens there; "
                "stop it or choose another port")
    return f"--host / VLKIT_HOST, --port / VLKIT_PORT: cannot listen on {where}: {exc.strerror or exc}"


def exit_interrupted(during: str) -> typing.NoReturn:
    """Ctrl-C's end: one line, status 130, at once: the load thread may be inside torch, and the
    interpreter's exit would tear torch down under it (SIGABRT, "terminate called without an active
    exception"). A start has nothing to save."""
    print(f"interrupted while {during}", file=sys.stderr)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


if __name__ == "__main__":
    raise SystemExit(main())
