"""``mesh-agent``: run the sidecar.

Bootstrap settings (who this agent is, where it listens) are flags, each with a ``MESH_AGENT_*``
environment variable as default. The dynamic config (services, endpoints, routes, policies) comes
from ``--config FILE`` or, later, from the control plane; see docs/agent.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mesh_agent import __version__

if TYPE_CHECKING:
    from mesh_agent.control import ConfigStore as ControlPlaneStore
    from mesh_agent.discovery import ControlPlaneSource as ControlPlaneSourceT

__all__ = ["build_parser", "main"]

log = logging.getLogger("mesh_agent")


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"MESH_AGENT_{name}", default)


def _address(value: str) -> tuple[str, int]:
    from mesh_agent.schema import parse_address

    try:
        return parse_address(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _listen_address(value: str) -> tuple[str, int]:
    from mesh_agent.schema import parse_address

    try:
        return parse_address(value, allow_port_zero=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _http_url(value: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise argparse.ArgumentTypeError(f"{value!r} is not an http(s) URL")
    return value


def _otlp_endpoint(value: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise argparse.ArgumentTypeError(f"{value!r} is not an http(s) URL")
    return value


def _ratio(value: str) -> float:
    try:
        ratio = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0.0 <= ratio <= 1.0:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return ratio


def _seconds(value: str) -> float:
    try:
        s = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if s <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return s


def _seconds_or_zero(value: str) -> float:
    return 0.0 if value.strip() in ("0", "0.0") else _seconds(value)


def _header(value: str) -> tuple[str, str]:
    name, sep, content = value.partition("=")
    name = name.strip()
    if not sep or not name or any(c in name for c in " :\r\n") or any(c in content for c in "\r\n"):
        raise argparse.ArgumentTypeError(f"{value!r} is not NAME=VALUE")
    return name, content.strip()


def _env_headers() -> list[tuple[str, str]]:
    raw = _env("OTLP_HEADERS", "") or ""
    try:
        return [_header(item) for item in raw.split(",") if item.strip()]
    except argparse.ArgumentTypeError as exc:  # a usage error, not a traceback
        raise SystemExit(f"mesh-agent: MESH_AGENT_OTLP_HEADERS: {exc}") from None


def _count(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return n


def _default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(base) / "mesh-agent")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's formatter, sized as it sizes itself but without importing shutil for it: a
    formatter is made for every flag added, and shutil loads the bz2 and lzma libraries
    (~0.8 MB of RSS, measured) that a sidecar never uses."""

    def __init__(self, prog: str) -> None:
        try:
            columns = int(os.environ.get("COLUMNS", "0")) or os.get_terminal_size().columns
        except (ValueError, OSError):
            columns = 80
        super().__init__(prog, width=columns - 2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mesh-agent",
        description=(
            "Sidecar proxy of the mesh. Callers reach the local app through the inbound "
            "listener; the app reaches other services through the outbound listener, either as "
            "an HTTP proxy (HTTP_PROXY=http://OUTBOUND) or with 'Host: <service>'. The admin "
            "listener serves /ready, /metrics and /config. Every flag can also be set with the "
            "environment variable named in its help."
        ),
        epilog=(
            "Without --config and without a persisted config the agent starts with no services "
            "and /ready answers 503 until a config arrives. SIGHUP reloads --config; SIGTERM "
            "drains connections and exits. Config file schema: docs/agent.md."
        ),
        formatter_class=_HelpFormatter,
    )
    ident = p.add_argument_group("identity")
    ident.add_argument(
        "--service",
        default=_env("SERVICE"),
        required=_env("SERVICE") is None,
        help="name of the service this agent fronts (MESH_AGENT_SERVICE)",
    )
    ident.add_argument(
        "--version",
        default=_env("VERSION", "v1"),
        help="version of the local service instance (MESH_AGENT_VERSION)",
    )
    ident.add_argument(
        "--namespace",
        default=_env("NAMESPACE", "default"),
        help="namespace of the service (MESH_AGENT_NAMESPACE)",
    )
    lst = p.add_argument_group("listeners (host:port; port 0 picks a free port)")
    lst.add_argument(
        "--inbound",
        type=_listen_address,
        default=_env("INBOUND", "0.0.0.0:15006"),
        metavar="HOST:PORT",
        help="inbound listener, in front of the app; only started with --app (MESH_AGENT_INBOUND)",
    )
    lst.add_argument(
        "--app",
        type=_address,
        default=_env("APP"),
        metavar="HOST:PORT",
        help="address of the local app that inbound traffic goes to (MESH_AGENT_APP)",
    )
    lst.add_argument(
        "--outbound",
        type=_listen_address,
        default=_env("OUTBOUND", "127.0.0.1:15001"),
        metavar="HOST:PORT",
        help="outbound listener the app calls other services through (MESH_AGENT_OUTBOUND)",
    )
    lst.add_argument(
        "--admin",
        type=_listen_address,
        default=_env("ADMIN", "127.0.0.1:15000"),
        metavar="HOST:PORT",
        help="admin listener: /ready, /metrics, /config (MESH_AGENT_ADMIN)",
    )
    cfg = p.add_argument_group("config")
    cfg.add_argument(
        "--config",
        default=_env("CONFIG"),
        metavar="FILE",
        help="YAML or JSON config file, reloaded on change and on SIGHUP (MESH_AGENT_CONFIG)",
    )
    cfg.add_argument(
        "--control-plane",
        type=_http_url,
        default=_env("CONTROL_PLANE"),
        metavar="URL",
        help="control plane to register with and take config from, e.g. http://console:8000 "
        "(MESH_AGENT_CONTROL_PLANE); exclusive with --config",
    )
    cfg.add_argument(
        "--token",
        default=_env("TOKEN"),
        metavar="TOKEN",
        help="the mesh join token ('meshctl token show'); required with --control-plane "
        "(MESH_AGENT_TOKEN)",
    )
    cfg.add_argument(
        "--advertise",
        type=_address,
        default=_env("ADVERTISE"),
        metavar="HOST:PORT",
        help="address callers reach this instance's inbound listener at; needed when it "
        "listens on 0.0.0.0 (MESH_AGENT_ADVERTISE)",
    )
    cfg.add_argument(
        "--state-dir",
        default=_env("STATE_DIR", _default_state_dir()),
        metavar="DIR",
        help="where the last good config is kept, per namespace and service, and read at start "
        "when no other config is available (MESH_AGENT_STATE_DIR)",
    )
    tel = p.add_argument_group("telemetry")
    tel.add_argument(
        "--sampling-ratio",
        type=_ratio,
        default=_env("SAMPLING_RATIO", "0.01"),
        help="head-sampling ratio for requests arriving without a sampling decision "
        "(MESH_AGENT_SAMPLING_RATIO)",
    )
    tel.add_argument(
        "--otlp-endpoint",
        type=_otlp_endpoint,
        default=_env("OTLP_ENDPOINT"),
        metavar="URL",
        help="OTLP/HTTP endpoint spans are exported to, e.g. http://console:8000; none: no "
        "export (MESH_AGENT_OTLP_ENDPOINT)",
    )
    tel.add_argument(
        "--otlp-header",
        type=_header,
        action="append",
        default=_env_headers(),
        metavar="NAME=VALUE",
        help="header sent with every OTLP export, e.g. 'Authorization=Bearer …'; repeatable "
        "(MESH_AGENT_OTLP_HEADERS, comma-separated)",
    )
    tel.add_argument(
        "--metrics-interval",
        type=_seconds_or_zero,
        default=_env("METRICS_INTERVAL", "5"),
        metavar="SECONDS",
        help="how often RED metrics are exported over OTLP to --otlp-endpoint's /v1/metrics; "
        "0: never (MESH_AGENT_METRICS_INTERVAL)",
    )
    tim = p.add_argument_group("timeouts (seconds) and limits")
    tim.add_argument(
        "--header-timeout",
        type=_seconds,
        default=_env("HEADER_TIMEOUT", "10"),
        help="time a client may take to send request headers (MESH_AGENT_HEADER_TIMEOUT)",
    )
    tim.add_argument(
        "--body-timeout",
        type=_seconds,
        default=_env("BODY_TIMEOUT", "30"),
        help="longest pause while a client sends a request body (MESH_AGENT_BODY_TIMEOUT)",
    )
    tim.add_argument(
        "--idle-timeout",
        type=_seconds,
        default=_env("IDLE_TIMEOUT", "60"),
        help="idle keep-alive client connections are closed after this (MESH_AGENT_IDLE_TIMEOUT)",
    )
    tim.add_argument(
        "--max-connections",
        type=_count,
        default=_env("MAX_CONNECTIONS", "1024"),
        help="client connections each of the inbound and outbound listeners holds at most; "
        "past it a new connection is closed at once (MESH_AGENT_MAX_CONNECTIONS)",
    )
    tim.add_argument(
        "--drain-timeout",
        type=_seconds,
        default=_env("DRAIN_TIMEOUT", "10"),
        help="on SIGTERM, how long requests in flight may finish (MESH_AGENT_DRAIN_TIMEOUT)",
    )
    p.add_argument(
        "--log-level",
        default=_env("LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="log level (MESH_AGENT_LOG_LEVEL)",
    )
    return p


async def _run(args: argparse.Namespace) -> int:
    from mesh_agent.agent import Agent, state_dir_for
    from mesh_agent.control import ConfigSource, ConfigStore, FileSource, initial_config
    from mesh_agent.proxy import Limits
    from mesh_agent.telemetry import Telemetry

    telemetry = Telemetry(
        service=args.service,
        version=args.version,
        namespace=args.namespace,
        sampling_ratio=args.sampling_ratio,
        otlp_endpoint=args.otlp_endpoint,
        otlp_headers=dict(args.otlp_header),
    )
    exporter = None
    if args.otlp_endpoint and args.metrics_interval > 0:
        from mesh_agent.metrics_export import MetricsExporter

        exporter = MetricsExporter(
            telemetry,
            args.otlp_endpoint,
            headers=telemetry.otlp_headers,
            interval_s=args.metrics_interval,
        )
    config_file: str | None = args.config
    listeners: dict[str, str] = {}

    def file_source(store: ConfigStore, listeners: Mapping[str, str]) -> ConfigSource:
        assert config_file is not None
        return FileSource(config_file, store)

    def control_plane_source(store: ConfigStore, listeners: Mapping[str, str]) -> ConfigSource:
        # The Agent calls this once its listeners are bound: the inbound address registered
        # with the control plane has its real port even when given as port 0.
        return _control_plane_source(args, store, listeners.get("inbound"))

    agent = Agent(
        service=args.service,
        version=args.version,
        namespace=args.namespace,
        app=args.app,
        telemetry=telemetry,
        limits=Limits(
            header_timeout_s=args.header_timeout,
            body_timeout_s=args.body_timeout,
            idle_timeout_s=args.idle_timeout,
            drain_timeout_s=args.drain_timeout,
            max_connections=args.max_connections,
        ),
        state_dir=state_dir_for(args.state_dir, args.namespace, args.service),
        source_factory=(
            control_plane_source if args.control_plane else (file_source if config_file else None)
        ),
        bootstrap={"config_file": config_file, "control_plane": args.control_plane},
    )
    initial_config(agent.store, config_file)
    try:
        listeners.update(
            await agent.start(inbound=args.inbound, outbound=args.outbound, admin=args.admin)
        )
    except OSError as exc:
        log.error("cannot listen: %s", exc)
        telemetry.shutdown()
        return 2
    if exporter is not None:
        exporter.start()
    # What start-up made (modules, config models, compiled routes) lives as long as the
    # process: out of the collector's sight, a full collection no longer walks it all, which
    # would otherwise stall every request in flight for milliseconds now and then.
    gc.collect()
    gc.freeze()
    _trim_heap()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, agent.stop)
    loop.add_signal_handler(signal.SIGINT, agent.stop)
    loop.add_signal_handler(signal.SIGHUP, agent.reload)
    loaded = agent.store.loaded
    log.info(
        "mesh-agent %s.%s (%s) listening: %s; config %s",
        args.service,
        args.namespace,
        args.version,
        " ".join(f"{k}={v}" for k, v in listeners.items()),
        loaded.version if loaded else "none",
    )
    await agent.serve()
    log.info("drained")
    await agent.close()
    if exporter is not None:
        await exporter.stop()
    telemetry.shutdown()
    return 0


def _control_plane_source(
    args: argparse.Namespace, store: ControlPlaneStore, inbound: str | None
) -> ControlPlaneSourceT:
    from mesh_agent.discovery import ControlPlaneSource, stable_agent_id
    from mesh_agent.schema import registration as checked_registration

    address = f"{args.advertise[0]}:{args.advertise[1]}" if args.advertise else inbound
    registration = checked_registration(
        agent_id=stable_agent_id(args.namespace, args.service, args.version, address),
        service=args.service,
        namespace=args.namespace,
        version=args.version,
        address=address,
        agent_version=__version__,
    )
    return ControlPlaneSource(
        store, url=args.control_plane, token=args.token, registration=registration
    )


def _trim_heap() -> None:
    """Give the C heap's free pages back to the system once start-up is over: compiling the
    agent's modules (no bytecode cache in images built with PYTHONDONTWRITEBYTECODE) and
    reading the config leave ~0.5 MB free but resident (measured). glibc only."""
    import ctypes

    # AttributeError: another C library (musl), nothing to trim with.
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None).malloc_trim(0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.control_plane and args.config:
        parser.error("--config and --control-plane are exclusive: choose one config source")
    if args.control_plane and not args.token:
        parser.error("--control-plane needs --token (or MESH_AGENT_TOKEN)")
    if (
        args.control_plane
        and args.app
        and not args.advertise
        and args.inbound[0] in ("0.0.0.0", "::")
    ):
        parser.error(
            f"the inbound listener is on {args.inbound[0]}: give --advertise HOST:PORT, the "
            "address callers reach this instance at"
        )
    if args.control_plane and not args.otlp_endpoint:
        # The control plane collects telemetry too: report there unless told otherwise.
        args.otlp_endpoint = args.control_plane
    if args.control_plane and args.otlp_endpoint == args.control_plane:
        names = {name.lower() for name, _ in args.otlp_header}
        if "authorization" not in names:  # never sent to a collector of someone else's
            args.otlp_header = [*args.otlp_header, ("Authorization", f"Bearer {args.token}")]
        # Agents share the join token; this tells the receiver's rate limiter them apart.
        args.otlp_header.append(("X-Mesh-Agent", f"{socket.gethostname()}-{os.getpid()}"))
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    import uvloop

    return uvloop.run(_run(args))


if __name__ == "__main__":
    sys.exit(main())
