"""Fuzzing what this stop's hardening reads from users' text without a server: environment
overrides of a secret, durations, and the stored form of source checkpoint keys.

The properties: a secret given in an ``EVENTBUS_*`` variable is that text exactly (unless it
starts with ``[`` or ``{``, read as YAML); a duration is a number of seconds from 0 to ten years
or a ValueError, never NaN or infinity; and a checkpoint key of any text (NUL and ESC
included) is stored as text PostgreSQL holds and read back as itself.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eventbus._errors import ConfigError
from eventbus.config import load_settings, parse_duration
from eventbus.config._units import MAX_DURATION
from eventbus.sources._checkpoints import _key, _stored
from tests.fuzz._inputs import FUZZ

# what an environment variable can hold: any text but NUL
_ENV_TEXT = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)))


@FUZZ
@given(password=_ENV_TEXT.filter(lambda t: t != "" and t.lstrip()[:1] not in ("[", "{")))
def test_a_secret_from_the_environment_is_its_text(password: str) -> None:
    try:
        settings = load_settings(None, env={"EVENTBUS_DATABASE__PASSWORD": password})
    except ConfigError as exc:
        # refused (a line break, say) without showing it (a short one may be any word of it)
        assert len(password) < 8 or password not in str(exc)
        return
    assert settings.database.password is not None
    assert settings.database.password.reveal() == password


@FUZZ
@given(
    value=st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(),
        st.text(max_size=20),
        st.from_regex(r"\A[0-9]{1,15}(\.[0-9]{1,3})?(ms|s|m|h|d)?\Z"),
    )
)
def test_a_duration_is_a_bounded_number_of_seconds_or_refused(value: object) -> None:
    try:
        seconds = parse_duration(value)
    except ValueError:
        return
    assert math.isfinite(seconds) and 0 <= seconds <= MAX_DURATION


@FUZZ
@given(key=st.text(st.characters(blacklist_categories=("Cs",))))
def test_a_checkpoint_key_is_stored_as_text_and_read_back(key: str) -> None:
    stored = _stored(key)
    assert "\x00" not in stored
    assert _key(stored) == key


@pytest.mark.parametrize("key", ["o:a\x00b", "o:\x1b0", "o:\x1b\x1b\x00", "plain"])
def test_checkpoint_keys_that_look_escaped_read_back_as_themselves(key: str) -> None:
    assert _key(_stored(key)) == key
