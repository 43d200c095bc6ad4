"""Orchestration: the CLI, params schema, stage registry, gates and Prefect flows.

Importing this package is cheap and never imports Prefect; only `pipeline.flows` does.
"""
