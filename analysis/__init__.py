"""Offline analysis of a run's Parquet query log (no Ray needed)."""

from sim.querylog import decode_inputs, per_account_counts, read


def read_run(run_dir: str, columns: list[str] | None = None):
    """The query log of a run directory as a pyarrow Table."""
    from sim import storage

    return read(storage.join(run_dir, "queries"), columns)


__all__ = ["read_run", "read", "decode_inputs", "per_account_counts"]
