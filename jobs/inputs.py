"""Values from the command line, checked before any work: numbers written in ASCII digits, finite
and in range; and any text that goes to a message with its secrets redacted."""

from __future__ import annotations

import math
import re

from jobs.errors import ConfigError

_INTEGER = re.compile(r"[+-]?[0-9]+")  # ASCII digits only: int() also takes "١٢" and "1_000"
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")  # no nan, inf, hex or "½"


def integer(option: str, value: object, lo: int, hi: int | None = None, word: str | None = None) -> int | None:
    """``value`` (text or an int) as an integer in ``lo..hi``; None for the ``word`` (``all``, ``auto``)."""
    text = str(value).strip()
    if word is not None and text == word:
        return None
    what = f"an integer in {lo}..{hi}" if hi is not None else "a positive integer" if lo == 1 else f"an integer ≥ {lo}"
    either = f" or {word!r}" if word else ""
    if not _INTEGER.fullmatch(text) or not lo <= int(text) <= (hi if hi is not None else int(text)):
        raise ConfigError(f"{option} must be {what}{either}, not {shown_value(value)}")
    return int(text)


def number(option: str, value: object, lo: float, hi: float, lo_open: bool = True) -> float:
    """``value`` as a finite number in ``(lo, hi]`` (``[lo, hi]`` where not ``lo_open``)."""
    text = str(value).strip()
    x = float(text) if _NUMBER.fullmatch(text) else math.nan
    if not (math.isfinite(x) and (lo < x if lo_open else lo <= x) and x <= hi):
        raise ConfigError(f"{option} must be a number in {'(' if lo_open else '['}{lo:g}, {hi:g}], not {shown_value(value)}")
    return x


def shown_value(value: object, limit: int = 60) -> str:
    """A value quoted for a message, cut to ``limit`` characters."""
    text = repr(str(value))
    return text if len(text) <= limit else text[: limit - 4] + "…'"


_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@\s:]*):(?P<password>[^/@\s]*)@")
_AWS_SECRET = re.compile(r"(?i)(aws_secret_access_key|aws_session_token|secret_access_key|session_token|x-amz-security-token"
                         r"|signature)(['\"]?\s*[=:]\s*['\"]?)[^\s'\",&]+")
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


def redact(text: str) -> str:
    """``text`` with URL passwords (``scheme://user:pw@host``), AWS secret keys and session tokens
    (named in the text, or the values of this process's environment) replaced by ``***``."""
    import os

    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    text = _AWS_SECRET.sub(lambda m: f"{m[1]}{m[2]}***", text)
    for name in SECRET_ENV:
        value = os.environ.get(name, "")
        if len(value) >= 8:
            text = text.replace(value, "***")
    return text

