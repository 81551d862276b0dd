"""Canonical schema mapping, loaders, and the synthetic CRM generator."""
