from __future__ import annotations

from datetime import timedelta

import pytest

from tbot_py.config.duration import InvalidDurationError, format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1h", timedelta(hours=1)),
        ("20m", timedelta(minutes=20)),
        ("90s", timedelta(seconds=90)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("1.5h", timedelta(hours=1, minutes=30)),
        ("500ms", timedelta(milliseconds=500)),
        ("1m30.5s", timedelta(minutes=1, seconds=30.5)),
        ("2h45m10s", timedelta(hours=2, minutes=45, seconds=10)),
        ("10us", timedelta(microseconds=10)),
        ("10\u00b5s", timedelta(microseconds=10)),
        ("1500ns", timedelta(microseconds=1)),
        (".5m", timedelta(seconds=30)),
        ("+5m", timedelta(minutes=5)),
        ("0", timedelta(0)),
        ("0s", timedelta(0)),
        ("24h", timedelta(days=1)),
    ],
)
def test_parse_duration_accepts_go_syntax(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "1", "20x", "h", "1hm", "1 h", "1d", ".", "1.2.3s", "m1"])
def test_parse_duration_rejects_malformed_text_with_a_syntax_hint(text: str) -> None:
    with pytest.raises(InvalidDurationError, match="use Go syntax such as 30s, 20m, 1h"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["-5m", "-1h30m", "-0s"])
def test_parse_duration_rejects_negative_durations(text: str) -> None:
    with pytest.raises(InvalidDurationError, match="must not be negative"):
        parse_duration(text)


def test_parse_duration_rejects_values_beyond_go_range() -> None:
    with pytest.raises(InvalidDurationError, match="out of range"):
        parse_duration("3000000h")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (timedelta(hours=1), "1h"),
        (timedelta(minutes=20), "20m"),
        (timedelta(hours=1, minutes=30), "1h30m"),
        (timedelta(seconds=90), "1m30s"),
        (timedelta(hours=1, seconds=5), "1h5s"),
        (timedelta(milliseconds=500), "500ms"),
        (timedelta(microseconds=15), "15us"),
        (timedelta(seconds=1.5), "1.5s"),
        (timedelta(days=2), "48h"),
        (timedelta(0), "0s"),
        (timedelta(minutes=-5), "-5m"),
    ],
)
def test_format_duration_writes_compact_go_syntax(value: timedelta, expected: str) -> None:
    assert format_duration(value) == expected


@pytest.mark.parametrize(
    "value",
    [timedelta(hours=26, minutes=3, seconds=7.25), timedelta(microseconds=1), timedelta(days=9)],
)
def test_format_then_parse_is_identity(value: timedelta) -> None:
    assert parse_duration(format_duration(value)) == value
