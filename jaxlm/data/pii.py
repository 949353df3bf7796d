"""PII scrubbing: e-mails, IPv4/IPv6 addresses and phone numbers become ``<EMAIL>``, ``<IP>``,
``<PHONE>``; version numbers, dates and plain numbers are left alone. Every replacement is
counted per kind (the curation report's ``pii`` row).
"""

from __future__ import annotations

import collections
import ipaddress
import re

# Each pattern starts with a plain character class and checks what precedes it with a lookbehind
# *after* that first character: a leading lookbehind would make the regex engine try a full match
# at every position, which is 3-5x slower on 30 MB.
#
# E-mails are found from the '@' (a literal, which the engine scans for at C speed); the local
# part before it is then walked back by hand (see PiiScrubber._emails).
_EMAIL_AT = re.compile(
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,}(?![\w@])"
)
_LOCAL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-")
_IPV6 = re.compile(
    r"[0-9A-Fa-f:](?<![\w:.][0-9A-Fa-f:])(?:(?<=:)|[0-9A-Fa-f]{0,3}:)(?:[0-9A-Fa-f]{0,4}:){1,6}"
    r"(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{1,4})?(?![\w:]|\.\d)"
)
# Not preceded by a word char or dot, not followed by another ".digit": 3.11.7 and 1.2.3.4.5
# (versions, OIDs) are not addresses.
_IPV4 = re.compile(r"\d(?<![\w.]\d)\d{0,2}\.(?:\d{1,3}\.){2}\d{1,3}(?!\.?\d)(?!\w)")
# NANP (555-123-4567, (555) 123-4567, +1 555.123.4567) with one consistent separator, or an
# international number that starts with '+' and has space/dash separators. A date (2024-01-15)
# has the wrong digit groups; '+4294967296' (no separator) is a number, not a phone.
_PHONE = re.compile(
    r"(?<![\w+.-])(?:"
    r"(?:\+?1[ .-]?)?(?:\(\d{3}\) ?\d{3}[ .-]|\d{3}([.-])\d{3}\1)\d{4}"
    r"|\+\d{1,3}(?:[ -]\(?\d{1,4}\)?)?(?:[ -]\d{2,10}){1,4}"
    r")(?!\w|[.-]\d)"
)
# Something every phone match contains; documents without it skip the slower _PHONE scan.
_PHONE_HINT = re.compile(r"\+\d{1,3}[ (-]|\d{3}[ .-]\d{4}")


def _valid_ipv6(s: str) -> bool:
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    groups = [g for g in re.split(r"::?", s) if g]
    # Compressed forms like 1::2 are Python slices far more often than addresses.
    return "::" not in s or len(groups) >= 3 or any(len(g) >= 3 for g in groups)


def _valid_ipv4(s: str) -> bool:
    return all(int(p) <= 255 for p in s.split("."))


def _valid_phone(s: str) -> bool:
    digits = sum(c.isdigit() for c in s)
    return 10 <= digits <= 15 if not s.startswith("+") else 8 <= digits <= 15


class PiiScrubber:
    """Replaces e-mails, IPs and phone numbers with placeholders, counting each kind."""

    def __init__(self, email: bool = True, ip: bool = True, phone: bool = True) -> None:
        self.email = email
        # Order matters: IPv6 before IPv4 (mapped addresses), IPs before phones (dotted digits).
        # Each rule: kind, pattern, placeholder, validator, a cheap hint the text must contain.
        rules = [
            (ip, "ip", _IPV6, "<IP>", _valid_ipv6, lambda t: "::" in t or ":0" in t or ":f" in t),
            (ip, "ip", _IPV4, "<IP>", _valid_ipv4, lambda t: "." in t),
            (phone, "phone", _PHONE, "<PHONE>", _valid_phone, _PHONE_HINT.search),
        ]
        self.rules = [r[1:] for r in rules if r[0]]
        self.counts: dict[str, int] = collections.Counter()

    def _emails(self, text: str, counts: collections.Counter) -> str:
        out, last = [], 0
        for m in _EMAIL_AT.finditer(text):
            at = start = m.start()
            while start > last and at - start < 64 and text[start - 1] in _LOCAL_CHARS:
                start -= 1
            while start < at and not text[start].isalnum():  # local part starts alphanumeric
                start += 1
            if start == at or (start > 0 and text[start - 1] in _LOCAL_CHARS and at - start >= 64):
                continue
            out += [text[last:start], "<EMAIL>"]
            last = m.end()
            counts["email"] += 1
        if not out:
            return text
        out.append(text[last:])
        return "".join(out)

    def scrub(self, text: str) -> tuple[str, dict[str, int]]:
        """The scrubbed text and its replacements per kind; keeps no state (Beam calls this)."""
        counts: collections.Counter = collections.Counter()
        if self.email and "@" in text:
            text = self._emails(text, counts)
        for kind, pattern, placeholder, valid, hint in self.rules:
            if not hint(text):
                continue

            def repl(m: re.Match[str], kind=kind, placeholder=placeholder, valid=valid) -> str:
                if not valid(m.group(0)):
                    return m.group(0)
                counts[kind] += 1
                return placeholder

            text = pattern.sub(repl, text)
        return text, dict(counts)

    def __call__(self, text: str) -> str:
        """The scrubbed text; replacements are added to ``self.counts``."""
        text, counts = self.scrub(text)
        self.counts.update(counts)
        return text
