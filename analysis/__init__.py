"""Offline analysis of runs: reads a run directory's Parquet query log (and summary), never Ray.

- :func:`read_run`: the query log as a pyarrow Table;
- :func:`detection_report` / :func:`detection_metrics`: AUROC, AUPR, FPR95, FPR90 per detector and attack,
  at query and account level;
- :func:`replay`: any detector over a logged stream, with other parameters or another grouping (a stateless one
  calibrated on :func:`calibration_images`);
- :func:`replication_report`: what each attacker got and paid;
- :func:`write_report`: ``report.md`` with tables and PNG figures.
The command line: ``python -m analysis RUN_DIR [RUN_DIR ...]``.
"""

from sim.errors import first_line
from sim.querylog import decode_inputs, per_account_counts, read
from sim.summary import load as read_summary

from .detection import detection_report, scored_rows
from .metrics import MetricError, detection_metrics, fpr_at_tpr
from .replay import calibration_images, replay
from .replication import replication_report
from .report import analyse, comparison, write_report


def read_run(run_dir: str, columns: list[str] | None = None):
    """The query log of a run directory as a pyarrow Table; a one-line SimError for a directory that holds none, or
    a column the log does not have."""
    import re

    import pyarrow as pa

    from sim import querylog, storage
    from sim.errors import SimError

    queries = storage.join(str(run_dir), "queries")
    if not querylog.exists(queries):
        raise SimError(f"run_dir={str(run_dir)!r} holds no query log ({queries} has none); expected the directory of "
                       f"a run (python -m sim prints it)")
    try:
        return read(queries, columns)
    except (pa.ArrowInvalid, KeyError) as exc:
        found = re.search(r"FieldRef.Name\((\w+)\)|Field \"(\w+)\" does not exist", str(exc))
        name = next((g for g in found.groups() if g), None) if found else None
        raise SimError(f"columns: the log has no column {name!r}; expected names of its columns (sim.querylog.COLUMNS "
                       f"and each detector's NAME_score, NAME_flagged, …)" if name else
                       f"columns={columns!r}: {first_line(exc)}") from None


__all__ = ["MetricError", "analyse", "calibration_images", "comparison", "decode_inputs", "detection_metrics",
           "detection_report", "fpr_at_tpr", "per_account_counts", "read", "read_run", "read_summary", "replay",
           "replication_report", "scored_rows", "write_report"]
