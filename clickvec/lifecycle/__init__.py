"""Model lifecycle: rebuild users' states offline (`backfill`), roll out a new model
without a gap (`rollout`, `cutover`), and keep each user's latest vector in Redis
(`redis_sink`)."""
