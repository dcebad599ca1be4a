"""Shared test fixtures. Service fixtures (Kafka, Redis) are filled in by the foundation work."""

from __future__ import annotations
