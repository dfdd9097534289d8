"""Compatibility package for the original ``safeagent-exec-guard`` quickstart.

Importing ``settlement.settlement_requests`` first thing in a new process works (the
original package failed here with a circular import).
"""
