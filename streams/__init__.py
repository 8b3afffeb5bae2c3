"""Sources of raw event batches: the pure-Python Kafka read transform for Beam, bounded
replay of files and Kafka offset/time ranges, the embedded Kafka-compatible broker, and a
producer for logs. Emits ``streams.records.SourceBatch``; never imports ``trainer``."""

__all__ = ["records", "broker", "kafka_client", "kafka_source", "replay", "producer"]
