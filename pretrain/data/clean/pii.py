"""Personal data in training text: e-mail addresses, IPv4 and IPv6 addresses and phone numbers
replaced by placeholders (`redact`).

What is caught: `name@host.tld` addresses; dotted-quad IPv4 addresses (not inside longer dotted
numbers such as 1.2.3.4.5); IPv6 addresses that Python's `ipaddress` accepts, with three groups
of hex digits or two of which one is full (`fe80::1`), so that slices (`[::2]`, `[1::2]`) are
left alone; phone numbers written with separators,
North American `(555) 123-4567` / `555-123-4567` / `555.123.4567` and international numbers
starting `+<country code>` with 7 to 15 digits in groups.
What is not: names, postal addresses, ID, card and account numbers, phone numbers written as one
run of digits or in other local formats, addresses obfuscated as `name at host dot com`, and
personal data in images or encodings. Loopback and private IPs are redacted like any other.
"""

from __future__ import annotations

import ipaddress
import re

PLACEHOLDERS = {"email": "<EMAIL>", "ip": "<IP_ADDRESS>", "phone": "<PHONE_NUMBER>"}

_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"
)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\d.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\.?\d)")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]\d{2,4}){1,4}"  # +44 20 7946 0958
    r"|\(\d{3}\)[ ]?\d{3}[ .-]\d{4}"  # (555) 123-4567
    r"|\d{3}([.-])\d{3}\1\d{4}"  # 555-123-4567, 555.123.4567
    r")(?![\w])"
)


def _ipv6(match: re.Match[str]) -> bool:
    s = match.group(0)
    groups = [g for g in s.split(":") if g]
    # Three groups, or two with a full one (fe80::1): a slice such as [1::2] or [10::20] is not.
    if len(groups) < 2 or (len(groups) == 2 and max(map(len, groups)) < 4):
        return False
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return True


def _phone(match: re.Match[str]) -> bool:
    digits = sum(c.isdigit() for c in match.group(0))
    return 7 <= digits <= 15


def redact(text: str) -> tuple[str, dict[str, int]]:
    """(text with each e-mail, IP address and phone number replaced by its placeholder, the
    number of replacements of each kind)."""
    counts = {"email": 0, "ip": 0, "phone": 0}

    def sub(kind: str, pattern: re.Pattern[str], text: str, keep: object = None) -> str:
        def one(m: re.Match[str]) -> str:
            if keep is not None and not keep(m):  # type: ignore[operator]
                return m.group(0)
            counts[kind] += 1
            return PLACEHOLDERS[kind]

        return pattern.sub(one, text)

    if "@" in text:
        text = sub("email", _EMAIL, text)
    text = sub("ip", _IPV4, text)
    if "::" in text or text.count(":") >= 7:
        text = sub("ip", _IPV6, text, _ipv6)
    text = sub("phone", _PHONE, text, _phone)
    return text, counts
