"""Default topic names."""

DEFAULT_IN_TOPIC = "clicks"
DEFAULT_OUT_TOPIC = "user-vectors"
DEFAULT_DLQ_TOPIC = "clicks-dlq"
