"""What the platform says to a deployer: bounded text with no credential and no host path in it.

Error replies and function events reach deployers, who are untrusted. Text bound for them goes through
`Redactor.for_deployer`: credentials replaced (URL userinfo, `password=`/`token=`-style values, bearer tokens,
and the platform's own secrets wherever they appear), host paths replaced by placeholders (`<data>`, `<aube>`,
`<venv>`, `<home>`, `<cgroup>`, `<tmp>`), terminal control characters dropped, and the whole cut to a bounded
number of lines and bytes. Operator logs keep paths (they are useful there) but never a password: `Redactor.for_log`.

Pure string work; `platform_redactor` only reads where this process lives (its interpreter and sources).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

HIDDEN = "***"
MAX_MESSAGE_BYTES = 4096
MAX_MESSAGE_LINES = 40
MAX_LINE_BYTES = 1024  # one build output line in an event

# scheme://userinfo@ : everything up to the last "@" of the authority (a password may hold an unescaped "@").
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^\s/?#@]*(?:@[^\s/?#@]*)*@")
_KEY_VALUE = re.compile(
    r"(?i)(?P<key>\b[\w.-]*(?:password|passwd|passphrase|secret|token|api[_-]?key|access[_-]?key|credential)[\w-]*)"
    r"(?P<sep>\s*[=:]\s*)(?P<value>\"[^\"]*\"|'[^']*'|[^\s,;&'\"]+)"
)
_BEARER = re.compile(r"(?i)\b(?P<kind>bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}")
_CGROUP = re.compile(r"/sys/fs/cgroup(?:/[^\s'\",;:)\]]*)?")
_ROOT_HOME = re.compile(r"(?<![\w.-])/root(?=/|\b)")
# Aube's own temporary folders (Docker build contexts, pip's work area without bubblewrap): random names.
_AUBE_TMP = re.compile(r"(?<![\w.-])/(?:var/)?tmp/aube-[\w.-]+")
# ESC sequences, C0 controls other than tab and newline, C1 controls (U+009B is a one-character CSI to a terminal
# in 8-bit mode) and the bidi overrides and isolates (text shown in another order than it is): a hostile
# package's output must not drive or mislead the deployer's terminal.
_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[@-_]|[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_MIN_SECRET = 4  # shorter "secrets" would blank out ordinary words


class Redactor:
    """Replaces `secrets` (exact strings, also percent-encoded) and `paths` (path -> placeholder) in text."""

    def __init__(self, *, secrets: Iterable[str] = (), paths: Mapping[str, str] | None = None) -> None:
        found = {s for s in secrets if len(s) >= _MIN_SECRET}
        found |= {quote(s, safe="") for s in found}
        self._secrets = sorted(found, key=len, reverse=True)
        cleaned = {p.rstrip("/"): label for p, label in (paths or {}).items() if p.rstrip("/") not in ("", ".")}
        # Longest first: the data dir inside the repository is "<data>", not "<aube>/.data".
        self._paths = sorted(cleaned.items(), key=lambda item: len(item[0]), reverse=True)

    def for_log(self, text: str) -> str:
        """For the operator's log: credentials gone, everything else kept."""
        for secret in self._secrets:
            text = text.replace(secret, HIDDEN)
        text = _USERINFO.sub(lambda m: f"{m['scheme']}{HIDDEN}@", text)
        text = _KEY_VALUE.sub(lambda m: f"{m['key']}{m['sep']}{HIDDEN}", text)
        return _BEARER.sub(lambda m: f"{m['kind']} {HIDDEN}", text)

    def for_deployer(self, text: str, *, max_bytes: int = MAX_MESSAGE_BYTES, max_lines: int = MAX_MESSAGE_LINES) -> str:
        """For a reply or an event: no credential, no host path, no control character, bounded."""
        text = self.for_log(_CONTROL.sub("", text))
        for path, label in self._paths:
            text = text.replace(path, label)
        text = _CGROUP.sub("<cgroup>", text)
        text = _ROOT_HOME.sub("<home>", text)
        text = _AUBE_TMP.sub("<tmp>", text)
        return clip(text, max_bytes=max_bytes, max_lines=max_lines)


def clip(text: str, *, max_bytes: int, max_lines: int) -> str:
    """At most `max_lines` lines (the first and the last ones: a summary and where it failed) and `max_bytes`."""
    lines = text.split("\n")
    if len(lines) > max_lines:
        keep = max(max_lines - 2, 0)
        cut = len(lines) - 1 - keep
        lines = [lines[0], f"[... {cut} lines not shown ...]", *lines[len(lines) - keep :]] if keep else lines[:1]
        text = "\n".join(lines)
    data = text.encode()
    if len(data) <= max_bytes:
        return text
    tail = " [... cut]"
    return data[: max(max_bytes - len(tail), 0)].decode(errors="ignore") + tail


def url_passwords(urls: str) -> list[str]:
    """The passwords in a NATS URL setting (a comma-separated list of server URLs)."""
    found = []
    for url in urls.split(","):
        try:
            password = urlsplit(url.strip()).password
        except ValueError:
            continue
        if password:
            found += [password, unquote(password)]
    return found


def _variants(path: str) -> set[str]:
    absolute = os.path.abspath(path)
    return {path, absolute, os.path.realpath(absolute)} - {"", "/"}


def platform_redactor(*, secrets: Iterable[str], data_dir: str) -> Redactor:
    """The redactor of a control plane: its secrets, and the host paths it knows of (data dir, its own
    sources and virtualenv, the home folder)."""
    sources = str(Path(__file__).resolve().parents[1])  # the checkout (or site-packages) Aube runs from
    places = {
        data_dir: "<data>",
        sources: "<aube>",
        sys.prefix: "<venv>",
        os.path.expanduser("~"): "<home>",
    }
    paths: dict[str, str] = {}
    for path, label in places.items():
        for variant in _variants(path):
            if variant not in ("/usr", "/usr/local", "/tmp"):  # system places say nothing about this host
                paths.setdefault(variant, label)
    return Redactor(secrets=secrets, paths=paths)
