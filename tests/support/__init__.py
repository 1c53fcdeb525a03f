"""Helpers the tests share, one concern per module: env (paths, credentials, waiting),
servers (Redis, PostgreSQL, a TCP proxy), processes (the Procfile's), traffic (bursts),
scan (reading state back, and the one scan for secrets) and chaos (the chaos harness)."""
