"""HTTP-date (RFC 9110 §5.6.7): format as IMF-fixdate, parse all three historic forms.

    IMF-fixdate = day-name "," SP date1 SP time-of-day SP GMT   ; Sun, 06 Nov 1994 08:49:37 GMT
    rfc850-date = day-name-l "," SP date2 SP time-of-day SP GMT ; Sunday, 06-Nov-94 08:49:37 GMT
    asctime-date = day-name SP date3 SP time-of-day SP year     ; Sun Nov  6 08:49:37 1994

Parsing is strict and byte-positional (no regex, no str round trip): names and "GMT" are
case-sensitive as the grammar says, digits are ASCII only (``bytes.isdigit``), fields are range
checked. The day name must be a valid name but is not checked against the date: it carries no
information and nginx ignores it too.
"""

from __future__ import annotations

import calendar
import time

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

_DAY_NAMES = frozenset(d.encode() for d in _DAYS)
_DAY_NAMES_LONG = frozenset(
    d.encode()
    for d in ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
)
_MONTH_NUM = {m.encode(): i for i, m in enumerate(_MONTHS, 1)}


def format(ts: float) -> str:
    """IMF-fixdate for a POSIX timestamp, e.g. ``Sun, 06 Nov 1994 08:49:37 GMT``."""
    t = time.gmtime(ts)
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year:04d} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
    )


def parse(value: bytes) -> float | None:
    """POSIX timestamp of an HTTP-date, or None if ``value`` is not exactly one."""
    n = len(value)
    if n == 29 and value[3:5] == b", ":
        if value[:3] not in _DAY_NAMES or value[25:] != b" GMT":
            return None
        if value[7:8] != b" " or value[11:12] != b" " or value[16:17] != b" ":
            return None
        return _build(value[12:16], value[8:11], value[5:7], value[17:25])
    if n == 24 and value[3:4] == b" ":
        if value[:3] not in _DAY_NAMES or value[7:8] != b" " or value[10:11] != b" ":
            return None
        if value[19:20] != b" ":
            return None
        day = value[8:10]
        if day[:1] == b" ":  # asctime pads the day with a space, not a zero
            day = day[1:]
        return _build(value[20:24], value[4:7], day, value[11:19])
    comma = value.find(b", ")
    if comma > 0 and value[:comma] in _DAY_NAMES_LONG:
        rest = value[comma + 2 :]
        if len(rest) != 22 or rest[2:3] != b"-" or rest[6:7] != b"-" or rest[9:10] != b" ":
            return None
        if rest[18:] != b" GMT":
            return None
        yy = rest[7:9]
        if not yy.isdigit():
            return None
        return _build(_century(int(yy)), rest[3:6], rest[:2], rest[10:18])
    return None


def _century(yy: int) -> bytes:
    # RFC 9110: a two-digit year more than 50 years in the future is in the past century.
    this_year = time.gmtime().tm_year
    year = this_year - this_year % 100 + yy
    if year > this_year + 50:
        year -= 100
    return b"%04d" % year


def _build(year: bytes, month: bytes, day: bytes, hms: bytes) -> float | None:
    mon = _MONTH_NUM.get(month)
    if mon is None or len(year) != 4 or not year.isdigit() or not day.isdigit():
        return None
    if len(hms) != 8 or hms[2:3] != b":" or hms[5:6] != b":":
        return None
    hh, mm, ss = hms[:2], hms[3:5], hms[6:]
    if not (hh.isdigit() and mm.isdigit() and ss.isdigit()):
        return None
    y, d, h, m, s = int(year), int(day), int(hh), int(mm), int(ss)
    # Second 60 is allowed: the grammar admits leap seconds.
    if y < 1 or h > 23 or m > 59 or s > 60 or not 1 <= d <= calendar.monthrange(y, mon)[1]:
        return None
    return float(calendar.timegm((y, mon, d, h, m, s, 0, 0, 0)))
