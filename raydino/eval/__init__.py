"""Frozen-backbone evaluation: features, probes, metrics, reports. No Ray."""
