"""Public helpers for testing kansas and things built on it: private real servers."""
