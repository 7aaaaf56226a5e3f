"""Throwaway PostgreSQL 15 clusters for tests (with TimescaleDB preloaded when installed).

Modules: :mod:`tests.pg.availability` (is PostgreSQL or TimescaleDB installed; skip
locally, fail under ``CI=true``), :mod:`tests.pg.cluster` (:class:`~tests.pg.cluster.PgCluster`,
a cluster in a temporary directory on a free port, and its databases) and
:mod:`tests.pg.fixtures` (the pytest fixtures, declared as a plugin by ``tests/conftest.py``).
"""
