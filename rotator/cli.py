"""``lg-rotate``: argument parsing, output and exit codes.

Thin on purpose: a command's flags, the environment and the config file are resolved
once into an immutable ``config.Settings`` (``config.resolve_command``), the composition
root builds the parts from it (``assemble.compose``), and the command runs what it is
given; this module parses and prints. Every failure ends here as one line on stderr and a
documented exit code (README "Exit codes", ``lg-rotate --help``).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, NoReturn

from providers.base import Provider
from rotator import __version__, assemble, config, logs
from rotator.errors import ConfigError, ExitCode, LgRotateError, TokenError
from rotator.rotation import RotationReport, StatusReport
from rotator.tokens import EnrollToken

log = logging.getLogger("lg_rotate.cli")

COMMANDS = (
    "rotate",
    "status",
    "exec",
    "emit",
    "watch",
    "webhook",
    "roll",
    "demo",
    "sandbox",
    "providers",
    "audit",
    "completion",
)
Handler = Callable[[argparse.Namespace], int]


# --- parser --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="lg-rotate",
        description="Keeps LinuxGuard agents supplied with fresh enrolment tokens: "
        "mint (LinuxGuard) -> store (Vault, AWS, GCP, plugins) -> deliver (Kubernetes Secret).",
        epilog=_top_epilog(),
    )
    parser.add_argument("--version", action="version", version=f"lg-rotate {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    rotate = commands.add_parser(
        "rotate", help="mint, store and deliver a fresh token (the default command)"
    )
    _add_settings(rotate, "rotate")
    rotate.set_defaults(handler=cmd_rotate)

    status = commands.add_parser("status", help="compare the store with the Secret")
    _add_settings(status, "status")
    status.set_defaults(handler=cmd_status)

    exec_parser = commands.add_parser(
        "exec",
        help="mint a token and exec COMMAND with it in COMMAND's environment only",
        description="One launch consumes one token: by default a fresh token is minted and "
        "stored, then COMMAND replaces lg-rotate with LINUXGUARD_ENROLL_TOKEN and "
        "LINUXGUARD_TENANT_ID in its environment. Example: lg-rotate exec --provider vault "
        "--tenant acme -- docker run -e LINUXGUARD_ENROLL_TOKEN -e LINUXGUARD_TENANT_ID IMAGE",
    )
    _add_settings(exec_parser, "exec")
    exec_parser.add_argument(
        "--pass-env",
        action="append",
        default=[],
        metavar="NAME",
        help="also hand this credential variable to COMMAND (repeatable). By default COMMAND "
        "gets none of lg-rotate's credentials: the LinuxGuard API key (never passed), "
        "VAULT_TOKEN, AWS_* keys, GOOGLE_APPLICATION_CREDENTIALS and the like",
    )
    exec_parser.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")
    exec_parser.set_defaults(handler=cmd_exec)

    emit = commands.add_parser(
        "emit",
        help="write a fresh token to stdout (a pipe only) for wrappers",
        description="Writes the token to stdout when stdout is a pipe or a socket (or "
        "/dev/null); a terminal, a file, a directory or a device is refused before anything "
        "is minted, unless --force. Safe: docker run --env-file <(lg-rotate emit -o env ...) "
        "IMAGE. On any failure nothing is written to stdout.",
    )
    _add_settings(emit, "emit")
    _add_emit_output(emit)
    emit.add_argument(
        "--force", action="store_true", help="write even to a terminal, a file or a device"
    )
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
    _add_settings(watch, "watch")
    watch.set_defaults(handler=cmd_watch)
    _add_webhook_parser(commands)

    roll = commands.add_parser(
        "roll",
        help="roll a DaemonSet pod by pod, a fresh token for each (resumable)",
        description="For pipelines: for each pod, rotate, delete that pod, wait until its "
        "replacement is Ready, go on. An interrupted roll resumes where it stopped.",
    )
    _add_settings(roll, "roll")
    roll.add_argument("workload", metavar="daemonset/NAME")
    roll.add_argument(
        "--restart",
        action="store_true",
        help="ignore an unfinished roll and start over (a flag only: a decision for one run)",
    )
    roll.set_defaults(handler=cmd_roll)

    demo = commands.add_parser(
        "demo", help="a full rotation and an agent enrolment against an embedded sandbox"
    )
    _add_settings(demo, "demo")
    demo.set_defaults(handler=cmd_demo)

    commands.add_parser(
        "sandbox",
        help="run a LinuxGuard sandbox server (tokens and /agent/enroll)",
        add_help=False,  # answered by the sandbox's own parser (see DELEGATED)
    )

    providers_parser = commands.add_parser(
        "providers", help="list secrets-store providers and what each needs"
    )
    _add_settings(providers_parser, "providers")
    providers_parser.set_defaults(handler=cmd_providers)

    completion = commands.add_parser(
        "completion",
        help="print a shell completion script (bash, zsh, fish)",
        description="Prints a completion script for SHELL on stdout. Load it into the "
        "current shell with: source <(lg-rotate completion bash); "
        'eval "$(lg-rotate completion zsh)" (after compinit); '
        'lg-rotate completion fish | source. README, "Shell completion", shows how to '
        "install it for every new shell.",
    )
    completion.add_argument("shell", choices=("bash", "zsh", "fish"), metavar="SHELL")
    completion.set_defaults(handler=cmd_completion)

    commands.add_parser(
        "audit",
        help="find token-leaking anti-patterns in manifests or a cluster",
        add_help=False,  # answered by the audit's own parser (see DELEGATED)
    )
    for name, subparser in _subcommands(parser).items():
        subparser.epilog = subparser.epilog or _examples(name)
        if name in config.COMMANDS and config.COMMANDS[name].store:
            subparser.usage = _short_usage(subparser)
    return parser


def _short_usage(parser: argparse.ArgumentParser) -> str:
    """``%(prog)s [options] daemonset/NAME``: the store commands take some 60 flags, which
    --help lists by group; a usage error should not print them all."""
    positionals = [
        str(action.metavar or action.dest)
        for action in parser._actions
        if not action.option_strings and action.help != SUPPRESS
    ]
    return " ".join(["%(prog)s [options]", *positionals])


def _add_webhook_parser(commands: Any) -> None:
    webhook = commands.add_parser(
        "webhook",
        help="admission webhook: give every new agent pod a Secret and a token of its own",
        description="A mutating admission webhook (POST /mutate, HTTPS). For each agent pod "
        "created in --namespace whose env references --secret, it mints a fresh token, "
        "records it in the store, creates a per-pod Secret and points the pod's references "
        "at it. Run `lg-rotate watch` too: it adopts, refreshes and cleans up per-pod "
        "Secrets and keeps the shared one fresh. docs/WEBHOOK.md.",
    )
    _add_settings(webhook, "webhook")
    webhook.set_defaults(handler=cmd_webhook)


def _add_settings(parser: argparse.ArgumentParser, command: str) -> None:
    """The flags of ``command``'s settings (config.COMMANDS), in their --help groups."""
    spec = config.COMMANDS[command]
    parser.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help=f"YAML file of settings (name: value) [env {config.CONFIG_ENV}]",
    )
    for title, settings in spec.groups:
        config.add_arguments(parser, settings, title=title)
        if title == "secrets store":
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


def _add_emit_output(parser: argparse.ArgumentParser) -> None:
    """emit's -o: the token's shape on stdout (a flag only, see config.FLAG_ONLY)."""
    choices = ("raw", "env", "json")
    parser.add_argument(
        "-o",
        "--output",
        choices=choices,
        default="raw",
        help="raw: the token; env: LINUXGUARD_ENROLL_TOKEN=... and LINUXGUARD_TENANT_ID=... "
        "lines; json (default: raw)",
    )
    parser.add_argument(
        "-f", "--format", dest="output", choices=choices, action=_Deprecated, help=SUPPRESS
    )


SUPPRESS = argparse.SUPPRESS


class _Deprecated(argparse.Action):
    """A former spelling of a flag: stores like the new one, and warns."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        new = next(
            "/".join(a.option_strings)
            for a in parser._actions
            if a.dest == self.dest and a is not self and a.option_strings
        )
        notes = list(getattr(namespace, "_deprecated", []))
        notes.append(f"{option_string} is deprecated: use {new}")
        namespace._deprecated = notes


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs with line breaks are kept as written (examples, tables);
    one-paragraph descriptions are wrapped as usual."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return super()._fill_text(text, width, indent)
        return argparse.HelpFormatter._fill_text(self, text, width, indent)


class Parser(argparse.ArgumentParser):
    """argparse with the subcommand's own usage on errors, and "did you mean"."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {_suggest(self, message)}\n")


_INVALID_CHOICE = re.compile(r"invalid choice: '(?P<word>[^']*)' \(choose from (?P<choices>.*)\)")


def _suggest(parser: argparse.ArgumentParser, message: str) -> str:
    """``message`` plus "did you mean X?" for a mistyped command, choice or flag."""
    import difflib

    choice = _INVALID_CHOICE.search(message)
    if choice:
        options = re.findall(r"'([^']*)'", choice.group("choices"))
        close = difflib.get_close_matches(choice.group("word"), options, n=1, cutoff=0.6)
        return f"{message}; did you mean {close[0]}?" if close else message
    if not message.startswith("unrecognized arguments: "):
        return message
    known = [
        option
        for action in parser._actions
        if action.help != SUPPRESS
        for option in action.option_strings
    ]
    hints = []
    for word in message.removeprefix("unrecognized arguments: ").split():
        if not word.startswith("-"):
            continue
        flag = word.split("=", 1)[0]
        elsewhere = _commands_with_flag(flag)
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
        if elsewhere:
            hints.append(f"{flag} is a flag of {', '.join(elsewhere)}")
        elif close:
            hints.append(f"did you mean {close[0]}?")
    return f"{message}; {'; '.join(hints)}" if hints else message


def _commands_with_flag(flag: str) -> list[str]:
    return [
        name
        for name, command in config.COMMANDS.items()
        if any(flag in setting.flags for setting in command.settings)
    ]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _top_epilog() -> str:
    from rotator.errors import EXIT_CODE_MEANINGS

    codes = "\n".join(
        f"  {int(code):>3}  {meaning}" for code, meaning in EXIT_CODE_MEANINGS.items()
    )
    return (
        "With no command, the flags are those of `rotate`: lg-rotate --provider vault "
        "--tenant T.\nEvery setting is a flag --name, a variable LG_ROTATE_NAME and a key "
        "name: in --config;\n`lg-rotate COMMAND --help` lists them with their defaults.\n\n"
        f"exit codes:\n{codes}\n\n{_examples('lg-rotate')}"
    )


# Two or three real commands per subcommand, at the end of its --help (tests/test_settings.py
# parses every one of them with the real parser).
EXAMPLES: dict[str, tuple[str, ...]] = {
    "lg-rotate": (
        "lg-rotate demo",
        "lg-rotate rotate --provider vault --tenant acme -n linuxguard",
        "lg-rotate status --provider vault --tenant acme -o json",
    ),
    "rotate": (
        "lg-rotate rotate --provider vault --tenant acme "
        "--linuxguard-url https://linuxguard.example.com -n linuxguard",
        "lg-rotate rotate --provider vault --tenant acme --dry-run -o json",
        "lg-rotate rotate --provider vault --tenant acme "
        "--restart daemonset/linuxguard-agent --wait --timeout 10m",
    ),
    "status": (
        "lg-rotate status --provider vault --tenant acme",
        "lg-rotate status --provider vault --tenant acme -n linuxguard -o json --check",
    ),
    "exec": (
        "lg-rotate exec --provider vault --tenant acme -- "
        "docker run -e LINUXGUARD_ENROLL_TOKEN -e LINUXGUARD_TENANT_ID linuxguard/agent:1",
        "lg-rotate exec --provider aws --tenant acme --pass-env AWS_PROFILE -- "
        "docker run -e LINUXGUARD_ENROLL_TOKEN linuxguard/agent:1",
    ),
    "emit": (
        "docker run --env-file <(lg-rotate emit -o env --provider vault --tenant acme) "
        "linuxguard/agent:1",
        "lg-rotate emit -o json --provider vault --tenant acme --from-store | jq -r .expiresAt",
    ),
    "watch": (
        "lg-rotate watch --provider vault --tenant acme -n linuxguard "
        "-l app=linuxguard-agent --metrics-bind-address :9102",
        "LG_ROTATE_CONFIG=/etc/lg-rotate/config.yaml lg-rotate watch",
    ),
    "webhook": (
        "lg-rotate webhook --provider vault --tenant acme -n linuxguard "
        "--tls-cert-file /tls/tls.crt --tls-private-key-file /tls/tls.key",
        "lg-rotate webhook --config /etc/lg-rotate/config.yaml --admission-budget 5s "
        "--on-failure admit",
    ),
    "roll": (
        "lg-rotate roll daemonset/linuxguard-agent --provider vault --tenant acme "
        "-n linuxguard --timeout 5m",
        "lg-rotate roll daemonset/linuxguard-agent --provider vault --tenant acme -o json",
    ),
    "demo": ("lg-rotate demo", "lg-rotate demo -v --log-format text"),
    "providers": ("lg-rotate providers", "lg-rotate providers -o json"),
    "completion": (
        "source <(lg-rotate completion bash)",
        "lg-rotate completion zsh > ~/.zfunc/_lg-rotate",
        "lg-rotate completion fish | source",
    ),
    "audit": (
        "lg-rotate audit k8s/",
        "helm template agent ./chart | lg-rotate audit -",
        "lg-rotate audit --cluster -n linuxguard -l app=linuxguard-agent -o sarif",
    ),
}


def _examples(name: str) -> str | None:
    examples = EXAMPLES.get(name)
    if not examples:
        return None
    return "examples:\n" + "\n".join(f"  {line}" for line in examples)


# --- commands --------------------------------------------------------------------------


def _compose(args: argparse.Namespace) -> assemble.Parts:
    """The one resolution of this command's settings, then its parts (rotator.assemble)."""
    settings = config.resolve_command(args.command, args)
    _configure_logs(settings)
    return assemble.compose(settings)


def cmd_rotate(args: argparse.Namespace) -> int:
    parts = _compose(args)
    settings, kube = parts.settings, parts.kube
    workload = _parse_restart(settings, kube)
    report = parts.require_rotator().rotate(dry_run=settings.dry_run)
    _print_rotation(report, output=settings.output, settings=settings)
    _warn_if_created(report, settings)
    if workload is not None and kube is not None and not settings.dry_run:
        _restart(
            kube,
            workload=workload,
            secret=settings.secret,
            wait=settings.wait,
            timeout=settings.timeout,
        )
    return ExitCode.OK


def cmd_watch(args: argparse.Namespace) -> int:
    import threading

    from rotator.kube import controller
    from rotator.kube.secret import SecretTarget

    parts = _compose(args)
    resolved, kube = parts.settings, parts.require_kube()
    assert isinstance(kube.target, SecretTarget)
    metrics = _metrics_address(resolved)
    watcher = controller.Controller(
        api_client=kube.api_client,
        namespace=kube.namespace,
        selector=resolved.selector,
        container=resolved.container,
        rotator=parts.require_rotator(),  # one client, reused for every rotation
        target=kube.target,
        expiry_margin=resolved.expiry_margin,
        deletions_per_minute=resolved.deletions_per_minute,
        lease_duration=resolved.leader_lease_duration,
        metrics_port=None if metrics is None else metrics[1],
        metrics_host="0.0.0.0" if metrics is None else metrics[0],  # noqa: S104 - for Prometheus
    )
    stop = threading.Event()
    restore = controller.install_signal_handlers(stop)
    try:
        watcher.run(stop=stop)
    finally:
        restore()
    return ExitCode.OK


def cmd_webhook(args: argparse.Namespace) -> int:
    import threading

    from rotator.kube import controller, webhook

    parts = _compose(args)  # checks --tls-cert-file and --tls-private-key-file too
    resolved, provider, kube = parts.settings, parts.require_provider(), parts.require_kube()
    server = webhook.build_server(
        api_client=kube.api_client,
        namespace=kube.namespace,
        shared_secret=resolved.secret,
        tenant=resolved.tenant,
        minter=parts.require_minter(),
        provider=provider,
        cert_file=resolved.tls_cert_file,
        key_file=resolved.tls_private_key_file,
        listen=resolved.listen,
        selector=resolved.selector,
        token_key=resolved.token_key,
        tenant_key=resolved.tenant_key,
        min_ttl=parts.min_ttl,
        ttl_seconds=resolved.ttl,
        keep_versions=resolved.keep_versions,
        shards=resolved.record_shards,
        budget=resolved.admission_budget,
        on_failure=resolved.on_failure,
        wait_for_pair=resolved.tls_self_managed,
    )
    keeper = None
    if resolved.tls_self_managed:
        from rotator.kube.webhook_certs import CertKeeper

        keeper = CertKeeper(
            api_client=kube.api_client,
            namespace=kube.namespace,
            secret_name=resolved.tls_secret,
            webhook_configuration=resolved.tls_webhook_configuration,
            service=resolved.tls_service,
        )
    plain = _webhook_metrics_server(server, _metrics_address(resolved))
    stop = threading.Event()
    restore = controller.install_signal_handlers(stop)
    keeping = None
    try:
        if plain is not None:
            plain.start()
        if keeper is not None:
            # Beside the server, on the same stop: on SIGTERM it releases its Lease, so
            # another replica keeps the certificates at once.
            keeping = threading.Thread(
                target=keeper.run, kwargs={"stop": stop}, name="lg-rotate-webhook-certs"
            )
            keeping.start()
        webhook.serve(server, stop=stop)
    finally:
        stop.set()
        if keeping is not None and keeper is not None:
            keeping.join(timeout=keeper.request_timeout + 5)
        if plain is not None:
            plain.stop()
        restore()
    return ExitCode.OK


def _metrics_address(settings: config.Settings) -> tuple[str, int] | None:
    """``--metrics-bind-address`` as ``(host, port)``, None for ``0``; the deprecated
    ``--metrics-port PORT`` (flag, variable or config key) stands for ``0.0.0.0:PORT``
    when the bind address is not given."""
    address = str(settings.get("metrics_bind_address") or "0")
    port = settings.get("metrics_port")
    if port is not None:
        old = settings.source("metrics_port")
        if settings.source("metrics_bind_address").kind == "default":
            address = f"0.0.0.0:{port}"
            log.warning(
                "%s is deprecated: use --metrics-bind-address :%d "
                "(LG_ROTATE_METRICS_BIND_ADDRESS, metrics-bind-address: in the config file)",
                old,
                port,
            )
        else:
            log.warning(
                "%s is deprecated and ignored: --metrics-bind-address %s (%s) is used",
                old,
                address,
                settings.source("metrics_bind_address"),
            )
    try:
        return config.bind_address(address)
    except ValueError as exc:  # checked when the setting was read; a derived one here
        raise ConfigError(f"--metrics-bind-address: {exc}", fix="e.g. :9102, or 0") from None


def _webhook_metrics_server(server: Any, address: tuple[str, int] | None) -> Any:
    """The webhook's plain-HTTP ``/metrics`` (and health) listener, if one is asked for;
    ``/metrics`` stays on the HTTPS listener too."""
    if address is None:
        return None
    from rotator.metrics import MetricsServer

    host, port = address

    class _Listener(MetricsServer):
        def start(self) -> MetricsServer:
            try:
                return super().start()
            except OSError as exc:
                raise ConfigError(
                    f"cannot serve metrics on {host}:{port}: {exc.strerror or type(exc).__name__}",
                    fix="pick another --metrics-bind-address (0: none), or stop what uses it",
                ) from exc

    return _Listener(
        registry=server.metrics.registry,
        liveness=lambda: (True, {}),
        readiness=server.readiness,  # draining, or no key pair loaded yet
        host=host,
        port=port,
    )


def cmd_roll(args: argparse.Namespace) -> int:
    import threading

    from rotator.kube import controller, roll, workloads

    parts = _compose(args)
    resolved, kube = parts.settings, parts.require_kube()
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
            rotator=parts.require_rotator(),
            timeout_per_pod=resolved.timeout,
            on_progress=progress,
            restart=args.restart,
            stop=stop,
        )
    finally:
        progress.close()
        restore()
    if resolved.output != "text":
        _print_data(report.as_dict(), output=resolved.output)
    else:
        verb = "resumed and finished" if report.resumed else "finished"
        print(
            f"roll {report.roll_id} of {report.workload} {verb}: {len(report.rolled)} pods "
            f"rolled, {len(report.skipped)} skipped, {report.duration_seconds:.0f}s"
        )
    return ExitCode.OK


def _parse_restart(
    settings: config.Settings, kube: assemble.KubeParts | None
) -> tuple[str, str] | None:
    """Validate --restart before rotating: a typo must not cost a token."""
    if not settings.restart:
        if settings.wait:
            raise ConfigError("--wait follows a restart", fix="add --restart daemonset/NAME")
        return None
    if kube is None:
        raise ConfigError(
            "--restart needs the Kubernetes target", fix="drop --target none or drop --restart"
        )
    from rotator.kube import workloads

    return workloads.parse_workload_ref(settings.restart)


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

    parts = _compose(args)
    resolved, kube = parts.settings, parts.kube
    report = read_status(
        provider=parts.require_provider(),
        tenant=resolved.tenant,
        target=kube.target if kube else None,
    )
    min_ttl = parts.min_ttl
    _print_status(report, output=resolved.output, min_ttl=min_ttl, settings=resolved)
    if resolved.check and report.problems(min_ttl=min_ttl):
        return ExitCode.CHECK_FAILED
    return ExitCode.OK


def _launch_token(args: argparse.Namespace) -> tuple[EnrollToken, Provider]:
    """A token for one launch: the store's current one, or (default) a fresh rotation.

    A fresh rotation runs the preflight checks (the store reachable and writable) before
    it mints: a launch that cannot store its token costs none.
    """
    from providers.base import Stage

    parts = _compose(args)  # with --from-store: no minter (nothing is minted)
    resolved, provider, min_ttl = parts.settings, parts.require_provider(), parts.min_ttl
    if resolved.from_store:
        record = provider.read(tenant=resolved.tenant, stage=Stage.CURRENT)
        if record is None:
            raise TokenError(
                f"{provider.location(tenant=resolved.tenant)} holds no current token",
                fix="run lg-rotate rotate first, or drop --from-store to mint one",
            )
        record.token.check_usable(tenant_id=resolved.tenant, min_ttl=min_ttl)
        return record.token, provider
    # A launch consumes a token: always a fresh one, never a pending one resumed.
    report = parts.require_rotator().rotate(resume=False)
    assert report.record is not None
    return report.record.token, provider


def cmd_exec(args: argparse.Namespace) -> int:
    from rotator import launch

    argv = list(args.argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    launch.check_command_line(argv)  # before minting: a refused launch costs no token
    pass_env = launch.check_pass_env(args.pass_env)
    executable = launch.resolve_executable(argv)
    launch.warn_if_token_not_forwarded(argv)
    token, provider = _launch_token(args)
    launch.check_command_line(argv, token=token)
    launch.exec_with_token(
        argv,
        executable=executable,
        token=token,
        withhold=launch.CREDENTIAL_ENV | assemble.secret_option_env(provider.name),
        pass_env=pass_env,
    )


def cmd_emit(args: argparse.Namespace) -> int:
    from rotator import launch

    # Before minting: a token for a file, a device or a terminal is never minted at all.
    launch.check_emit_destination(sys.stdout, force=args.force)
    token, _ = _launch_token(args)
    launch.emit(token, fmt=args.output, stream=sys.stdout)
    return ExitCode.OK


def cmd_demo(args: argparse.Namespace) -> int:
    from rotator import demo

    settings = config.resolve_command("demo", args)
    level = settings.log_level
    if settings.source("log_level") == config.DEFAULT:  # the story only, unless asked
        level = "info" if settings.verbose else "warning"
    _configure_logs(settings, level=level)
    return demo.run(out=sys.stdout)


def cmd_completion(args: argparse.Namespace) -> int:
    from rotator import completion  # shtab is imported by this command only

    sys.stdout.write(completion.script(args.shell))
    return ExitCode.OK


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
    parser = Parser(prog=f"lg-rotate {name}", description=module.__doc__)
    getattr(module, add_arguments)(parser)
    parser.epilog = parser.epilog or _examples(name)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return ExitCode.OK if exc.code in (0, None) else ExitCode.CONFIG
    return int(getattr(module, run_command)(args))


def cmd_providers(args: argparse.Namespace) -> int:
    from providers import registry

    settings = config.resolve_command("providers", args)
    _configure_logs(settings)
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
    if settings.output != "table":
        _print_data(rows, output=settings.output)
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


def _configure_logs(settings: config.Settings, *, level: str | None = None) -> None:
    """Logs as the settings say; then the warnings of their resolution (unknown
    LG_ROTATE_* variables, deprecated spellings)."""
    logs.configure(log_format=settings.log_format, level=level or settings.log_level)
    for warning in settings.warnings:
        log.warning("%s", warning)


def _print_data(data: Any, *, output: str) -> None:
    """A report or a list as JSON or YAML on stdout."""
    if output == "yaml":
        import yaml

        print(yaml.safe_dump(data, sort_keys=False, default_flow_style=False), end="")
        return
    print(json.dumps(data, indent=2))


def _namespace_of(settings: config.Settings | None) -> dict[str, str] | None:
    """The Secret's namespace and where it came from, for reports."""
    if settings is None or "namespace" not in settings.declared or not settings.get("namespace"):
        return None
    return {"value": settings.namespace, "source": str(settings.source("namespace"))}


def _warn_if_created(report: RotationReport, settings: config.Settings) -> None:
    """A rotation that creates the Secret rather than patching one may be writing to the
    wrong namespace (the agents would never read it): say so, and where it came from."""
    if report.target_existed is not False:
        return
    where = _namespace_of(settings) or {"value": "?", "source": "?"}
    log.warning(
        "%s the Secret %s: it did not exist in namespace %s (%s). If the agents read a "
        "Secret in another namespace, rotate there with -n/--namespace",
        "would create" if report.dry_run else "created",
        report.target_location,
        where["value"],
        where["source"],
    )


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


def _print_rotation(
    report: RotationReport, *, output: str, settings: config.Settings | None = None
) -> None:
    namespace = _namespace_of(settings) if report.target_location else None
    if output != "text":
        data = report.as_dict()
        if namespace:
            data["namespace"] = namespace
        _print_data(data, output=output)
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
        f"  fingerprint  {_short(report.fingerprint)}{_was(report)}",
        f"  store        {report.store_location} version {report.store_version or '-'}",
    ]
    if report.target_location:
        lines.append(
            f"  target       {report.target_location} revision {report.target_revision or '-'}"
        )
    if namespace:
        lines.append(f"  namespace    {namespace['value']} (from {namespace['source']})")
    if report.expires_at:
        left = _duration(report.ttl_left_seconds)
        lines.append(f"  expires      {report.expires_at.isoformat()} (in {left})")
    lines.append(f"  took         {report.duration_seconds:.2f}s")
    print("\n".join(lines))


def _was(report: RotationReport) -> str:
    """What the target held before: a fingerprint, or why there is none."""
    if report.target_existed is None:  # --target none: no Secret, no previous value
        return ""
    if not report.target_existed:
        if report.dry_run:
            return " (was none: the Secret does not exist, would be created)"
        return " (was none: the Secret did not exist, created)"
    if report.previous_fingerprint is None:
        return " (was none: the Secret held no lg-rotate token)"
    return f" (was {_short(report.previous_fingerprint)})"


def _print_status(
    report: StatusReport,
    *,
    output: str,
    min_ttl: timedelta,
    settings: config.Settings | None = None,
) -> None:
    data = report.as_dict(min_ttl=min_ttl)
    if output != "text":
        if settings is not None:
            data["settings"] = settings.describe()  # value and source; secrets hidden
        _print_data(data, output=output)
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
    else:
        rows.append("in sync: n/a (--target none: no Secret to compare; the store is checked)")
    for problem in report.problems(min_ttl=min_ttl):
        rows.append(f"! {problem}")
    rows.extend(_settings_lines(settings))
    print("\n".join(rows))


def _settings_lines(settings: config.Settings | None) -> list[str]:
    """The settings that are not defaults, with their sources (-o json: all of them)."""
    if settings is None:
        return []
    chosen = {
        name: item
        for name, item in settings.describe(as_text=True).items()
        if item["source"] != "default" or (name == "namespace" and item["value"] != "-")
    }
    if not chosen:
        return []
    width = max(len(name) for name in chosen) + 2
    lines = ["settings (not defaults; -o json lists all):"]
    for name, item in chosen.items():
        lines.append(f"  {name:<{width}}{item['value']}  ({item['source']})")
    return lines


# --- entry point ---------------------------------------------------------------------


def _normalise_argv(argv: list[str]) -> list[str]:
    """The bare form ``lg-rotate --provider vault --tenant T`` means ``rotate``."""
    bare = bool(argv) and argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")
    return ["rotate", *argv] if bare else argv


def _parse_args(parser: argparse.ArgumentParser, args_list: list[str]) -> argparse.Namespace:
    """Parse; an unknown flag is reported by its subcommand's parser (its usage, "did you
    mean"), not by the top-level one; deprecated spellings are warned about."""
    args, extras = parser.parse_known_args(args_list)
    if extras:
        subparser = _subcommands(parser).get(getattr(args, "command", None) or "", parser)
        subparser.error(f"unrecognized arguments: {' '.join(extras)}")
    for note in getattr(args, "_deprecated", []):
        print(f"lg-rotate: warning: {note}", file=sys.stderr)
    return args


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
            args = _parse_args(parser, args_list)
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
