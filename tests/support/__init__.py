"""Test doubles that run for real on loopback (no mocks of our own components)."""
