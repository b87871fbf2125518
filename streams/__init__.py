"""Login-event stream processor: SQS -> Kafka -> mask -> PostgreSQL."""

__version__ = "0.1.0"
