"""Instants for ``--start`` / ``--end``: unix seconds, RFC 3339, ``now-7d``, and the notebook's
``2023-03-30 at 16:00:00 MDT``.

Absolute dates other than RFC 3339 go to dateparser (English only, so "at" is never read as a
word of another language). A zone abbreviation is taken as the offset it names (``MDT`` is
UTC-6 whatever the date; ``MST`` is UTC-7), as the notebook's ``parse_datetime`` did. A time
without any zone is refused rather than guessed: the notebook read it as the local zone of the
machine it ran on, so the same command meant different windows on different machines.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

import dateparser

from exporter.config import check_instant, parse_duration

__all__ = ["TimeError", "format_time", "parse_time"]

#: Forms named in error messages.
FORMS = (
    "unix seconds (1680213600), RFC 3339 (2023-03-30T22:00:00Z), relative (now, now-7d, "
    "now-1h30m) or a date with a zone (2023-03-30 at 16:00:00 MDT)"
)


class TimeError(ValueError):
    """A time argument that cannot be read; the message names the text and the accepted forms."""


def parse_time(text: str, now: float) -> float:
    """Unix seconds for ``text``; ``now`` (unix seconds) anchors the relative forms.

    Accepted: a number of unix seconds; ``now``, ``now-<duration>``, ``now+<duration>``
    (Prometheus durations: ``7d``, ``1h30m``); RFC 3339 / ISO 8601 with an offset or ``Z``; any
    date dateparser reads in English that names its zone, e.g. ``2023-03-30 at 16:00:00 MDT``.
    The instant must lie between 1970 and 9999 (:func:`exporter.config.check_instant`).
    """
    seconds = _parse(text, now)
    try:
        return check_instant(seconds, text)
    except ValueError as error:
        raise TimeError(str(error)) from None


def _parse(text: str, now: float) -> float:
    raw = text.strip()
    if not raw:
        raise TimeError(f"empty time; expected {FORMS}")
    try:
        seconds = float(raw)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise TimeError(f"{text!r} is not a finite number of seconds")
        return seconds
    if raw.lower().startswith("now"):
        return _relative(text, raw[3:].strip(), now)
    moment = _iso(raw)
    if moment is None:
        moment = _dateparser(raw, now)
    if moment is None:
        raise TimeError(f"cannot read the time {text!r}; expected {FORMS}")
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise TimeError(
            f"{text!r} has no time zone; add one (Z, +02:00, UTC, MDT...) so the window does not "
            "depend on the machine's local zone"
        )
    try:
        return moment.timestamp()
    except OverflowError:  # 9999-12-31T23:00:00-01:00 is in year 10000 in UTC
        return math.inf


def _relative(text: str, rest: str, now: float) -> float:
    if not rest:
        return now
    sign = rest[0]
    if sign not in "+-":
        raise TimeError(f"cannot read the relative time {text!r}; expected now, now-7d or now+1h")
    try:
        offset = parse_duration(rest[1:].strip())
    except ValueError as error:
        raise TimeError(f"cannot read the relative time {text!r}: {error}") from None
    return now - offset if sign == "-" else now + offset


def _iso(raw: str) -> datetime | None:
    try:
        return datetime.fromisoformat(raw.replace("z", "Z"))
    except ValueError:
        return None


def _dateparser(raw: str, now: float) -> datetime | None:
    base = datetime.fromtimestamp(now, UTC).replace(tzinfo=None)
    # Default RETURN_AS_TIMEZONE_AWARE: aware exactly when the text names a zone, so a
    # zone-less text stays naive and is refused above. Setting it True would silently attach
    # the machine's zone (or TIMEZONE's), which is the notebook's bug.
    return dateparser.parse(
        raw,
        languages=["en"],
        settings={"RELATIVE_BASE": base, "PREFER_DATES_FROM": "past"},
    )


def format_time(seconds: float) -> str:
    """RFC 3339 in UTC, milliseconds only when there are any: ``2023-03-30T22:00:00Z``."""
    moment = datetime.fromtimestamp(seconds, UTC)
    if moment.microsecond:
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")
