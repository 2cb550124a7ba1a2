"""Shared fixtures. Real servers (redis-server, PostgreSQL) come from kansas.testing."""
