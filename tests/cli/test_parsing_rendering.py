"""Pure pieces of the CLI: argument fast path, durations, tables, times."""

from __future__ import annotations

from typing import Any

import pytest

from claudemesh.clients.cli.app import fast_parse, normalize
from claudemesh.clients.cli.errors import UsageError
from claudemesh.clients.cli.output import ago, clean, group_digits, table
from claudemesh.clients.cli.verbs.invite import parse_duration

NOW = 1_800_000_000_000


@pytest.mark.parametrize(
    ("delta_s", "text"),
    [
        (0, "just now"),
        (4, "just now"),
        (12, "12s ago"),
        (59, "59s ago"),
        (60, "1m ago"),
        (3599, "59m ago"),
        (3600, "1h ago"),
        (86399, "23h ago"),
        (86400, "1d ago"),
        (-2, "just now"),
        (-60, "in the future"),
    ],
)
def test_ago(delta_s: int, text: str) -> None:
    assert ago(NOW - delta_s * 1000, NOW) == text


def test_ago_unknown_and_old() -> None:
    assert ago(None, NOW) == "-"
    assert ago(NOW - 400 * 86400 * 1000, NOW).count("-") == 2  # a date, YYYY-MM-DD


def test_table_aligns_columns_and_counts_wide_characters() -> None:
    out = table(["A", "NAME", "X"], [["●", "bob", "1"], ["○", "日本", "22"]])
    lines = out.splitlines()
    assert lines[0] == "A  NAME  X"
    assert lines[1] == "●  bob   1"
    assert lines[2] == "○  日本  22"


def test_clean_strips_terminal_control() -> None:
    assert clean("hi\x1b[31mred\nnext") == "hi\ufffd[31mred next"


def test_group_digits() -> None:
    assert group_digits("123456789012345") == "12345 67890 12345"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("15m", 900), ("24h", 86400), ("7d", 604800), ("1h30m", 5400)],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "5y", "10m5", "0", "-5m", "h"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(UsageError):
        parse_duration(text)


def test_normalize_expands_short_workspace_before_delimiter() -> None:
    assert normalize(["peers", "-w", "team"]) == ["peers", "--workspace", "team"]
    assert normalize(["peers", "-wteam"]) == ["peers", "--workspace", "team"]
    assert normalize(["send", "bob", "--", "-w"]) == ["send", "bob", "--", "-w"]


def test_fast_parse_send() -> None:
    got = fast_parse(
        ["message", "send", "bob", "hello there", "--priority", "now", "--json", "--wait=sent"]
    )
    assert got == (
        "message:send",
        ["bob", "hello there"],
        {"priority": "now", "json": True, "wait": "sent"},
    )
    assert fast_parse(["send", "bob", "--", "-x"]) == ("message:send", ["bob", "-x"], {})
    assert fast_parse(["send", "bob", "-"]) == ("message:send", ["bob", "-"], {})
    assert fast_parse(["send", "bob", "hi", "--timeout", "2.5"]) == (
        "message:send",
        ["bob", "hi"],
        {"timeout": 2.5},
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["send", "bob"],  # missing text
        ["send", "bob", "hi", "--help"],
        ["send", "bob", "hi", "--priority", "urgent"],
        ["send", "bob", "hi", "--timeout", "soon"],
        ["send", "bob", "hi", "--wait"],
        ["peers", "extra"],
        ["peer", "list", "--json=1"],
        ["message", "inbox", "--follow"],  # streaming stays on the full parser
        ["workspace", "list"],
        [],
    ],
)
def test_fast_parse_defers_to_cyclopts(argv: list[str]) -> None:
    assert fast_parse(argv) is None


def test_fast_parse_peer_list_and_inbox() -> None:
    assert fast_parse(["peers", "--workspace", "t", "--no-start"]) == (
        "peer:list_",
        [],
        {"workspace": "t", "no_start": True},
    )
    assert fast_parse(["inbox", "--unread", "--limit", "5"]) == (
        "message:inbox",
        [],
        {"unread": True, "limit": 5},
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["message", "send", "bob", "hi there", "--priority", "now", "--json"],
        ["send", "bob", "hi", "--wait", "delivered", "--timeout", "2.5", "--id", "x"],
        ["send", "bob", "hi", "--reply-to", "m1", "--workspace", "team", "--no-start"],
        ["send", "--workspace=team", "bob", "hi"],
        ["peer", "list", "--json"],
        ["peers", "--workspace", "t"],
        ["inbox", "--unread", "--limit", "5"],
        ["message", "inbox", "--json"],
        ["message", "status", "abc", "--workspace", "t"],
    ],
)
def test_fast_path_calls_exactly_what_cyclopts_would(
    argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hand parser must never drift from the cyclopts signatures it shortcuts."""
    import functools
    import inspect

    from claudemesh.clients.cli import app
    from claudemesh.clients.cli.verbs import message, peer

    fast = fast_parse(argv)
    assert fast is not None
    target, positional, kwargs = fast
    module, _, func = target.partition(":")
    real = getattr({"message": message, "peer": peer}[module], func)

    def bound(*a: Any, **k: Any) -> dict[str, Any]:
        b = inspect.signature(real).bind(*a, **k)
        b.apply_defaults()
        return dict(b.arguments)

    seen: list[dict[str, Any]] = []

    @functools.wraps(real)  # cyclopts reads the real signature through __wrapped__
    def record(*a: Any, **k: Any) -> int:
        seen.append(bound(*a, **k))
        return 0

    monkeypatch.setattr({"message": message, "peer": peer}[module], func, record)
    assert app.build_app()(argv, exit_on_error=False, result_action="return_value") == 0
    assert seen == [bound(*positional, **kwargs)]
