"""Source addresses as the command line takes them (``kafka://HOST:PORT/TOPIC``, ``synthetic://?...``), and
URLs with their secrets masked for logs and errors."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

SCHEME = "kafka://"


@dataclass(frozen=True)
class KafkaUrl:
    """A broker address and one topic.

    Examples
    --------
    >>> KafkaUrl.parse("kafka://127.0.0.1:9092/images")
    KafkaUrl(bootstrap='127.0.0.1:9092', topic='images')
    """

    bootstrap: str
    topic: str

    @classmethod
    def parse(cls, url: str) -> KafkaUrl:
        """Parse ``kafka://HOST:PORT/TOPIC``.

        Raises
        ------
        ValueError
            If the scheme is not ``kafka``, the host or port is missing, or the topic is empty or not a
            single path segment.
        """
        if not is_kafka_url(url):
            raise ValueError(f"not a kafka:// URL: {url!r}")
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError as err:
            raise ValueError(f"bad port in {url!r}") from err
        if not parts.hostname or port is None:
            raise ValueError(f"kafka URL needs HOST:PORT, got {url!r}")
        topic = parts.path.lstrip("/")
        if not topic or "/" in topic or parts.query or parts.fragment:
            raise ValueError(f"kafka URL needs exactly one topic after the address, got {url!r}")
        return cls(f"{parts.hostname}:{port}", topic)

    def __str__(self) -> str:
        return f"{SCHEME}{self.bootstrap}/{self.topic}"


def is_kafka_url(text: str) -> bool:
    """Whether ``text`` names a Kafka topic rather than a file.

    >>> is_kafka_url("kafka://localhost:9092/t"), is_kafka_url("stream.rec.gz")
    (True, False)
    """
    return text.startswith(SCHEME)


@dataclass(frozen=True)
class SyntheticUrl:
    """The parameters of a :class:`~consumers.synthetic.SyntheticSource`, written as a URL query.

    ``synthetic://?records=N[&classes=K][&dim=D][&seed=S][&stream=NAME]``: ``records`` is required;
    the others default to 10 classes, 8 dimensions, seed 0 and stream ``synthetic``.

    Examples
    --------
    >>> SyntheticUrl.parse("synthetic://?records=1000&classes=4&dim=8&seed=0")
    SyntheticUrl(records=1000, classes=4, dim=8, seed=0, stream='synthetic')
    """

    records: int
    classes: int = 10
    dim: int = 8
    seed: int = 0
    stream: str = "synthetic"

    @classmethod
    def parse(cls, url: str) -> SyntheticUrl:
        """Parse ``synthetic://?records=N&...``.

        Raises
        ------
        ValueError
            If the scheme is not ``synthetic``, anything but a query is given, ``records`` is missing,
            a parameter is unknown or repeated, or a number is not an integer.
        """
        parts = urlsplit(url)
        if parts.scheme != "synthetic" or parts.netloc or parts.path or parts.fragment:
            raise ValueError(f"synthetic URL is synthetic://?records=N&..., got {url!r}")
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
        names = [name for name, _ in pairs]
        allowed = ("records", "classes", "dim", "seed", "stream")
        unknown = sorted(set(names) - set(allowed))
        if unknown or len(names) != len(set(names)):
            raise ValueError(f"synthetic URL takes each of {', '.join(allowed)} at most once, got {url!r}")
        given = dict(pairs)
        if "records" not in given:
            raise ValueError(f"synthetic URL needs records=N, got {url!r}")
        try:
            numbers = {name: int(value) for name, value in given.items() if name != "stream"}
        except ValueError as err:
            raise ValueError(f"synthetic URL parameters must be integers, got {url!r}") from err
        return cls(stream=given.get("stream", "synthetic"), **numbers)


MASK = "***"
SECRET = re.compile(r"password|secret|token", re.IGNORECASE)
"""Names (settings, URL query options) whose values are secrets."""


def mask_url(text: str) -> str:
    """``text`` with a URL's password (``user:pass@``) and secret query values (``?password=``) as ``***``.

    Text that is no URL comes back unchanged; a URL that cannot be parsed comes back as ``***`` whole.

    >>> mask_url("redis://app:hunter2@redis:6379/0?ssl_password=x&name=b")
    'redis://app:***@redis:6379/0?ssl_password=***&name=b'
    """
    if "://" not in text:
        return text
    try:
        parts = urlsplit(text)
        password = parts.password
    except ValueError:  # e.g. an unclosed IPv6 bracket: show nothing rather than a secret
        return MASK
    if password is not None:
        user = f"{parts.username}:" if parts.username else ":"
        parts = parts._replace(netloc=f"{user}{MASK}@{parts.netloc.rpartition('@')[2]}")
    if parts.query:
        query = parse_qsl(parts.query, keep_blank_values=True)
        if any(SECRET.search(k) for k, _ in query):
            masked = [(k, MASK if SECRET.search(k) else v) for k, v in query]
            parts = parts._replace(query=urlencode(masked, safe="*"))
    return urlunsplit(parts)
