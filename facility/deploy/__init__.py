"""Deployment tooling: the Helm chart's schema and rendering."""
