"""Before / after in one process: a package module as of another git revision, and interleaved timing.

On a shared virtual machine the speed moves by tens of percent from minute to minute, so two
benchmark runs, one per version, can differ by more than the change they compare. Loading the old
version of the module beside the current one and alternating their timings rep by rep puts both
under the same conditions; the ratio of the medians is then the change's effect.

``module_at(revision, "vqtok.ops.fsq_entropy")`` reads the file with ``git show`` and executes it as
a fresh module in the same package (relative imports resolve against the current package), so
only that one module is the old version.
"""

from __future__ import annotations

import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Callable


def module_at(revision: str, name: str) -> types.ModuleType:
    """The module ``name`` (a ``vqtok.*`` module backed by a .py file) as of git ``revision``.

    Raises ValueError when the package is not in a git checkout, or git cannot show the file at
    that revision (unknown revision, file absent there)."""
    import vqtok

    if not name.startswith("vqtok."):
        raise ValueError(f"name must be a vqtok.* module, got {name!r}")
    path = Path(vqtok.__file__).resolve().parent.joinpath(*name.split(".")[1:]).with_suffix(".py")

    def git(*args: str) -> str:
        res = subprocess.run(["git", "-C", str(path.parent), *args], capture_output=True, text=True)
        if res.returncode != 0:
            raise ValueError(f"git {' '.join(args)}: {res.stderr.strip() or 'failed'}")
        return res.stdout

    root = Path(git("rev-parse", "--show-toplevel").strip())
    rel = path.relative_to(root).as_posix()
    source = git("show", f"{revision}:{rel}")
    module = types.ModuleType(f"{name}@{revision}")
    module.__package__ = name.rpartition(".")[0]
    module.__file__ = f"{path}@{revision}"
    sys.modules[module.__name__] = module  # dataclasses and pickling look classes up by module
    try:
        exec(compile(source, module.__file__, "exec"), module.__dict__)
    except BaseException:
        del sys.modules[module.__name__]
        raise
    return module


def against(revision: str | None, name: str, error: Callable[[str], object]) -> tuple[str, types.ModuleType] | None:
    """A benchmark's ``--against REV`` option: (REV, ``module_at(REV, name)``), None without one;
    a revision git cannot show goes to ``error`` (e.g. ``ArgumentParser.error``)."""
    if not revision:
        return None
    try:
        return revision, module_at(revision, name)
    except ValueError as e:
        error(f"--against: {e}")
        raise


def add_against_option(ap, what: str) -> None:
    """The benchmarks' ``--against REV`` argument (``what``: the thing timed, e.g. "the op")."""
    ap.add_argument("--against", default=None, metavar="REV",
                    help=f"time {what} as of this git revision beside the current one, alternating in this "
                         "process (ratio = current / REV median)")


def against_cells(row: dict, unit: str, digits: int | None = None) -> dict:
    """A result row's table cells for ``--against``: the revision's median (key
    ``against_median_<unit>``, rounded to ``digits``) and the ratio; {} for a row without one."""
    if "against" not in row:
        return {}
    return {f"{row['against']} {unit}": round(row[f"against_median_{unit}"], digits), "ratio": round(row["ratio"], 3)}


def interleaved(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """Seconds of each ``fns`` call, ``reps`` times each, the calls alternating within every rep
    (the order rotates from rep to rep, so neither version always runs first)."""
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return times
