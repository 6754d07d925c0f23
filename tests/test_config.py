"""Settings precedence: flags > LG_ROTATE_* > native env > YAML file > defaults."""

from __future__ import annotations

import argparse

import pytest

from rotator import config
from rotator.errors import ConfigError

SETTINGS = [
    config.Setting(name="tenant", help="t"),
    config.Setting(name="min-ttl", help="m", default=60.0, parse=config.parse_seconds),
    config.Setting(name="kubeconfig", help="k", env=("KUBECONFIG",)),
    config.Setting(name="target", help="x", default="kubernetes", choices=("kubernetes", "none")),
]


def parse(argv):
    parser = argparse.ArgumentParser()
    config.add_arguments(parser, SETTINGS, title="test")
    return parser.parse_args(argv)


def test_defaults_when_nothing_is_given():
    resolved = config.resolve(settings=SETTINGS, flags=parse([]), env={}, config_file={})
    assert resolved.tenant is None
    assert resolved.min_ttl == 60.0
    assert resolved.origins["min_ttl"] == "default"


def test_flag_beats_env_beats_native_env_beats_file():
    file = {"tenant": "from-file", "kubeconfig": "/file", "min_ttl": "5m"}
    env = {"LG_ROTATE_TENANT": "from-env", "KUBECONFIG": "/native", "LG_ROTATE_MIN_TTL": "2m"}
    resolved = config.resolve(
        settings=SETTINGS, flags=parse(["--tenant", "from-flag"]), env=env, config_file=file
    )
    assert resolved.tenant == "from-flag"
    assert resolved.origins["tenant"] == "flag --tenant"
    assert resolved.min_ttl == 120.0
    assert resolved.origins["min_ttl"] == "env LG_ROTATE_MIN_TTL"
    assert resolved.kubeconfig == "/native"

    without_env = config.resolve(settings=SETTINGS, flags=parse([]), env={}, config_file=file)
    assert without_env.tenant == "from-file"
    assert without_env.min_ttl == 300.0
    assert without_env.kubeconfig == "/file"


def test_lg_rotate_env_beats_native_env():
    env = {"LG_ROTATE_KUBECONFIG": "/mine", "KUBECONFIG": "/native"}
    resolved = config.resolve(settings=SETTINGS, flags=parse([]), env=env, config_file={})
    assert resolved.kubeconfig == "/mine"


def test_unknown_file_keys_are_errors():
    with pytest.raises(ConfigError, match="tennant"):
        config.resolve(settings=SETTINGS, flags=parse([]), env={}, config_file={"tennant": "x"})


def test_invalid_values_name_their_origin():
    with pytest.raises(ConfigError, match="LG_ROTATE_MIN_TTL"):
        config.resolve(
            settings=SETTINGS, flags=parse([]), env={"LG_ROTATE_MIN_TTL": "soon"}, config_file={}
        )
    with pytest.raises(ConfigError) as caught:
        config.resolve(
            settings=SETTINGS, flags=parse([]), env={"LG_ROTATE_TARGET": "s3"}, config_file={}
        )
    assert "use one of kubernetes, none" in caught.value.one_line()


def test_yaml_file_loading(tmp_path):
    path = tmp_path / "lg.yaml"
    path.write_text("tenant: acme\nmin-ttl: 90\n", encoding="utf-8")
    assert config.load_yaml(str(path)) == {"tenant": "acme", "min_ttl": 90}
    bad = tmp_path / "bad.yaml"
    bad.write_text("tenant: [acme\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load_yaml(str(bad))
    with pytest.raises(ConfigError, match="cannot read config file"):
        config.load_yaml(str(tmp_path / "missing.yaml"))


def test_require_names_every_way_to_give_a_setting():
    resolved = config.resolve(settings=SETTINGS, flags=parse([]), env={}, config_file={})
    with pytest.raises(ConfigError) as caught:
        config.require(resolved, "tenant", why="whose token")
    text = caught.value.one_line()
    assert "--tenant" in text
    assert "LG_ROTATE_TENANT" in text
    assert "--config" in text


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90.0), ("90s", 90.0), ("2m", 120.0), ("1h", 3600.0)]
)
def test_parse_seconds(text, seconds):
    assert config.parse_seconds(text) == seconds


# --- the settings contract, declared once (rotator.config.COMMANDS) ----------------------------


def sample(setting: config.Setting) -> str:
    """A value the setting accepts, as text (what a variable or a YAML scalar carries)."""
    if setting.name == "provider":
        return "memory"
    if setting.switch:
        return "true"
    if setting.choices:
        return setting.choices[-1]
    for candidate in ("600", "0.5", "admit", ":9102", "app=x"):
        try:
            setting.parse(candidate)
        except ValueError:
            continue
        return candidate
    raise AssertionError(f"no sample value for {setting.name}")


@pytest.mark.parametrize("command", sorted(config.COMMANDS))
def test_every_setting_is_a_variable_and_a_config_key(command, tmp_path):
    spec = config.COMMANDS[command]
    flags = argparse.Namespace()
    for setting in spec.settings:
        value = sample(setting)
        from_env = config.resolve_command(command, flags, env={setting.env_name: value})
        assert from_env.source(setting.key) == config.Source("env", setting.env_name)
        assert from_env.get(setting.key) == setting.parse(value)
        path = tmp_path / f"{setting.name}.yaml"
        path.write_text(f"{setting.name}: {value!r}\n", encoding="utf-8")
        from_file = config.resolve_command(command, flags, env={config.CONFIG_ENV: str(path)})
        assert from_file.source(setting.key) == config.Source("config", str(path))
        assert from_file.get(setting.key) == setting.parse(value)


def test_switches_take_booleans_from_the_environment_and_the_file(tmp_path):
    flags = argparse.Namespace()
    for text, expected in (("1", True), ("yes", True), ("false", False), ("0", False)):
        settings = config.resolve_command("rotate", flags, env={"LG_ROTATE_DRY_RUN": text})
        assert settings.dry_run is expected
    path = tmp_path / "lg.yaml"
    path.write_text("dry-run: true\nwait: false\n", encoding="utf-8")
    settings = config.resolve_command("rotate", argparse.Namespace(config=str(path)), env={})
    assert settings.dry_run is True
    assert settings.wait is False
    with pytest.raises(ConfigError, match="LG_ROTATE_DRY_RUN"):
        config.resolve_command("rotate", flags, env={"LG_ROTATE_DRY_RUN": "maybe"})


def test_settings_are_immutable_and_derive_a_new_object():
    settings = config.resolve_command("status", argparse.Namespace(), env={})
    with pytest.raises(TypeError):
        settings.values["tenant"] = "x"  # type: ignore[index]
    with pytest.raises(AttributeError):
        settings.command = "rotate"  # type: ignore[misc]
    derived = settings.derive("namespace", "agents", config.Source("kubeconfig", "context c"))
    assert derived.namespace == "agents"
    assert str(derived.source("namespace")) == "kubeconfig context c"
    assert settings.namespace is None
    assert str(settings.source("namespace")) == "default"


def test_unknown_variables_are_warnings_with_a_suggestion():
    env = {"LG_ROTATE_TENNANT": "x", "LG_ROTATE_TENANT": "acme", "LG_ROTATE_VAULT_ADR": "y"}
    settings = config.resolve_command("rotate", argparse.Namespace(), env=env)
    assert settings.tenant == "acme"
    assert settings.warnings == (
        "LG_ROTATE_TENNANT is not a setting of lg-rotate and is ignored "
        "(did you mean LG_ROTATE_TENANT?)",
        "LG_ROTATE_VAULT_ADR is not a setting of lg-rotate and is ignored "
        "(did you mean LG_ROTATE_VAULT_ADDR?)",
    )
    # The kubelet's service links for a Service lg-rotate-webhook are no typos either (seen on
    # a real node); a lone look-alike still is.
    links = {
        "LG_ROTATE_WEBHOOK_SERVICE_HOST": "10.96.0.20",
        "LG_ROTATE_WEBHOOK_SERVICE_PORT": "443",
        "LG_ROTATE_WEBHOOK_SERVICE_PORT_HTTPS": "443",
        "LG_ROTATE_WEBHOOK_PORT": "tcp://10.96.0.20:443",
        "LG_ROTATE_WEBHOOK_PORT_443_TCP": "tcp://10.96.0.20:443",
        "LG_ROTATE_WEBHOOK_PORT_443_TCP_ADDR": "10.96.0.20",
        "LG_ROTATE_WEBHOOK_PORT_443_TCP_PORT": "443",
        "LG_ROTATE_WEBHOOK_PORT_443_TCP_PROTO": "tcp",
    }
    linked = config.resolve_command("rotate", argparse.Namespace(), env=links)
    assert linked.warnings == ()
    lone = config.resolve_command(
        "rotate", argparse.Namespace(), env={"LG_ROTATE_WEBHOOK_PORT": "tcp://10.96.0.20:443"}
    )
    assert lone.warnings == ("LG_ROTATE_WEBHOOK_PORT is not a setting of lg-rotate and is ignored",)
    # A setting of another command is no typo: one ConfigMap serves rotate and watch.
    other = config.resolve_command("rotate", argparse.Namespace(), env={"LG_ROTATE_SELECTOR": "a"})
    assert other.warnings == ()


def test_unknown_config_keys_suggest_the_closest(tmp_path):
    path = tmp_path / "lg.yaml"
    path.write_text("tennant: acme\nmin_tll: 2m\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        config.resolve_command("rotate", argparse.Namespace(config=str(path)), env={})
    text = caught.value.one_line()
    assert "min-tll (did you mean min-ttl?)" in text
    assert "tennant (did you mean tenant?)" in text


def test_deprecated_values_are_accepted_with_a_warning():
    settings = config.resolve_command("status", argparse.Namespace(output="table"), env={})
    assert settings.output == "text"
    assert any("deprecated" in w and "'table'" in w for w in settings.warnings)


def test_missing_settings_are_reported_together():
    tenant, url = (config.all_settings()[n][0][1] for n in ("tenant", "linuxguard-url"))
    error = config.missing_error([(tenant, "whose token"), (url, "where to mint")])
    assert error.one_line() == (
        "missing --tenant (whose token), --linuxguard-url (where to mint) (fix: pass --tenant "
        "and --linuxguard-url, set LG_ROTATE_TENANT and LG_ROTATE_LINUXGUARD_URL, or put "
        "tenant: and linuxguard-url: in --config)"
    )


@pytest.mark.parametrize(
    ("text", "seconds", "shown"),
    [
        ("90", 90.0, "1m30s"),
        ("1m30s", 90.0, "1m30s"),
        ("10m", 600.0, "10m"),
        ("1h", 3600.0, "1h"),
        ("1h0m5s", 3605.0, "1h5s"),
        ("250ms", 0.25, "250ms"),
        ("1.5s", 1.5, "1.5s"),
        ("0", 0.0, "0s"),
    ],
)
def test_durations_read_and_print_the_same_way(text, seconds, shown):
    from rotator.durations import format_duration, parse_duration

    assert parse_duration(text) == seconds
    assert format_duration(seconds) == shown
    assert parse_duration(shown) == seconds


@pytest.mark.parametrize("text", ["soon", "5x", "1m1m", "30s1m", "-5s", "", "m"])
def test_bad_durations_say_what_is_accepted(text):
    from rotator.durations import parse_duration

    with pytest.raises(ValueError, match=r"must not be negative|90s, 10m, 1h, 1m30s"):
        parse_duration(text)


def test_described_settings_hide_credentials_in_urls():
    settings = config.resolve_command(
        "rotate",
        argparse.Namespace(linuxguard_url="https://user:pw@linuxguard.example.com"),
        env={},
    )
    shown = settings.describe()["linuxguard-url"]
    assert shown == {
        "value": "https://***@linuxguard.example.com",
        "source": "flag --linuxguard-url",
    }
    assert settings.linuxguard_url == "https://user:pw@linuxguard.example.com"  # used as given
