"""Test support: a real daemon process, and helpers for raw socket frames."""
