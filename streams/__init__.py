"""Sources of raw event batches: the pure-Python Kafka read transform for Beam, bounded
replay of files and Kafka offset/time ranges, the embedded Kafka-compatible broker, and a
producer for logs. Emits ``streams.records.SourceBatch``; never imports ``trainer``.

Kafka clients sit behind one protocol (``kafka_backend``); ``backend_confluent`` is left
out of ``__all__`` because confluent-kafka is optional (``headrace[fast]``)."""

__all__ = [
    "records",
    "broker",
    "admin",
    "kafka_backend",
    "backend_kafka_python",
    "partition_reader",
    "kafka_client",
    "kafka_source",
    "offsets",
    "group_offsets",
    "logfiles",
    "replay",
    "producer",
    "synthetic",
    "config",
    "errors",
]
