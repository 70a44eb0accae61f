"""Settings: defaults, file and environment overrides, and bad input reported with file, line
and field, all at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from eventbus._errors import ConfigError
from eventbus.cloudevents import DEFAULT_MAX_BATCH_ENTRIES, DEFAULT_MAX_EVENT_SIZE
from eventbus.config import Settings, load_settings


def test_defaults_are_the_embedded_default() -> None:
    s = load_settings(None, env={})
    assert s.embedded_bus and s.embedded_database
    assert s.listen.host == "127.0.0.1" and s.listen.port == 8080
    assert s.max_event_size == 256 * 1024 and s.api_keys == ()
    assert s.router.cel == "cel-python"


def test_file_and_environment_overrides(tmp_path: Path) -> None:
    cfg = tmp_path / "eventbus.yaml"
    cfg.write_text("listen: {port: 9000}\nbus: {nats: {url: nats://a:4222}}\n")
    env = {
        "EVENTBUS_LISTEN__PORT": "9100",
        "EVENTBUS_DATABASE__URL": "postgresql://x/y",
        "EVENTBUS_BUS__NATS__STREAM": "S2",
        "EVENTBUS_ROUTER__CEL": "cel-expr-python",
        "PATH": "/bin",
    }
    s = load_settings(cfg, env=env)
    assert s.listen.port == 9100 and s.router.cel == "cel-expr-python"
    assert s.database.url == "postgresql://x/y" and not s.embedded_database
    assert s.bus.nats.url == "nats://a:4222" and s.bus.nats.stream == "S2"
    assert not s.embedded_bus
    assert load_settings(None, env={"EVENTBUS_CONFIG": str(cfg)}).listen.port == 9000


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("listen: [1\n", "eventbus.yaml:1: invalid YAML"),
        ("listen: {port: 1}\nlisten: {port: 2}\n", "eventbus.yaml:2: duplicate key 'listen'"),
        ("- 1\n", "eventbus.yaml:1: settings must be a mapping"),
        ("listen:\n  port: 99999\n", "eventbus.yaml:2: listen.port: Input should be less than"),
        ("bus:\n  backend: rabbit\n", "eventbus.yaml:2: bus.backend: Input should be 'nats'"),
        ("bus:\n  nats:\n    stream: S\n    typo: 1\n", "eventbus.yaml:4: bus.nats.typo: Extra"),
        ("api_keys:\n  - {name: a, key: short}\n", "eventbus.yaml:2: api_keys.0.key"),
        # a key that can do nothing; one key twice, one of the two taking effect
        (
            "api_keys:\n  - {name: a, key: abcdefghijklmnop1234, scopes: []}\n",
            "eventbus.yaml:2: api_keys.0.scopes: Tuple should have at least 1 item",
        ),
        (
            "api_keys:\n  - {name: a, key: abcdefghijklmnop1234, scopes: [admin]}\n"
            "  - {name: b, key: abcdefghijklmnop1234}\n",
            "api_keys: Value error, api keys 'a' and 'b' are the same key",
        ),
        ("bus:\n  kafka:\n    fetch_wait: 0\n", "eventbus.yaml:3: bus.kafka.fetch_wait: Input"),
        ("bus:\n  kafka:\n    linger_ms: -1\n", "eventbus.yaml:3: bus.kafka.linger_ms: Input"),
        ("router:\n  cel: fast\n", "eventbus.yaml:2: router.cel: Input should be 'cel-python'"),
        (
            "listen:\n  send_timeout: 0\n",
            "eventbus.yaml:2: listen.send_timeout: Input should be greater than 0",
        ),
        (
            "database:\n  connect_timeout: 0\n",
            "eventbus.yaml:2: database.connect_timeout: Input should be greater than 0",
        ),
        (
            "client_addresses:\n  allow: [10.0.0.0/8]\n  deny:\n    - '::1/128'\n"
            "    - 10.1.2.3/8\n",
            "eventbus.yaml:5: client_addresses.deny.1: Value error, not a CIDR block or address: "
            "10.1.2.3/8 has host bits set",
        ),
        (
            "client_addresses:\n  trusted_proxies: ['::1/129']\n",
            "eventbus.yaml:2: client_addresses.trusted_proxies.0: Value error, not a CIDR block",
        ),
        ("client_addresses:\n  allow: 10.0.0.0/8\n", "eventbus.yaml:2: client_addresses.allow"),
        ("source_lease: 0.5\n", "eventbus.yaml:1: source_lease: Input should be greater than"),
        ("source_lease: never\n", "eventbus.yaml:1: source_lease: Input should be a valid num"),
        ("worker_hang_timeout: 1\n", "eventbus.yaml:1: worker_hang_timeout: Input should be gr"),
        (
            "retention:\n  audit: 10m\n",
            "eventbus.yaml:2: retention.audit: Value error, must be at least 1h (or forever), "
            "got '10m'",
        ),
        ("retention:\n  dead_letters: -1d\n", "eventbus.yaml:2: retention.dead_letters: Value"),
        ("retention:\n  every: 0\n", "eventbus.yaml:2: retention.every: Input should be gre"),
        ("retention: {audit: 1 week}\n", "eventbus.yaml:1: retention.audit: Value error, not a"),
        (
            "kafka_ingest: {bootstrap_servers: 'k:9092', topics: [ok, 'no good']}\n",
            "eventbus.yaml:1: kafka_ingest.topics.1: Value error, a topic is 1-249 characters",
        ),
        ("bus: {kafka: {bootstrap_servers: 'k:9092,'}}\n", "bus.kafka.bootstrap_servers: Va"),
        # a misspelt key at any depth gets its suggestion (only top-level ones did)
        (
            "bus:\n  kafka:\n    partitons: 3\n",
            "eventbus.yaml:3: bus.kafka.partitons: Extra inputs are not permitted "
            "(did you mean 'partitions'?)",
        ),
        ("retenton: {}\n", "retenton: Extra inputs are not permitted (did you mean 'retention'"),
        # true for a number was 1: "max_in_flight: on" routed one message at a time
        ("bus:\n  max_in_flight: on\n", "eventbus.yaml:2: bus.max_in_flight: Value error, a num"),
        ("listen: {port: yes}\n", "eventbus.yaml:1: listen.port: Value error, a number, not tr"),
        ("retention: {every: true}\n", "retention.every: Value error, a number, not true or fa"),
        # '' was the working directory: the servers' files among the project's
        ("data_dir: ''\n", "eventbus.yaml:1: data_dir: Value error, an empty path"),
        ("rules: ' '\n", "eventbus.yaml:1: rules: Value error, an empty path"),
        # Python reads at most 4,300 digits into an int: a ValueError, no file or line
        pytest.param(
            "listen:\n  port: " + "9" * 5000 + "\n",
            "eventbus.yaml:2: an integer of more than",
            id="long-integer",
        ),
        (  # in an item of a list too
            "api_keys:\n  - {name: a, key: abcdefghijklmnop1234, scope: [admin]}\n",
            "eventbus.yaml:2: api_keys.0.scope: Extra inputs are not permitted (did you mean "
            "'scopes'?)",
        ),
    ],
)
def test_bad_settings_name_file_line_and_field(tmp_path: Path, text: str, expected: str) -> None:
    cfg = tmp_path / "eventbus.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, env={})
    assert expected in str(info.value).replace(str(tmp_path) + "/", "")


def test_client_addresses_from_the_environment() -> None:
    assert not load_settings(None, env={}).client_addresses.restricted
    env = {"EVENTBUS_CLIENT_ADDRESSES__DENY": "[10.0.0.13/32, '2001:db8::/32']"}
    lists = load_settings(None, env=env).client_addresses
    assert [str(n) for n in lists.deny] == ["10.0.0.13/32", "2001:db8::/32"]
    assert lists.restricted and lists.allow == ()


@pytest.mark.parametrize("password", ["Tr0ub4dor #3", "#starts-with-hash", "12345678", "'q'"])
def test_an_environment_secret_is_its_text(password: str) -> None:
    # read as YAML, "Tr0ub4dor #3" lost " #3" and "#..." became no password at all
    env = {
        "EVENTBUS_DATABASE__PASSWORD": password,
        "EVENTBUS_LISTEN__PORT": "9100",
        "EVENTBUS_ALLOW_UNAUTHENTICATED": "true",
        # the client commands' own: not settings (serve refused them as unknown keys)
        "EVENTBUS_URL": "http://127.0.0.1:9",
        "EVENTBUS_API_KEY": "k",
    }
    settings = load_settings(None, env=env)
    assert settings.database.password is not None
    assert settings.database.password.reveal() == password
    assert settings.listen.port == 9100 and settings.allow_unauthenticated is True


def test_an_empty_variable_is_as_unset(tmp_path: Path) -> None:
    # it set the setting to null: the log level refused, the file's database left for the
    # embedded one
    cfg = tmp_path / "eventbus.yaml"
    cfg.write_text("log_level: warning\ndatabase: {url: postgresql://db/x}\n")
    env = {"EVENTBUS_LOG_LEVEL": "", "EVENTBUS_DATABASE__URL": ""}
    settings = load_settings(cfg, env=env)
    assert (settings.log_level, settings.database.url) == ("warning", "postgresql://db/x")
    # and a bad value in the file is the file's, not the empty variable's
    cfg.write_text("log_level: bogus\n")
    with pytest.raises(ConfigError, match=r"eventbus.yaml:1: log_level: ") as info:
        load_settings(cfg, env=env)
    assert "EVENTBUS_LOG_LEVEL" not in str(info.value)


def test_missing_settings_file() -> None:
    with pytest.raises(ConfigError, match="cannot read settings"):
        load_settings("/nonexistent/eventbus.yaml", env={})


def test_bad_environment_value_names_the_variable_and_field(tmp_path: Path) -> None:
    # blamed on the settings file's first line before (or "<defaults>")
    cfg = tmp_path / "eventbus.yaml"
    cfg.write_text("log_format: text\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, env={"EVENTBUS_LISTEN__PORT": "many"})
    assert str(info.value).startswith("environment EVENTBUS_LISTEN__PORT: listen.port: ")
    # a mapping given in one variable: that variable, not one named after the field
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, env={"EVENTBUS_CLIENT_ADDRESSES": "{deny: [10.1.2.3/8]}"})
    assert str(info.value).startswith("environment EVENTBUS_CLIENT_ADDRESSES: client_addresses.")
    # a variable that names no setting (one meant for a secret's {env: ...}) says so and why
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, env={"EVENTBUS_DB_PASSWORD": "s3cret", "EVENTBUS_Listen__Prot": "1"})
    first, second = sorted(str(info.value).splitlines())
    assert first.startswith("environment EVENTBUS_DB_PASSWORD: not a setting (db_password): ")
    assert "needs a name without that prefix" in first and "s3cret" not in str(info.value)
    assert second.startswith(
        "environment EVENTBUS_Listen__Prot: not a setting (listen.prot) (did you mean 'port'?)"
    )
    # a key inside a variable's value that is no setting: the variable is one
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, env={"EVENTBUS_BUS__NATS": "{urll: nats://x:1}"})
    assert str(info.value).startswith("environment EVENTBUS_BUS__NATS: bus.nats.urll: Extra")
    # a value that starts as YAML does and does not parse: said so, without the value (it read
    # "Input should be a valid tuple" and nothing more)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, env={"EVENTBUS_API_KEYS": '[{name: x, key: "a"bSEKRET"}]'})
    assert str(info.value) == (
        "environment EVENTBUS_API_KEYS: api_keys: Input should be a valid tuple (the value is not"
        " valid YAML at line 1, column 20; it was read as text)"
    )
    # YAML's own words may quote the value: left out
    for key in ("*SEKRETabcdefghijklmnop", "!SEKRETabcdefghijklmnop "):
        with pytest.raises(ConfigError) as info:
            load_settings(cfg, env={"EVENTBUS_API_KEYS": f"[{{name: a, key: {key}}}]"})
        assert "not valid YAML" in str(info.value) and "SEKRET" not in str(info.value)


@pytest.mark.parametrize("deeper_first", [True, False])
def test_a_deeper_variable_sets_a_key_inside_a_shallower_ones_value(deeper_first: bool) -> None:
    # in the environment's order, EVENTBUS_LISTEN after EVENTBUS_LISTEN__HOST dropped the host
    pairs = [("EVENTBUS_LISTEN__HOST", "::1"), ("EVENTBUS_LISTEN", "{port: 1, host: 0.0.0.0}")]
    env = dict(pairs if deeper_first else pairs[::-1])
    s = load_settings(None, env=env)
    assert (s.listen.host, s.listen.port) == ("::1", 1)


def test_variables_that_name_no_setting_or_one_setting_twice_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"^environment EVENTBUS___: names no setting"):
        load_settings(None, env={"EVENTBUS___": "1"})
    with pytest.raises(ConfigError, match="sets the same setting as"):
        load_settings(None, env={"EVENTBUS_LISTEN__port": "1", "EVENTBUS_LISTEN__PORT": "2"})
    # one that set a key below a setting names itself (it was "<defaults>: listen.port")
    with pytest.raises(ConfigError) as info:
        load_settings(None, env={"EVENTBUS_LISTEN__PORT__X": "1"})
    assert str(info.value).startswith("environment EVENTBUS_LISTEN__PORT__X: listen.port: ")


@pytest.mark.parametrize(
    "text",
    [
        "router: {shutdown_grace: .inf}",
        "bus: {nats: {ack_wait: .nan}}",
        "bus: {nats: {duplicate_window: 1e300}}",
        "bus: {publish_timeout: 1e300}",
        # a port the service would bind at random: no command could find it
        "listen: {port: 0}",
    ],
)
def test_values_no_service_could_run_with_are_refused(tmp_path: Path, text: str) -> None:
    # loaded before: a grace that never ends, a NATS duration no nanosecond count holds
    cfg = tmp_path / "eventbus.yaml"
    cfg.write_text(text + "\n")
    with pytest.raises(ConfigError, match=rf"^{cfg}:1: "):
        load_settings(cfg, env={})


def test_ingest_limits_default_to_the_cloudevents_ones() -> None:
    # written twice so that eventbus.config imports no pipeline package: they must agree
    settings = Settings()
    assert settings.max_event_size == DEFAULT_MAX_EVENT_SIZE
    assert settings.max_batch_entries == DEFAULT_MAX_BATCH_ENTRIES


def test_retention_defaults_and_forever(tmp_path: Path) -> None:
    kept = load_settings(None, env={}).retention
    assert (kept.audit, kept.dead_letters, kept.source_dead_letters, kept.every) == (
        30 * 86400,
        None,
        30 * 86400,
        3600,
    )
    cfg = tmp_path / "eventbus.yaml"
    cfg.write_text("retention: {audit: forever, dead_letters: 14d, every: 10m}\n")
    kept = load_settings(cfg, env={"EVENTBUS_RETENTION__SOURCE_DEAD_LETTERS": "Forever"}).retention
    assert (kept.audit, kept.dead_letters, kept.source_dead_letters, kept.every) == (
        None,
        14 * 86400,
        None,
        600,
    )


def test_a_number_field_is_told_from_others_whatever_its_annotation() -> None:
    from typing import Annotated, Any

    from pydantic import Field

    from eventbus.config._units import _a_number

    assert _a_number(int) and _a_number(float | None)
    assert _a_number(Annotated[int, Field(ge=1)] | None)  # (read as not a number before)
    assert not _a_number(int | bool) and not _a_number(bool)
    assert not _a_number(list[int]) and not _a_number(dict[str, int]) and not _a_number(Any)
