"""The papers' claims beside this project's measurements: the replication report's one schema, one vocabulary of
verdicts, and its table. Pure (no runs, no Ray): ``benchmarks/replicate.py`` measures the cells and judges each
claim; :func:`build` turns the claims and the measured cells into rows, :func:`markdown` into the table.

A row: the claim and its paper, the paper's value, ours in the clean (default) modes, ours in the reference mode
that reproduces the paper's code where one exists, the tolerance the verdict used, the verdict, one line of why,
and the settings (where and at what budget it was measured)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Protocol

VERDICTS = ("holds", "does not hold", "cannot be tested here")
NO_REFERENCE = "no reference mode"


@dataclass(frozen=True)
class Finding:
    """What a claim's judge concludes from the measured cells."""

    clean: str  # ours, in the default modes
    verdict: str
    why: str
    reference: str = NO_REFERENCE  # ours in the reference mode

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict={self.verdict!r}; expected one of: {', '.join(VERDICTS)}")
        if not self.why.strip():
            raise ValueError("a finding needs a reason (why), however short")


@dataclass(frozen=True)
class Row:
    id: str
    paper: str
    claim: str
    paper_value: str
    clean: str
    reference: str
    tolerance: str
    verdict: str
    why: str
    settings: str

    def as_dict(self) -> dict:
        return asdict(self)


class ClaimLike(Protocol):  # what build() reads of a claim (benchmarks/replicate.py's Claim)
    id: str
    paper: str
    statement: str
    paper_value: str
    tolerance: str
    settings: str
    judge: Callable[[dict], Finding]

    def needs(self) -> list[str]:
        """The labels of the cells the judge reads."""


def build(claims: Iterable[ClaimLike], cells: dict) -> list[Row]:
    """One row per claim: judged from ``cells`` (label -> measurement) once every cell it needs is there;
    otherwise "cannot be tested here" naming the cells not yet measured (no verdict on half the evidence)."""
    rows = []
    for c in claims:
        missing = [label for label in c.needs() if not cells.get(label)]
        if missing:
            f = Finding("not measured", "cannot be tested here", f"not yet measured: {', '.join(missing)}",
                        reference="not measured")
        else:
            f = c.judge(cells)
            if not isinstance(f, Finding):
                raise TypeError(f"claim {c.id}: its judge returned {type(f).__name__}; expected a Finding")
        rows.append(Row(c.id, c.paper, c.statement, c.paper_value, f.clean, f.reference, c.tolerance, f.verdict,
                        f.why, c.settings))
    return rows


def within(paper: float, ours: float | None, tolerance: float) -> bool:
    """Whether ``ours`` is measured and within ``tolerance`` of ``paper`` (same units)."""
    return ours is not None and abs(ours - paper) <= tolerance


def compare(paper: dict[str, float], ours: dict[str, float | None], tolerance: float) -> tuple[list[str], str]:
    """The keys of ``paper`` whose measured value lies within ``tolerance``, and "k1 ours, k2 ours, …" in the
    paper's order ("–" where not measured); values in the paper's units."""
    close = [k for k in paper if within(paper[k], ours.get(k), tolerance)]
    text = ", ".join(f"{k} {'–' if ours.get(k) is None else format(ours[k], '.1f')}" for k in paper)
    return close, text


def default_replica_epochs(budget: int, variant: str = "default") -> int:
    """How many epochs a benchmarks/attacks.py replica trains unless told: the MAD code's 100 in its reference mode,
    else 20 up to 10,000 queries and 10 above."""
    if variant == "mad_code":
        return 100
    return 20 if budget <= 10_000 else 10


def attack_key(dataset: str, attack: str, budget: int, seed: int = 0, variant: str = "default",
               without: Iterable[str] = (), replica: str | None = None, clean: Iterable[str] = (),
               epochs: int | None = None, pool_size: int | None = None, pool: str | None = None) -> tuple:
    """What identifies a benchmarks/attacks.py cell: dataset, attack, budget, seed, variant, the quirks it turned off,
    the replica's variant where it differs from the attack's (else None), the code's settings left at the clean
    values, the replica's epochs (None: :func:`default_replica_epochs`), so that a longer schedule is measured
    beside a shorter one, not in its place, Knockoff's pool size (None: the whole pool) and its pool (None: the
    benchmark's own for the dataset)."""
    epochs = epochs or default_replica_epochs(budget, replica or variant)
    return (dataset, attack, budget, seed, variant, tuple(without), replica, tuple(clean), epochs, pool_size, pool)


def attack_cell_key(cell: dict) -> tuple:
    """:func:`attack_key` of a measured cell, as benchmarks/attacks.py stores it."""
    return attack_key(cell["dataset"], cell["attack"], cell["budget"], cell.get("seed", 0),
                      cell.get("variant", "default"), cell.get("without", ()), cell.get("replica_variant"),
                      cell.get("clean_settings", ()), cell.get("replica_epochs"), cell.get("pool_size"),
                      cell.get("pool"))


def same_entry(variant: str = "default", without: Iterable[str] = (), mae: str = "cpu") -> str:
    """The benchmarks/detection.py results entry of the SAME table in ``variant`` with the code's ``without``
    choices turned off and its MAE of size ``mae``: ``same``, ``same_code``, ``same_code_without_<choice>...``
    (choices sorted), ``same_code_mae_<size>`` (a size other than the CPU one)."""
    if variant == "default":
        return "same"
    return "same_code" + (f"_mae_{mae}" if mae != "cpu" else "") + "".join(f"_without_{w}" for w in sorted(without))


# SAME's reference mode by MAE size (benchmarks/detection.py --mae), smallest first: the same_detection scenario's
# overrides per size, over this project's default MAE (patch 4, width 64, 3 + 1 blocks, 100 epochs)
MAE_SIZES = {"cpu": ["detectors.same.warmup=10"],
             # the authors' patch on the CPU size: 196 tokens where patch 4 has 49 (about 20 minutes on 2 cores)
             "patch2": ["detectors.same.patch=2", "detectors.same.warmup=10"],
             # the authors' patch, twice the width, twice the blocks, half the epochs (under an hour on 2 cores)
             "wide": ["detectors.same.patch=2", "detectors.same.dim=128", "detectors.same.depth=6",
                      "detectors.same.decoder_dim=128", "detectors.same.decoder_depth=2", "detectors.same.epochs=50",
                      "detectors.same.warmup=5"],
             # the SAME authors' release (half a day or more on 2 cores)
             "authors": ["detectors.same.patch=2", "detectors.same.dim=192", "detectors.same.depth=12",
                         "detectors.same.decoder_dim=192", "detectors.same.decoder_depth=4", "detectors.same.heads=3",
                         "detectors.same.epochs=500", "detectors.same.warmup=50", "detectors.same.lr=0.01"]}


def mae_size(size: str) -> str:
    """MAE size ``size`` in words, read from the settings it runs with: 'patch 4, width 64, 3 + 1 blocks, 100
    epochs'."""
    from sim import config  # the settings' defaults live there

    p = config.load("same_detection", ["detectors.same.variant=same_code", *MAE_SIZES[size]]).detectors["same"].params()
    return f"patch {p['patch']}, width {p['dim']}, {p['depth']} + {p['decoder_depth']} blocks, {p['epochs']} epochs"


def replica_pct(cell: dict) -> float:
    """A benchmarks/attacks.py cell's replica accuracy in %: at its best epoch where the MAD code's replica kept
    one (the reference mode), else at the last."""
    return 100 * cell.get("best", {}).get("test_accuracy", cell["replica_accuracy"])


def spread(values: Iterable[float]) -> str:
    """Several seeds' measurements as "mean ± sample standard deviation (min–max)", one decimal."""
    import statistics

    v = list(values)
    if len(v) < 2:
        raise ValueError(f"spread needs at least 2 values, got {len(v)}")
    return f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f} ({min(v):.1f}–{max(v):.1f})"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


COLUMNS = ("claim", "paper", "paper's value", "ours, clean", "ours, reference mode", "tolerance", "verdict",
           "settings")


def markdown(rows: list[Row], preamble: list[str]) -> str:
    """The table, after ``preamble`` lines; one line per row, the verdict in bold followed by why."""
    lines = [*preamble, "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = (r.claim, r.paper, r.paper_value, r.clean, r.reference, r.tolerance, f"**{r.verdict}**: {r.why}",
                 r.settings)
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    counts = {v: sum(r.verdict == v for r in rows) for v in VERDICTS}
    lines += ["", "Verdicts: " + ", ".join(f"{n} {v}" for v, n in counts.items()) + "."]
    return "\n".join(lines) + "\n"
