"""Seeing inside kansas: metrics, request ids, the access log, request traces."""
