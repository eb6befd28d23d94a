"""Path (c) once per Kafka client: ``c`` consumes through kafka-python (the default), ``c-librdkafka`` through
confluent-kafka (librdkafka), on the same topic, broker, Redis and settings, so the two differ only in the client.
"""

from __future__ import annotations

import importlib.util

PATHS = {"c": "kafka-python", "c-librdkafka": "librdkafka"}
"""Path name -> the ``--kafka-client`` it runs with."""

LABELS = {"c-librdkafka": "(c) with the librdkafka client (confluent-kafka)"}

NOTE = (
    "(c-librdkafka) is (c) with `--kafka-client librdkafka`: KafkaSource over confluent-kafka (librdkafka) instead "
    "of kafka-python, same topic, broker, Redis and settings; it runs when confluent-kafka is installed."
)


def client_paths() -> dict[str, str]:
    """The (c) paths this installation can run: ``c-librdkafka`` only where confluent-kafka is installed."""
    if importlib.util.find_spec("confluent_kafka") is None:
        return {"c": PATHS["c"]}
    return dict(PATHS)
