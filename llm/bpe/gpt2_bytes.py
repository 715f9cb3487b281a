"""GPT-2's byte-to-unicode mapping, used by vocab.json / merges.txt.

GPT-2 stores every token as a *string*: each byte 0..255 is shown as one printable unicode
character (printable Latin-1 bytes map to themselves, the others to U+0100 onwards, e.g. a space
becomes `Ġ`). This keeps the files valid, whitespace-free text, so a merge line is simply `a b`.
"""

from __future__ import annotations


def bytes_to_unicode() -> dict[int, str]:
    """byte value -> printable character, exactly as in OpenAI's GPT-2 `encoder.py`."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)  # shift unprintable bytes past Latin-1
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


BYTE_TO_CHAR: dict[int, str] = bytes_to_unicode()
CHAR_TO_BYTE: dict[str, int] = {c: b for b, c in BYTE_TO_CHAR.items()}
_ENCODE_TABLE = {b: c for b, c in BYTE_TO_CHAR.items()}  # str.translate works on code points


def token_to_str(token: bytes) -> str:
    """bytes -> GPT-2 display string (one character per byte)."""
    # latin-1 turns byte b into code point b, which translate then maps through the table.
    return token.decode("latin-1").translate(_ENCODE_TABLE)


def str_to_token(text: str) -> bytes:
    """GPT-2 display string -> bytes; ValueError on a character outside the mapping."""
    try:
        return bytes(CHAR_TO_BYTE[c] for c in text)
    except KeyError as e:
        raise ValueError(f"character {e.args[0]!r} in token {text!r} is not in GPT-2's byte mapping") from None
