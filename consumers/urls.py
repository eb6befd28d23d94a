"""``kafka://HOST:PORT/TOPIC`` addresses, as the command line takes them."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

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
