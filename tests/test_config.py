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
