"""Parsing of the human-friendly quantities the API accepts.

`tokens: 100B`, `globalBatchTokens: 4M`, `checkpoint.interval: 30m`, and webdataset-style
brace ranges in shard URIs (`shard-{00000..01023}.tar`, expanded by braceexpand as webdataset
does). Pure functions shared by validation, the renderer and the trainer so every layer
agrees on the meaning.
"""

from __future__ import annotations

import re

from braceexpand import braceexpand

_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?[KMBGT]?$"
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(s|m|h|d))+$"
_DURATION_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_ALTERNATIVES = re.compile(r"\{[^{}]*,[^{}]*\}")


def parse_quantity(value: int | float | str) -> int:
    """`100B` -> 100_000_000_000. Decimal (SI) suffixes: K, M, B (=G), T."""
    if isinstance(value, bool):
        raise ValueError("expected an integer or a string like '4M', got a boolean")
    if isinstance(value, (int, float)):
        if value < 0 or int(value) != value:
            raise ValueError(f"expected a non-negative integer, got {value!r}")
        return int(value)
    text = str(value).strip().upper()
    if not re.match(QUANTITY_PATTERN, text):
        raise ValueError(f"{value!r} is not a quantity: use an integer or a number with K/M/B/T suffix, e.g. '4M'")
    suffix = text[-1] if text[-1] in _SUFFIX and not text[-1].isdigit() else ""
    number = text[: len(text) - len(suffix)]
    return int(round(float(number) * _SUFFIX[suffix]))


_K8S_SUFFIX = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
               "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
K8S_QUANTITY = re.compile(r"^([0-9]+(?:[.][0-9]+)?|[.][0-9]+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")


def k8s_quantity(value: str) -> float:
    """A Kubernetes resource quantity in base units: '500m' -> 0.5, '512Gi' -> 549755813888."""
    match = K8S_QUANTITY.match(str(value))
    if match is None:
        raise ValueError("not a Kubernetes quantity such as '32', '500m' or '512Gi'")
    return float(match.group(1)) * _K8S_SUFFIX[match.group(2) or ""]


def parse_duration(value: str) -> float:
    """`1h30m` -> 5400.0 seconds."""
    text = str(value).strip()
    if not re.match(DURATION_PATTERN, text):
        raise ValueError(f"{value!r} is not a duration: use e.g. '90s', '30m', '2h', '1h30m'")
    return sum(float(n) * _DURATION_UNIT[u] for n, _, u in re.findall(r"([0-9]+(\.[0-9]+)?)(s|m|h|d)", text))


def parse_interval(value: int | str) -> tuple[str, float]:
    """A checkpoint interval: an integer is steps, a string is a duration. -> ("steps"|"seconds", n)."""
    if isinstance(value, bool):
        raise ValueError("expected steps (integer) or a duration string")
    if isinstance(value, int):
        if value < 1:
            raise ValueError("a step interval must be >= 1")
        return "steps", float(value)
    if str(value).isdigit():
        return parse_interval(int(value))
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("a duration interval must be > 0")
    return "seconds", seconds


MAX_SHARDS = 1_000_000  # shards one URI may name (all its brace ranges multiplied out)
MAX_BRACE_RANGES = 8  # brace ranges in one URI


def brace_ranges(uri: str) -> list[tuple[int, int]]:
    """The `{lo..hi}` ranges of a shard URI as (lo, hi), checked (balanced, lo <= hi, at
    most MAX_BRACE_RANGES) but never expanded. Numeric ranges are the only brace form:
    `{a,b}` alternatives are refused, so what validation counts is what
    :func:`expand_braces` reads. Errors name the offending range, never the whole URI (it
    may carry more than the user meant to show)."""
    ranges = []
    for match in _BRACE.finditer(uri):
        lo_text, hi_text = match.group(1), match.group(2)
        if len(lo_text) > 18 or len(hi_text) > 18:
            raise ValueError("brace range bounds must have at most 18 digits")
        lo, hi = int(lo_text), int(hi_text)
        if lo > hi:
            raise ValueError(f"brace range {{{lo_text}..{hi_text}}} is empty: start > end")
        ranges.append((lo, hi))
    rest = _BRACE.sub("", uri)
    if _ALTERNATIVES.search(rest):
        raise ValueError("brace alternatives like {a,b} are not supported; name shards with ranges like {000..099}")
    if "{" in rest or "}" in rest:
        raise ValueError("unbalanced or malformed brace range; use {000..099}")
    if len(ranges) > MAX_BRACE_RANGES:
        raise ValueError(f"{len(ranges)} brace ranges; at most {MAX_BRACE_RANGES} per URI")
    return ranges


def count_shards(uri: str, limit: int = MAX_SHARDS) -> int:
    """How many shards a URI names: the product of its brace ranges' sizes, computed
    arithmetically (validation never expands a range). Raises ValueError past `limit`."""
    total = 1
    for lo, hi in brace_ranges(uri):
        total *= hi - lo + 1
    if total > limit:
        raise ValueError(f"brace ranges name {total} shards; at most {limit} per URI")
    return total


def expand_braces(uri: str, limit: int = MAX_SHARDS) -> list[str]:
    """The shard URIs a URI names, in order, as webdataset expands them (braceexpand:
    zero padding kept, several ranges multiply out). The URI is checked and counted first
    (`count_shards`), so an oversized or malformed one fails before any string is built;
    readers that need the shard list call this, validation never does."""
    count_shards(uri, limit)
    return list(braceexpand(uri, escape=False))  # no brace escapes: a backslash is part of a path
