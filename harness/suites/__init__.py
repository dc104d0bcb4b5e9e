"""The suites: each declares its arguments and returns rows (harness.core.suite)."""
