"""Secrets-store adapters for lg-rotate: one module per store behind ``providers.base``."""
