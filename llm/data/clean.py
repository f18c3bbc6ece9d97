"""Document cleaning for `python -m llm.data.prepare`: normalisation and quality filters.

`normalize` makes equal texts equal bytes (Unicode NFC, one newline convention, no control
characters but tab and newline). `reject_reason` applies the configurable filters in a fixed order
and names the first one a document fails, so the manifest can say what was dropped and why:

- `empty`: nothing left after normalisation;
- `too_short` / `too_long`: fewer than `min_chars` / more than `max_chars` characters (0 = off);
The repetition filters judge only documents of at least `repetition_min_words` words:
- `repeated_lines`: more than `max_dup_line_fraction` of the non-empty lines repeat an earlier line
  of the same document (Gopher's duplicate-line rule; tiny Shakespeare is at 0.22: speaker names);
- `repeated_ngram`: the most frequent word bigram covers more than `max_top_bigram_fraction` of the
  document's word characters (Gopher's top-n-gram rule; spam and boilerplate repeat one phrase).
"""

from __future__ import annotations

import collections
import dataclasses
import re
import unicodedata

WORD = re.compile(r"\w+")
# C0/C1 control characters except tab and newline (\r is turned into \n first).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


@dataclasses.dataclass(frozen=True)
class CleanOptions:
    min_chars: int = 1
    max_chars: int = 0  # 0 = no limit
    max_dup_line_fraction: float = 0.3  # 1 = off
    max_top_bigram_fraction: float = 0.2  # 1 = off
    repetition_min_words: int = 50  # the repetition filters judge documents of at least this many words


REASONS = ("empty", "too_short", "too_long", "repeated_lines", "repeated_ngram")


def normalize(text: str) -> str:
    """NFC, \\r\\n and \\r -> \\n, control characters (but \\t, \\n) removed, outer whitespace stripped."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL.sub("", text).strip()


def dup_line_fraction(text: str) -> float:
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    return 1 - len(set(lines)) / len(lines) if lines else 0.0


def top_bigram_fraction(words: list[str]) -> float:
    if len(words) < 2:
        return 0.0
    (a, b), count = collections.Counter(zip(words, words[1:])).most_common(1)[0]
    if count < 2:  # nothing repeats
        return 0.0
    return count * (len(a) + len(b)) / sum(len(w) for w in words)


def reject_reason(text: str, opt: CleanOptions, words: list[str] | None = None) -> str | None:
    """The first filter `text` (already normalised) fails, or None to keep it."""
    if not text:
        return "empty"
    if len(text) < opt.min_chars:
        return "too_short"
    if opt.max_chars and len(text) > opt.max_chars:
        return "too_long"
    words = words if words is not None else WORD.findall(text.lower())
    if len(words) < opt.repetition_min_words:  # too short for repetition statistics to mean much
        return None
    if opt.max_dup_line_fraction < 1 and dup_line_fraction(text) > opt.max_dup_line_fraction:
        return "repeated_lines"
    if opt.max_top_bigram_fraction < 1 and top_bigram_fraction(words) > opt.max_top_bigram_fraction:
        return "repeated_ngram"
    return None
