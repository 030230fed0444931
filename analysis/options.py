"""Option values as the commands and the dashboard pages both spell them: '0,5,10-12', 'a,b,c'.

The bottom layer (stdlib and analysis.errors only), so a page validates a form field with the very
function a command uses on its option, and gets the same one-line error.
"""

from __future__ import annotations

from analysis.errors import UserError


def parse_ints(text: str | None, name: str) -> list[int] | None:
    """'0,5,10-12' -> [0, 5, 10, 11, 12]; None stays None."""
    if text is None:
        return None
    values: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            values.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    except ValueError:
        raise UserError(f"--{name} expects integers like 0,5,10-12, got {text!r}") from None
    return values


def parse_names(value: str | list[str] | tuple[str, ...]) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']; a list (a page's multiselect) is stripped the same way.

    A name with options, ``kind:key=value,key=value`` (a merge-space point), keeps its commas: an item
    ``key=value`` that follows it is glued back onto it.
    """
    parts = value.split(",") if isinstance(value, str) else value
    names: list[str] = []
    for part in (p.strip() for p in parts):
        if not part:
            continue
        if names and ":" in names[-1] and "=" in part and ":" not in part:
            names[-1] += "," + part
        else:
            names.append(part)
    return names
