"""Connector files: every file of the directory is read, every source and target is validated
by its registered type's spec, and every problem is reported with file, line and connector, all
at once."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any, Self

import orjson
import pytest

# Importing the two packages registers the built-in source and target types.
import eventbus.sources  # noqa: F401
from eventbus._errors import ConfigError
from eventbus.config import TargetSpec, load_connectors, load_yaml
from eventbus.targets import (
    HttpTargetSpec,
    KafkaTargetSpec,
    Outcome,
    build_target,
    register_target,
)


def test_connectors_load_every_file(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "targets:\n  - {name: fn, type: http, url: 'http://127.0.0.1:1/', timeout: 2s}\n"
    )
    (tmp_path / "b.yml").write_text(
        "targets:\n  - {name: k, type: kafka, bootstrap_servers: 'h:9092', topic: t}\n"
        "sources:\n  - {name: tick, type: timer, schedule: 'rate(1 minute)'}\n"
    )
    (tmp_path / "notes.txt").write_text("ignored")
    c = load_connectors(tmp_path)
    assert isinstance(c.targets["fn"], HttpTargetSpec) and c.targets["fn"].timeout == 2.0
    assert isinstance(c.targets["k"], KafkaTargetSpec)
    assert c.sources["tick"].schedule == "rate(1 minute)"  # type: ignore[attr-defined]
    assert c.sources["tick"].type == "timer"
    assert load_connectors(tmp_path / "missing").targets == {}


def test_bad_connectors_are_all_reported(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "targets:\n"
        "  - name: fn\n"
        "    type: http\n"
        "    url: ftp://nope\n"
        "  - name: fn\n"
        "    type: nats\n"
        "    url: nats://x\n"
        "    subject: s\n"
        "  - name: q\n"
        "    type: carrier-pigeon\n"
    )
    (tmp_path / "b.yaml").write_text("targets: [\n")
    (tmp_path / "c.yaml").write_text("sources:\n  - {type: timer}\nextra: 1\n")
    # an entry that is not a mapping, then one with a bad value: both (the first hid the rest)
    (tmp_path / "d.yaml").write_text(
        "sources:\n  - just-a-string\n  - name: b\n    type: timer\n    schedule: bad\n"
    )
    with pytest.raises(ConfigError) as info:
        load_connectors(tmp_path)
    lines = str(info.value).replace(str(tmp_path) + "/", "").splitlines()
    assert any(line.startswith("a.yaml:4: targets.0.url") for line in lines), lines
    assert any("a.yaml:10" in line and "carrier-pigeon" in line for line in lines), lines
    assert "b.yaml:2: invalid YAML" in "\n".join(lines) or any("b.yaml" in x for x in lines)
    assert any(line.startswith("c.yaml:3: extra: Extra inputs") for line in lines), lines
    assert any(line.startswith("c.yaml:2: sources.0") for line in lines), lines
    assert any(line.startswith("d.yaml:2: sources.0: Input should be a valid") for line in lines)
    assert any(line.startswith("d.yaml:5: sources.1.schedule") for line in lines), lines
    # the duplicate 'fn' too, the first one invalid (it came in a second round, once fixed)
    assert any(line.startswith("a.yaml:5: target 'fn': duplicate name") for line in lines), lines


def test_a_target_url_comes_from_the_environment_or_its_default(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "targets:\n"
        "  - name: fn\n"
        "    type: http\n"
        "    url: {env: FN_URL, default: 'http://127.0.0.1:9000/fn'}\n"
        "  - name: bus\n"
        "    type: nats\n"
        "    subject: s\n"
        "    url: {env: BUS_URL}\n"
    )

    def urls(env: dict[str, str]) -> tuple[str, str]:
        targets = load_connectors(tmp_path, env=env).targets
        return targets["fn"].url, targets["bus"].url  # type: ignore[union-attr]

    assert urls({"BUS_URL": "nats://n:4222"}) == ("http://127.0.0.1:9000/fn", "nats://n:4222")
    assert urls({"BUS_URL": "nats://n:4222", "FN_URL": "https://fn.example/x"}) == (
        "https://fn.example/x",
        "nats://n:4222",
    )
    # set but empty counts as unset, as the shell's ${FN_URL:-default}
    assert urls({"BUS_URL": "nats://n:4222", "FN_URL": ""})[0] == "http://127.0.0.1:9000/fn"
    with pytest.raises(ConfigError) as info:
        load_connectors(tmp_path, env={"FN_URL": "ftp://nope"})
    lines = str(info.value).replace(str(tmp_path) + "/", "").splitlines()
    assert lines == [
        "a.yaml:4: targets.0.url: String should match pattern '^https?://' (target 'fn')",
        "a.yaml:8: targets.1.url: environment variable BUS_URL is not set and no default "
        "is given (target 'bus')",
    ]


def test_a_malformed_url_from_the_environment_is_refused_with_its_line(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "targets:\n"
        "  - {name: a, type: http, url: {env: A, fallback: 'http://x/'}}\n"
        "  - {name: b, type: http, url: {env: 'not a name'}}\n"
        "  - {name: c, type: http, url: {env: C, default: 9000}}\n"
        "  - {name: d, type: http, url: {file: /run/url}}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_connectors(tmp_path, env={})
    lines = str(info.value).replace(str(tmp_path) + "/", "").splitlines()
    assert lines == [
        "a.yaml:2: targets.0.url: unknown key 'fallback'; write a string, {env: NAME}, "
        "{env: NAME, default: VALUE} or {file: /path} (target 'a')",
        "a.yaml:3: targets.1.url: 'not a name' is not an environment variable name (target 'b')",
        "a.yaml:4: targets.2.url: the default of C must be a string (target 'c')",
        "a.yaml:5: targets.3.url: cannot read /run/url: No such file or directory (target 'd')",
    ]


def _problems(tmp_path: Path, text: str) -> list[str]:
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError) as info:
        load_connectors(tmp_path)
    return str(info.value).replace(str(tmp_path) + "/", "").splitlines()


# One bad setting of each source type's own, last in its entry: (type, settings, bad field).
BAD_SOURCES = [
    ("directory", {"path": "/tmp", "interval": 0}, "interval"),
    ("s3-poll", {"bucket": "b", "region": "r", "prefix": "p", "interval": "often"}, "interval"),
    ("log-tail", {"path": "/var/log/x.log", "start_at": "middle"}, "start_at"),
    ("syslog", {"host": "127.0.0.1", "port": 70000}, "port"),
    ("timer", {"schedule": "rate(1 minute)", "missed": "never"}, "missed"),
    ("kafka", {"bootstrap_servers": "h:9092", "topics": ["t"], "start": "middle"}, "start"),
    ("rabbitmq", {"queue": "q", "url": "http://h"}, "url"),
    ("mqtt", {"topics": ["a"], "port": 0}, "port"),
    ("mqtt", {"topics": ["a/#/b"]}, "topics"),  # the client refused it at each subscribe
    ("mqtt", {"topics": ["a/b+"]}, "topics"),
    ("nats", {"subjects": ["a"], "url": "http://h:4222"}, "url"),
    ("jetstream", {"url": "nats://h:4222", "stream": "S", "batch": 0}, "batch"),
]


@pytest.mark.parametrize(("type_name", "settings", "field"), BAD_SOURCES)
def test_a_source_types_bad_setting_is_reported_with_file_and_line(
    tmp_path: Path, type_name: str, settings: dict[str, Any], field: str
) -> None:
    lines = ["sources:", "  - name: good", "    type: timer", "    schedule: 'rate(5 minutes)'"]
    lines += ["  - name: bad", f"    type: {type_name}"]
    lines += [f"    {key}: {value!r}" for key, value in settings.items()]
    problems = _problems(tmp_path, "\n".join(lines) + "\n")
    # the bad field is on the last line; the good source is not mentioned
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"c.yaml:{len(lines)}: sources.1.{field}: "), problems
    assert problems[0].endswith("(source 'bad')"), problems


def test_a_source_without_its_required_setting_points_at_the_entry(tmp_path: Path) -> None:
    problems = _problems(tmp_path, "sources:\n  - name: drop\n    type: directory\n")
    assert problems == ["c.yaml:2: sources.0.path: Field required (source 'drop')"]


def test_an_unknown_type_names_the_line_and_lists_the_registered_types(tmp_path: Path) -> None:
    problems = _problems(
        tmp_path,
        "targets:\n  - name: q\n    type: carrier-pigeon\n"
        "sources:\n  - name: s\n    type: telepathy\n",
    )
    target, source = sorted(problems)
    assert target.startswith("c.yaml:3: targets.0.type: unknown target type 'carrier-pigeon'")
    assert all(known in target for known in ("known: ", "http", "kafka", "nats"))
    assert target.endswith("(target 'q')")
    assert source.startswith("c.yaml:6: sources.0.type: unknown source type 'telepathy'")
    for known in ("directory", "jetstream", "kafka", "log-tail", "mqtt", "nats", "rabbitmq"):
        assert known in source
    assert "s3-poll" in source and "syslog" in source and "timer" in source


def test_duplicate_names_are_reported_per_kind(tmp_path: Path) -> None:
    problems = _problems(
        tmp_path,
        "targets:\n"
        "  - {name: same, type: http, url: 'http://127.0.0.1:1/'}\n"
        "  - {name: same, type: nats, url: 'nats://127.0.0.1:1', subject: s}\n"
        "sources:\n"
        "  - {name: same, type: timer, schedule: 'rate(1 minute)'}\n"
        "  - {name: same, type: directory, path: /tmp}\n",
    )
    assert problems == [
        "c.yaml:3: target 'same': duplicate name (first at c.yaml:2)",
        "c.yaml:6: source 'same': duplicate name (first at c.yaml:5)",
    ]


# --- a target type registered by a test, from YAML to a delivery ------------------------------


class _MemorySpec(TargetSpec):
    """``type: test-memory``: keeps what it is given, tagged with ``label``."""

    label: str
    timeout: float = 1.0


class _MemoryTarget:
    delivered: list[tuple[str, Any]] = []

    def __init__(self, spec: _MemorySpec) -> None:
        self.name = spec.name
        self.spec = spec

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pass

    async def deliver(
        self, event: dict[str, Any], payload: Any, *, is_cloudevent: bool, attempt: int
    ) -> Outcome:
        self.delivered.append((self.spec.label, payload))
        return Outcome(
            delivered=True,
            status=None,
            duration_ms=0.0,
            error=None,
            retryable=False,
            retry_after=None,
        )


register_target("test-memory", _MemorySpec, _MemoryTarget)


async def test_a_registered_target_type_is_loaded_and_built_from_yaml(tmp_path: Path) -> None:
    (tmp_path / "t.yaml").write_text(
        "targets:\n  - name: mem\n    type: test-memory\n    label: blue\n"
        "    delivery: {retry: none}\n"
    )
    spec = load_connectors(tmp_path).targets["mem"]
    assert isinstance(spec, _MemorySpec) and spec.type == "test-memory"
    assert spec.delivery == {"retry": "none"} and spec.timeout == 1.0
    async with build_target(spec) as target:
        outcome = await target.deliver({"id": "1"}, {"n": 1}, is_cloudevent=False, attempt=1)
    assert outcome.delivered
    assert _MemoryTarget.delivered == [("blue", {"n": 1})]


def test_a_registered_target_types_settings_are_checked_with_file_and_line(
    tmp_path: Path,
) -> None:
    problems = _problems(
        tmp_path, "targets:\n  - name: mem\n    type: test-memory\n    lable: blue\n"
    )
    assert sorted(problems) == [
        "c.yaml:2: targets.0.label: Field required (target 'mem')",
        # the closest key of the type's own, as rules have it ("timout" got no hint)
        "c.yaml:4: targets.0.lable: Extra inputs are not permitted (did you mean 'label'?) "
        "(target 'mem')",
    ]


def test_a_target_type_cannot_be_registered_twice() -> None:
    class Again(TargetSpec):
        pass

    with pytest.raises(ValueError, match="target type 'test-memory' is already registered"):
        register_target("test-memory", Again, _MemoryTarget)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already registered as target type 'test-memory'"):
        register_target("test-memory-2", _MemorySpec, _MemoryTarget)


def test_credentials_in_a_target_url_are_refused_naming_the_line(tmp_path: Path) -> None:
    # They were never sent (the request is built from host and path): a 401 and no reason.
    (tmp_path / "a.yaml").write_text(
        "targets:\n  - name: fn\n    type: http\n    url: 'http://alice:s3cret@127.0.0.1:1/hook'\n"
    )
    with pytest.raises(ConfigError, match=r"a\.yaml:4.*credentials in the url") as info:
        load_connectors(tmp_path)
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: " + "[" * 50_000 + "]" * 50_000, "c.yaml:1: invalid YAML: nested too deep"),
        ("a:\n" + "".join(" " * i + "- \n" for i in range(1, 900)), "nested"),
        (
            "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
            + "".join(
                f"b{i}: &b{i} [{', '.join(['*' + ('a' if i == 0 else f'b{i - 1}')] * 10)}]\n"
                for i in range(6)
            ),
            "aliases repeat more than 100,000 values",
        ),
    ],
    ids=["flow", "block", "aliases"],
)
def test_a_file_nested_too_deep_or_aliased_too_often_is_an_error(text: str, message: str) -> None:
    # every user file: RecursionError, a crash in libyaml, or gigabytes before
    with pytest.raises(ConfigError, match=message):
        load_yaml(text, "c.yaml")


def test_delivery_problems_come_with_the_others_each_on_its_line(tmp_path: Path) -> None:
    # They came in a second round, once the rest was right, on the line of the target's name.
    import eventbus.delivery  # noqa: F401  (registers the delivery check, as the service does)

    (tmp_path / "a.yaml").write_text(
        "targets:\n"
        "  - name: fn\n"
        "    type: http\n"
        "    url: ftp://nope\n"
        "  - name: b\n"
        "    type: http\n"
        "    url: http://127.0.0.1:9/\n"
        "    delivery:\n"
        "      retry: {initial_delay: 10s, max_delay: 1s}\n"
        "      circuit_breaker:\n"
        "        failures: 0\n"
        "      rate_limit: -1\n"
    )
    with pytest.raises(ConfigError) as info:
        load_connectors(tmp_path)
    lines = sorted(str(info.value).replace(str(tmp_path) + "/", "").splitlines())
    assert [line.split(": ")[0:2] for line in lines] == [
        ["a.yaml:11", "targets.1.delivery.circuit_breaker.failures"],
        ["a.yaml:12", "targets.1.delivery.rate_limit"],
        ["a.yaml:4", "targets.0.url"],
        ["a.yaml:9", "targets.1.delivery.retry"],
    ], lines
    assert all(line.endswith(("(target 'b')", "(target 'fn')")) for line in lines), lines


@pytest.mark.parametrize("name", ["X Bad", "X-A: x\tX-B", "", "Ümlaut", "X-A\r"])
def test_a_header_name_http_cannot_carry_is_refused_with_its_line(
    tmp_path: Path, name: str
) -> None:
    # It went out as written: "X Bad" had every delivery refused by the function (a 400,
    # dead-lettered), "X-A: x<TAB>X-B" sent a header the file did not name.
    (tmp_path / "t.yaml").write_text(
        "targets:\n"
        "  - name: fn\n"
        "    type: http\n"
        "    url: http://127.0.0.1:1/x\n"
        "    headers:\n"
        "      X-Team: billing\n"
        f"      {orjson.dumps(name).decode()}: v\n"
    )
    with pytest.raises(ConfigError) as info:
        load_connectors(tmp_path)
    message = str(info.value).replace(str(tmp_path) + "/", "")
    assert message.startswith("t.yaml:5: targets.0.headers: "), message
    assert "not a header name" in message and "(target 'fn')" in message, message


def test_an_integer_python_will_not_read_is_refused_with_its_line(tmp_path: Path) -> None:
    # Python reads at most 4,300 digits into an int: a ValueError out of the load, no line
    (tmp_path / "c.yaml").write_text(
        "targets:\n  - name: fn\n    type: http\n    url: 'http://127.0.0.1:1/'\n"
        f"    timeout: {'9' * 5000}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_connectors(tmp_path)
    message = str(info.value).replace(str(tmp_path) + "/", "")
    assert message == "c.yaml:5: an integer of more than 4,300 digits (quote it for text)"


def test_true_for_a_number_is_refused_with_its_line(tmp_path: Path) -> None:
    # pydantic took true for 1: a timeout of 1 s, one catch-up tick, a log tail's batches of
    # one line (a nested block's numbers too)
    (tmp_path / "c.yaml").write_text(
        "targets:\n"
        "  - {name: fn, type: http, url: 'http://127.0.0.1:1/', timeout: true}\n"
        "sources:\n"
        "  - {name: t, type: timer, schedule: 'rate(1 minute)', max_catch_up: yes}\n"
        "  - {name: l, type: log-tail, path: /x/*.log, batch: {max_lines: yes}}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_connectors(tmp_path)
    assert str(info.value).replace(str(tmp_path) + "/", "").splitlines() == [
        "c.yaml:2: targets.0.timeout: Value error, a number, not true or false (target 'fn')",
        "c.yaml:4: sources.0.max_catch_up: Value error, a number, not true or false (source 't')",
        "c.yaml:5: sources.1.batch.max_lines: Value error, a number, not true or false "
        "(source 'l')",
    ]
