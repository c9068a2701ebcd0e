"""Budget and bandwidth strings people type: what parses, to what, and what is refused."""

from __future__ import annotations

import pytest

from vramkit.errors import InvalidBudgetError
from vramkit.memory.budget import format_bytes, parse_bandwidth, parse_budget

GiB = 1024**3


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("8GiB", 8 * GiB),
        ("8 GiB", 8 * GiB),
        ("8gib", 8 * GiB),
        ("7.5 GiB", int(7.5 * GiB)),
        ("8GB", 8_000_000_000),
        ("8 gb", 8_000_000_000),
        ("8G", 8 * GiB),
        ("512MiB", 512 * 1024**2),
        ("512MB", 512_000_000),
        ("1TiB", 1024**4),
        ("1024", 1024),
        ("1024B", 1024),
        ("1.5e9", 1_500_000_000),
        (8 * GiB, 8 * GiB),
        (8e9, 8_000_000_000),
        (" 16GiB ", 16 * GiB),
    ],
)
def test_sizes(value, expected):
    assert parse_budget(value) == expected


def test_percent_of_total():
    assert parse_budget("80%", total=10 * GiB) == 8 * GiB
    assert parse_budget("100%", total=1000) == 1000
    assert parse_budget("12.5 %", total=800) == 100


@pytest.mark.parametrize(
    "value",
    [
        "0",
        "0GiB",
        0,
        -1,
        "-8GiB",
        -8.0,
        "",
        "   ",
        "abc",
        "8 parsecs",
        "GiB",
        "8GiBs",
        "1e999",
        float("nan"),
        float("inf"),
        True,
        None,
        [8],
        "0.0000001B",
    ],
)
def test_refused(value):
    with pytest.raises(InvalidBudgetError) as info:
        parse_budget(value, total=10 * GiB)
    assert str(info.value)  # says what is wrong


def test_percent_needs_a_total_and_at_most_100():
    with pytest.raises(InvalidBudgetError, match="percentage"):
        parse_budget("80%")
    with pytest.raises(InvalidBudgetError, match="100%"):
        parse_budget("150%", total=GiB)
    with pytest.raises(InvalidBudgetError):
        parse_budget("0%", total=GiB)


def test_messages_name_the_problem():
    with pytest.raises(InvalidBudgetError, match="more than zero"):
        parse_budget("0GiB")
    with pytest.raises(InvalidBudgetError, match="could not parse"):
        parse_budget("eight gigs")
    with pytest.raises(InvalidBudgetError, match="unknown unit"):
        parse_budget("8 XB")


@pytest.mark.parametrize(
    ("value", "expected"),
    [("25GB/s", 25e9), ("25 GB/s", 25e9), ("25GB", 25e9), ("55.3e9", 55.3e9), (25e9, 25e9), ("1GiB/s", float(GiB))],
)
def test_bandwidth(value, expected):
    assert parse_bandwidth(value) == pytest.approx(expected)


@pytest.mark.parametrize("value", ["0GB/s", "-1GB/s", "fast", "50%", 0, -3.0, True])
def test_bandwidth_refused(value):
    with pytest.raises(InvalidBudgetError):
        parse_bandwidth(value)


def test_format_bytes():
    assert format_bytes(8 * GiB) == "8.00 GiB"
    assert format_bytes(512 * 1024**2) == "512 MiB"
