"""Red-team probes of shared/redact.py: text a hostile package (build output) or function (a crash quoted in an
error) puts in front of a deployer's terminal, through `aube events` and the CLI's error line."""

from __future__ import annotations

from aube.shared.redact import Redactor


def test_eight_bit_terminal_controls_and_bidi_overrides_are_dropped() -> None:
    """Only 7-bit ESC sequences and C0 controls were dropped: U+009B (a one-character CSI, which terminals in
    8-bit mode obey: `\\u009b2J` clears the screen) and U+009D (OSC) got through, and so did the bidi overrides
    that make a terminal show text in another order than it is (U+202E, "Trojan Source")."""
    text = "a\u009b2Jb\u009d0;title\u009cc \u202eevil\u202c \u2067x\u2069 \u0085end"
    shown = Redactor().for_deployer(text)
    assert all(not 0x80 <= ord(c) <= 0x9F for c in shown), ascii(shown)
    assert all(c not in shown for c in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"), ascii(shown)
    assert shown == "a2Jb0;titlec evil x end"


def test_a_secret_split_by_control_characters_is_still_found() -> None:
    """Controls are dropped before secrets are looked for (the defence holds)."""
    redactor = Redactor(secrets=["Sup3rSecretValue"])
    assert "Secret" not in redactor.for_deployer("x Sup3r\x1b[0mSecret\u009bValue y")
    assert "Secret" not in redactor.for_log("x Sup3rSecretValue y")


def test_text_that_is_not_a_control_survives() -> None:
    """Ordinary non-ASCII text (accents, CJK, emoji, the right-to-left letters themselves) is kept."""
    text = "café 数据 🚀 שלום"
    assert Redactor().for_deployer(text) == text
