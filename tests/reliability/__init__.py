"""Fault tests: processes and the broker killed and restarted mid-stream (issue 8)."""
