"""``lg-rotate``: argument parsing, configuration assembly, output and exit codes.

Thin on purpose: each command resolves its settings (``rotator.config``), builds its
parts (``rotator.assemble``) and hands over to the layer that does the work. Every
failure ends here as one line on stderr and a documented exit code (README "Exit codes").
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from providers.base import Provider
from rotator import __version__, assemble, config, logs
from rotator.errors import ConfigError, ExitCode, LgRotateError, TokenError
from rotator.rotation import RotationReport, Rotator, StatusReport
from rotator.tokens import EnrollToken

log = logging.getLogger("lg_rotate.cli")

COMMANDS = (
    "rotate",
    "status",
    "exec",
    "emit",
    "watch",
    "roll",
    "demo",
    "sandbox",
    "providers",
    "audit",
)
Handler = Callable[[argparse.Namespace], int]


# --- parser --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lg-rotate",
        description="Keeps LinuxGuard agents supplied with fresh enrolment tokens: "
        "mint (LinuxGuard) -> store (Vault, AWS, GCP, plugins) -> deliver (Kubernetes Secret).",
        epilog="With no command, the flags are those of `rotate`: "
        "lg-rotate --provider vault --tenant T. Exit codes: see README.",
    )
    parser.add_argument("--version", action="version", version=f"lg-rotate {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    rotate = commands.add_parser(
        "rotate", help="mint, store and deliver a fresh token (the default command)"
    )
    _add_common(rotate, source=True, kube=True)
    rotate.add_argument(
        "--dry-run", action="store_true", help="show what would change (fingerprints only)"
    )
    rotate.add_argument("-o", "--output", choices=("text", "json"), default="text")
    restart = rotate.add_argument_group("pre-rollout step")
    restart.add_argument(
        "--restart",
        metavar="KIND/NAME",
        help="after rotating, restart this workload like `kubectl rollout restart` "
        "(daemonset/NAME, deployment/NAME, statefulset/NAME)",
    )
    restart.add_argument(
        "--wait", action="store_true", help="follow the restart until the rollout completes"
    )
    restart.add_argument(
        "--timeout",
        type=config.parse_seconds,
        default=600.0,
        metavar="DURATION",
        help="give up waiting for the rollout after this long (default 600s)",
    )
    rotate.set_defaults(handler=cmd_rotate)

    status = commands.add_parser("status", help="compare the store with the Secret")
    _add_common(status, source=False, kube=True)
    config.add_arguments(status, [_setting("tenant"), _setting("min-ttl")], title="token")
    status.add_argument("-o", "--output", choices=("table", "json"), default="table")
    status.add_argument(
        "--check", action="store_true", help=f"exit {int(ExitCode.CHECK_FAILED)} on any problem"
    )
    status.set_defaults(handler=cmd_status)

    exec_parser = commands.add_parser(
        "exec",
        help="mint a token and exec COMMAND with it in COMMAND's environment only",
        description="One launch consumes one token: by default a fresh token is minted and "
        "stored, then COMMAND replaces lg-rotate with LINUXGUARD_ENROLL_TOKEN and "
        "LINUXGUARD_TENANT_ID in its environment. Example: lg-rotate exec --provider vault "
        "--tenant acme -- docker run -e LINUXGUARD_ENROLL_TOKEN -e LINUXGUARD_TENANT_ID IMAGE",
    )
    _add_token_source(exec_parser)
    exec_parser.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")
    exec_parser.set_defaults(handler=cmd_exec)

    emit = commands.add_parser(
        "emit",
        help="write a fresh token to stdout (a pipe only) for wrappers",
        description="Writes the token to stdout when stdout is not a terminal (else refuses "
        "unless --force). Safe: docker run --env-file <(lg-rotate emit -f env ...) IMAGE. "
        "On any failure nothing is written to stdout.",
    )
    _add_token_source(emit)
    emit.add_argument("-f", "--format", choices=("raw", "env", "json"), default="raw")
    emit.add_argument("--force", action="store_true", help="write even to a terminal")
    emit.set_defaults(handler=cmd_emit)

    watch = commands.add_parser(
        "watch",
        help="controller: rotate after every agent start, recover collisions, never expire",
        description="Runs as a Deployment (cronjob/base/watch-deployment.yaml). Watches the "
        "agent pods; every container start or restart consumes the Secret's token, so it "
        "rotates at once; two pods under one token are recovered (rotate, delete the later "
        "pod); the Secret is rotated before its token expires. Leader election makes several "
        "replicas safe. Serves /metrics, /healthz, /readyz. docs/CONTROLLER.md.",
    )
    _add_common(watch, source=True, kube=True)
    config.add_arguments(watch, config.WATCH_SETTINGS, title="controller")
    watch.set_defaults(handler=cmd_watch)

    roll = commands.add_parser(
        "roll",
        help="roll a DaemonSet pod by pod, a fresh token for each (resumable)",
        description="For pipelines: for each pod, rotate, delete that pod, wait until its "
        "replacement is Ready, go on. An interrupted roll resumes where it stopped.",
    )
    _add_common(roll, source=True, kube=True)
    roll.add_argument("workload", metavar="daemonset/NAME")
    roll.add_argument(
        "--timeout",
        type=config.parse_seconds,
        default=300.0,
        metavar="DURATION",
        help="how long one replacement pod may take to be Ready (default 300s)",
    )
    roll.add_argument(
        "--restart", action="store_true", help="ignore an unfinished roll and start over"
    )
    roll.add_argument("-o", "--output", choices=("text", "json"), default="text")
    roll.set_defaults(handler=cmd_roll)

    demo = commands.add_parser(
        "demo", help="a full rotation and an agent enrolment against an embedded sandbox"
    )
    config.add_arguments(demo, config.OUTPUT_SETTINGS, title="output")
    demo.set_defaults(handler=cmd_demo)

    commands.add_parser(
        "sandbox",
        help="run a LinuxGuard sandbox server (tokens and /agent/enroll)",
        add_help=False,  # answered by the sandbox's own parser (see DELEGATED)
    )

    providers_parser = commands.add_parser(
        "providers", help="list secrets-store providers and what each needs"
    )
    providers_parser.add_argument("-o", "--output", choices=("table", "json"), default="table")
    providers_parser.set_defaults(handler=cmd_providers)

    commands.add_parser(
        "audit",
        help="find token-leaking anti-patterns in manifests or a cluster",
        add_help=False,  # answered by the audit's own parser (see DELEGATED)
    )
    return parser


_ALL_SETTINGS = {
    s.name: s
    for s in (
        *config.SOURCE_SETTINGS,
        *config.STORE_SETTINGS,
        *config.KUBE_SETTINGS,
        *config.WATCH_SETTINGS,
        *config.OUTPUT_SETTINGS,
    )
}


def _setting(name: str) -> config.Setting:
    return _ALL_SETTINGS[name]


def _add_common(parser: argparse.ArgumentParser, *, source: bool, kube: bool) -> None:
    parser.add_argument(
        "--config", default=argparse.SUPPRESS, help="YAML file of settings [env LG_ROTATE_CONFIG]"
    )
    if source:
        config.add_arguments(parser, config.SOURCE_SETTINGS, title="LinuxGuard")
    config.add_arguments(parser, config.STORE_SETTINGS, title="secrets store")
    config.add_arguments(
        parser,
        assemble.option_settings(assemble.builtin_provider_options()),
        title="provider options (vault-*, aws-*, gcp-*)",
    )
    parser.add_argument(
        "--provider-option",
        action="append",
        metavar="KEY=VALUE",
        default=argparse.SUPPRESS,
        help="an option for a plugin provider (repeatable)",
    )
    if kube:
        config.add_arguments(parser, config.KUBE_SETTINGS, title="Kubernetes")
    config.add_arguments(parser, config.OUTPUT_SETTINGS, title="output")


def _add_token_source(parser: argparse.ArgumentParser) -> None:
    _add_common(parser, source=True, kube=False)
    parser.add_argument(
        "--from-store",
        action="store_true",
        help="use the store's current token instead of minting (refused if it has less "
        "than --min-ttl left; it may already have been used by another launch)",
    )


def _settings_for(args: argparse.Namespace, *, source: bool) -> list[config.Setting]:
    chosen = [*config.STORE_SETTINGS, *config.KUBE_SETTINGS, *config.OUTPUT_SETTINGS]
    if args.command == "watch":
        chosen = [*chosen, *config.WATCH_SETTINGS]
    if source:
        chosen = [*config.SOURCE_SETTINGS, *chosen]
    else:
        chosen = [_setting("tenant"), _setting("min-ttl"), *chosen]
    return chosen


def _resolve(args: argparse.Namespace, *, source: bool) -> tuple[config.Resolved, dict[str, Any]]:
    import os

    config_path = getattr(args, "config", None) or os.environ.get("LG_ROTATE_CONFIG")
    config_file = config.load_yaml(config_path)
    provider_keys = [o.key for o in assemble.builtin_provider_options()]
    resolved = config.resolve(
        settings=_settings_for(args, source=source),
        flags=args,
        config_file=config_file,
        extra_known_keys=[*provider_keys, *_ALL_SETTINGS_KEYS],
    )
    return resolved, config_file


_ALL_SETTINGS_KEYS = [s.key for s in _ALL_SETTINGS.values()]


# --- commands --------------------------------------------------------------------------


def _prepare(
    args: argparse.Namespace, *, source: bool, why: str
) -> tuple[config.Resolved, Provider]:
    """Settings, logging and the provider: the first steps of every store command."""
    resolved, config_file = _resolve(args, source=source)
    _configure_logs(resolved)
    config.require(resolved, "tenant", why=why)
    provider = assemble.resolve_provider(resolved=resolved, flags=args, config_file=config_file)
    return resolved, provider


def _rotator(
    resolved: config.Resolved, provider: Provider, kube: assemble.KubeParts | None
) -> Rotator:
    from rotator.rotation import Rotator

    return Rotator(
        minter=assemble.build_minter(resolved),
        provider=provider,
        tenant=resolved.tenant,
        target=kube.target if kube else None,
        lock=kube.lock if kube else None,
        min_ttl=assemble.min_ttl(resolved),
        ttl_seconds=resolved.ttl,
        keep_versions=resolved.keep_versions,
    )


def _require_kube(resolved: config.Resolved, *, command: str) -> assemble.KubeParts:
    kube = assemble.build_kube(resolved)
    if kube is None:
        raise ConfigError(f"{command} works on the Kubernetes Secret", fix="drop --target none")
    return kube


def cmd_rotate(args: argparse.Namespace) -> int:
    resolved, provider = _prepare(args, source=True, why="whose token to rotate")
    kube = assemble.build_kube(resolved)
    rotator = _rotator(resolved, provider, kube)
    workload = _parse_restart(args, kube)
    report = rotator.rotate(dry_run=args.dry_run)
    _print_rotation(report, output=args.output)
    if workload is not None and kube is not None and not args.dry_run:
        _restart(
            kube, workload=workload, secret=resolved.secret, wait=args.wait, timeout=args.timeout
        )
    return ExitCode.OK


def cmd_watch(args: argparse.Namespace) -> int:
    import threading

    from rotator.kube import controller
    from rotator.kube.secret import SecretTarget

    resolved, provider = _prepare(args, source=True, why="whose token to keep fresh")
    kube = _require_kube(resolved, command="watch")
    assert isinstance(kube.target, SecretTarget)
    watcher = controller.Controller(
        api_client=kube.api_client,
        namespace=kube.namespace,
        selector=resolved.selector,
        container=resolved.container,
        rotator=_rotator(resolved, provider, kube),  # one client, reused for every rotation
        target=kube.target,
        expiry_margin=resolved.expiry_margin,
        deletions_per_minute=resolved.deletions_per_minute,
        lease_duration=resolved.leader_lease_duration,
        metrics_port=resolved.metrics_port,
    )
    stop = threading.Event()
    restore = controller.install_signal_handlers(stop)
    try:
        watcher.run(stop=stop)
    finally:
        restore()
    return ExitCode.OK


def cmd_roll(args: argparse.Namespace) -> int:
    import threading

    from rotator.kube import controller, roll, workloads

    resolved, provider = _prepare(args, source=True, why="whose tokens to roll out")
    kube = _require_kube(resolved, command="roll")
    kind, name = workloads.parse_workload_ref(args.workload)
    progress = _ProgressPrinter(render=lambda p: p.describe(), as_dict=lambda p: p.as_dict())
    stop = threading.Event()
    restore = controller.install_signal_handlers(stop)
    try:
        report = roll.roll(
            api_client=kube.api_client,
            namespace=kube.namespace,
            kind=kind,
            name=name,
            rotator=_rotator(resolved, provider, kube),
            timeout_per_pod=args.timeout,
            on_progress=progress,
            restart=args.restart,
            stop=stop,
        )
    finally:
        progress.close()
        restore()
    if args.output == "json":
        print(json.dumps(report.as_dict(), indent=2))
    else:
        verb = "resumed and finished" if report.resumed else "finished"
        print(
            f"roll {report.roll_id} of {report.workload} {verb}: {len(report.rolled)} pods "
            f"rolled, {len(report.skipped)} skipped, {report.duration_seconds:.0f}s"
        )
    return ExitCode.OK


def _parse_restart(
    args: argparse.Namespace, kube: assemble.KubeParts | None
) -> tuple[str, str] | None:
    """Validate --restart before rotating: a typo must not cost a token."""
    if not args.restart:
        if args.wait:
            raise ConfigError("--wait follows a restart", fix="add --restart daemonset/NAME")
        return None
    if kube is None:
        raise ConfigError(
            "--restart needs the Kubernetes target", fix="drop --target none or drop --restart"
        )
    from rotator.kube import workloads

    return workloads.parse_workload_ref(args.restart)


def _restart(
    kube: assemble.KubeParts, *, workload: tuple[str, str], secret: str, wait: bool, timeout: float
) -> None:
    from rotator.kube import workloads
    from rotator.tokens import utcnow

    kind, name = workload
    if kind == "daemonset" and not _controller_running(kube, secret=secret):
        log.warning(
            "every pod %s/%s restarts with the same token, and only the first to enrol will "
            "succeed (409 for the others): run `lg-rotate watch` (one fresh token per pod) or "
            "use `lg-rotate roll daemonset/%s` (pod by pod, a token each)",
            kube.namespace,
            name,
            name,
        )
    workloads.restart_workload(
        api_client=kube.api_client, namespace=kube.namespace, kind=kind, name=name, at=utcnow()
    )
    if not wait:
        return
    progress = _ProgressPrinter(
        render=lambda p: p.describe(),
        as_dict=lambda p: {
            "event": "rollout",
            "workload": f"{p.kind}/{p.name}",
            "desired": p.desired,
            "updated": p.updated,
            "ready": p.ready,
            "available": p.available,
            "done": p.done,
        },
    )
    try:
        workloads.wait_for_rollout(
            api_client=kube.api_client,
            namespace=kube.namespace,
            kind=kind,
            name=name,
            timeout=timeout,
            on_progress=progress,
        )
    finally:
        progress.close()


def _controller_running(kube: assemble.KubeParts, *, secret: str) -> bool:
    from rotator.kube import controller

    return controller.is_running(
        api_client=kube.api_client, namespace=kube.namespace, secret_name=secret
    )


class _ProgressPrinter:
    """Progress: one rewritten line on a terminal, JSON lines otherwise (stderr)."""

    def __init__(
        self,
        *,
        render: Callable[[Any], str],
        as_dict: Callable[[Any], dict[str, Any]],
    ) -> None:
        self.render = render
        self.as_dict = as_dict
        self.tty = sys.stderr.isatty()
        self.last = ""

    def __call__(self, progress: Any) -> None:
        if self.tty:
            text = self.render(progress)
            sys.stderr.write("\r" + text.ljust(len(self.last)))
            self.last = text
        else:
            sys.stderr.write(json.dumps(self.as_dict(progress)) + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty and self.last:
            sys.stderr.write("\n")


def cmd_status(args: argparse.Namespace) -> int:
    from rotator.rotation import read_status

    resolved, provider = _prepare(args, source=False, why="whose token to inspect")
    kube = assemble.build_kube(resolved)
    report = read_status(
        provider=provider, tenant=resolved.tenant, target=kube.target if kube else None
    )
    min_ttl = assemble.min_ttl(resolved)
    _print_status(report, output=args.output, min_ttl=min_ttl)
    if args.check and report.problems(min_ttl=min_ttl):
        return ExitCode.CHECK_FAILED
    return ExitCode.OK


def _launch_token(args: argparse.Namespace) -> EnrollToken:
    """A token for one launch: the store's current one, or (default) a fresh rotation."""
    from providers.base import Stage
    from rotator.rotation import Rotator

    resolved, provider = _prepare(args, source=True, why="whose token to hand over")
    min_ttl = assemble.min_ttl(resolved)
    if args.from_store:
        record = provider.read(tenant=resolved.tenant, stage=Stage.CURRENT)
        if record is None:
            raise TokenError(
                f"{provider.location(tenant=resolved.tenant)} holds no current token",
                fix="run lg-rotate rotate first, or drop --from-store to mint one",
            )
        record.token.check_usable(tenant_id=resolved.tenant, min_ttl=min_ttl)
        return record.token
    rotator = Rotator(
        minter=assemble.build_minter(resolved),
        provider=provider,
        tenant=resolved.tenant,
        min_ttl=min_ttl,
        ttl_seconds=resolved.ttl,
        keep_versions=resolved.keep_versions,
    )
    report = rotator.rotate(resume=False)  # a launch consumes a token: always a fresh one
    assert report.record is not None
    return report.record.token


def cmd_exec(args: argparse.Namespace) -> int:
    from rotator import launch

    argv = list(args.argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    launch.check_command_line(argv)  # before minting: a refused launch costs no token
    executable = launch.resolve_executable(argv)
    launch.warn_if_token_not_forwarded(argv)
    token = _launch_token(args)
    launch.check_command_line(argv, token=token)
    launch.exec_with_token(argv, executable=executable, token=token)


def cmd_emit(args: argparse.Namespace) -> int:
    from rotator import launch

    launch.check_emit_destination(sys.stdout, force=args.force)
    token = _launch_token(args)
    launch.emit(token, fmt=args.format, stream=sys.stdout)
    return ExitCode.OK


def cmd_demo(args: argparse.Namespace) -> int:
    from rotator import demo

    resolved = config.resolve(settings=config.OUTPUT_SETTINGS, flags=args)
    _configure_logs(resolved)
    return demo.run(out=sys.stdout)


# Commands with parsers of their own, built only when they run: keeps the start-up of
# `rotate` light, and lets their --help pass through untouched. name -> module
DELEGATED = {
    "audit": ("rotator.audit", "add_audit_arguments", "run_audit_command"),
    "sandbox": ("rotator.sandbox", "add_sandbox_arguments", "run_sandbox_command"),
}


def run_delegated(name: str, argv: list[str]) -> int:
    import importlib

    module_name, add_arguments, run_command = DELEGATED[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"lg-rotate {name}", description=module.__doc__)
    getattr(module, add_arguments)(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return ExitCode.OK if exc.code in (0, None) else ExitCode.CONFIG
    return int(getattr(module, run_command)(args))


def cmd_providers(args: argparse.Namespace) -> int:
    from providers import registry

    rows: list[dict[str, Any]] = []
    for info in registry.discover().values():
        try:
            factory = registry.load(info.name)
        except LgRotateError as exc:
            rows.append(
                {
                    "name": info.name,
                    "origin": info.origin,
                    "installed": False,
                    "problem": exc.one_line(),
                    "summary": "",
                    "install": "",
                    "options": [],
                }
            )
            continue
        missing = registry.missing_modules(factory)
        rows.append(
            {
                "name": info.name,
                "origin": info.origin,
                "installed": not missing,
                "missing": missing,
                "summary": factory.summary,
                "install": registry.install_hint(factory) if missing else "",
                "options": [
                    {
                        "flag": f"--{o.name}",
                        "env": [f"LG_ROTATE_{o.key.upper()}", *o.env],
                        "default": o.default,
                        "required": o.required,
                        "help": o.help,
                    }
                    for o in factory.options
                ],
            }
        )
    if args.output == "json":
        print(json.dumps(rows, indent=2))
        return ExitCode.OK
    for row in rows:
        state = "installed" if row["installed"] else f"NOT INSTALLED: {row['install']}"
        print(f"{row['name']:<8} {row['origin']:<10} {state}")
        if row["summary"]:
            print(f"         {row['summary']}")
        for option in row["options"]:
            need = "required" if option["required"] else f"default {option['default']}"
            envs = ", ".join(option["env"])
            print(f"         {option['flag']:<24} {need:<28} [{envs}]")
    return ExitCode.OK


# --- output --------------------------------------------------------------------------


def _configure_logs(resolved: config.Resolved) -> None:
    logs.configure(log_format=resolved.log_format, level=resolved.log_level)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    sign = "-" if seconds < 0 else ""
    seconds = abs(int(seconds))
    if seconds >= 3600:
        return f"{sign}{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{sign}{seconds // 60}m{seconds % 60:02d}s"
    return f"{sign}{seconds}s"


def _short(fp: str | None) -> str:
    return fp[:12] if fp else "-"


def _print_rotation(report: RotationReport, *, output: str) -> None:
    if output == "json":
        print(json.dumps(report.as_dict(), indent=2))
        return
    headline = {
        "minted": "rotated: minted a fresh token",
        "resumed": "rotated: delivered the token an interrupted run had stored",
        "promoted-only": "rotated: finished an interrupted run (token already delivered)",
        "would-mint": "dry run: would mint a fresh token",
        "would-resume": "dry run: would deliver the pending token an interrupted run stored",
    }[str(report.action)]
    lines = [
        f"{headline} for tenant {report.tenant}",
        f"  fingerprint  {_short(report.fingerprint)} (was {_short(report.previous_fingerprint)})",
        f"  store        {report.store_location} version {report.store_version or '-'}",
    ]
    if report.target_location:
        lines.append(
            f"  target       {report.target_location} revision {report.target_revision or '-'}"
        )
    if report.expires_at:
        left = _duration(report.ttl_left_seconds)
        lines.append(f"  expires      {report.expires_at.isoformat()} (in {left})")
    lines.append(f"  took         {report.duration_seconds:.2f}s")
    print("\n".join(lines))


def _print_status(report: StatusReport, *, output: str, min_ttl: timedelta) -> None:
    data = report.as_dict(min_ttl=min_ttl)
    if output == "json":
        print(json.dumps(data, indent=2))
        return
    header = f"{'':16}{'FINGERPRINT':14}{'VERSION':10}{'AGE':9}{'TTL LEFT':10}"
    rows = [f"tenant {report.tenant}: store {report.store_location}", header]
    store = data["store"]
    assert isinstance(store, dict)
    for label in ("current", "pending"):
        rec = store[label]
        if rec is None:
            rows.append(f"{'store ' + label:16}-")
            continue
        rows.append(
            f"{'store ' + label:16}{_short(rec['fingerprint']):14}{rec['version']:<10}"
            f"{_duration(rec['ageSeconds']):9}{_duration(rec['ttlLeftSeconds']):10}"
        )
    if report.target_location:
        target = report.target
        if target is None:
            rows.append(f"{'target':16}- ({report.target_location} does not exist)")
        else:
            t = data["target"]
            assert isinstance(t, dict)
            s = t["state"]
            assert isinstance(s, dict)
            rows.append(
                f"{'target':16}{_short(target.fingerprint):14}{'rv ' + str(target.revision):10}"
                f"{_duration(s['ageSeconds']):9}{_duration(s['ttlLeftSeconds']):10}"
                f"  {report.target_location}"
            )
        rows.append(f"in sync: {'yes' if report.in_sync else 'NO'}")
    for problem in report.problems(min_ttl=min_ttl):
        rows.append(f"! {problem}")
    print("\n".join(rows))


# --- entry point ---------------------------------------------------------------------


def _normalise_argv(argv: list[str]) -> list[str]:
    """The bare form ``lg-rotate --provider vault --tenant T`` means ``rotate``."""
    bare = bool(argv) and argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")
    return ["rotate", *argv] if bare else argv


def main(argv: Sequence[str] | None = None) -> int:  # noqa: PLR0911 (one return per outcome)
    # First thing: take the LinuxGuard API key out of the environment, so it is neither
    # inherited by a child process nor readable in /proc/<pid>/environ of a later exec.
    assemble.API_KEY.capture()
    args_list = _normalise_argv(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    if not args_list:
        parser.print_help()
        return ExitCode.CONFIG
    try:
        if args_list[0] in DELEGATED:
            handler: Handler | None = None
        else:
            args = parser.parse_args(args_list)
            handler = getattr(args, "handler", None)
            if handler is None:
                parser.print_help()
                return ExitCode.CONFIG
    except SystemExit as exc:  # argparse already printed the usage error
        return ExitCode.OK if exc.code in (0, None) else ExitCode.CONFIG
    try:
        if handler is None:
            return run_delegated(args_list[0], args_list[1:])
        return int(handler(args))
    except LgRotateError as exc:
        log.debug("failure detail", exc_info=True)
        print(f"lg-rotate: error: {logs.redact(exc.one_line())}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        print("lg-rotate: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except Exception as exc:
        log.debug("unexpected failure", exc_info=True)
        print(
            f"lg-rotate: internal error: {type(exc).__name__}: {logs.redact(str(exc))} "
            "(fix: rerun with --log-level debug and report it)",
            file=sys.stderr,
        )
        return ExitCode.INTERNAL


if __name__ == "__main__":
    sys.exit(main())
