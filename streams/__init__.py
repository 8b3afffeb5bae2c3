"""Sources of raw event batches: the pure-Python Kafka read transform for Beam, bounded
replay of files and Kafka offset/time ranges, the embedded Kafka-compatible broker, and a
producer for logs. Emits ``streams.records.SourceBatch``; never imports ``trainer``."""

__all__ = [
    "records",
    "broker",
    "admin",
    "kafka_client",
    "kafka_source",
    "offsets",
    "group_offsets",
    "logfiles",
    "replay",
    "producer",
    "synthetic",
]
