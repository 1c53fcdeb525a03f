"""The Human API: its client, and the one guarded way to call it (rate limit, breaker, retries)."""
