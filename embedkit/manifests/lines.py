"""Where a key is in a manifest's TOML text (tomllib gives no line numbers), so every error names its line."""

from __future__ import annotations

import re

from embedkit.errors import EmbedkitError

_PART = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_DOTTED = rf"{_PART}(?:\s*\.\s*{_PART})*"
_HEADER = re.compile(rf"\s*(\[\[?)\s*({_DOTTED})\s*\]")
_KEYLINE = re.compile(rf"\s*({_DOTTED})\s*=")


def _parts(dotted: str) -> tuple:
    return tuple(p[1:-1] if p[:1] in "\"'" else p for p in re.findall(_PART, dotted))


def key_lines(text: str) -> list[tuple[tuple, int]]:
    """(key path, line) for every table header and `key =` line; array-of-tables entries get their index."""
    entries, table, seen, in_string = [], (), {}, False
    for n, line in enumerate(text.splitlines(), 1):
        quotes = (line.count('"""') + line.count("'''")) % 2 == 1
        if in_string:  # inside a multi-line string: nothing here is a key
            in_string = not quotes
            continue
        m = _HEADER.match(line)
        if m:
            path = _parts(m[2])
            if m[1] == "[[":
                seen[path] = seen.get(path, -1) + 1
                path += (seen[path],)
            table = path
            entries.append((table, n))
        elif (m := _KEYLINE.match(line)):
            entries.append((table + _parts(m[1]), n))
        in_string = quotes
    return entries


def line_of(text: str, path: tuple) -> int:
    """Line of the deepest header or key that contains `path` (an inline table points at its key)."""
    best, line = -1, 1
    for p, n in key_lines(text):
        if len(p) > best and path[:len(p)] == p:
            best, line = len(p), n
    return line


def dotted(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out or "(top level)"


def key_error(file, text: str, path: tuple, problem: str) -> EmbedkitError:
    """`FILE, line N, key a.b[0].c: problem`: the one shape of every manifest error."""
    return EmbedkitError(f"{file}, line {line_of(text, path)}, key {dotted(path)}: {problem}")
