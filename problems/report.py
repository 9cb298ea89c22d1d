"""Output helpers shared by every command: tables, the --json line, results folders, progress."""
import json
import math
import os
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm


def results_dir(name, root=None):
    """A new folder results/<name>-<UTC time>-<pid>[-k] that no earlier run used."""
    root = Path(root or os.environ.get("BILEVEL_RESULTS", "results"))
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    base = root / f"{name}-{stamp}-{os.getpid()}"
    path, k = base, 0
    while True:
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            k += 1
            path = Path(f"{base}-{k}")


def fmt(v):
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.4f}".rstrip("0").rstrip(".")
    return "-" if v is None else str(v)


def _cell(v, width=60):
    s = fmt(v)
    return s if len(s) <= width else s[:width - 3] + "..."


def table(rows, columns=None, file=None):
    """Print rows (list of dicts) as an aligned text table (cells cut at 60 characters; --json has them whole)."""
    file = file or sys.stdout
    if not rows:
        print("(no rows)", file=file)
        return
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)), file=file)


def emit(obj, as_json, rows=None, columns=None):
    """Print a human table of rows (or of obj); with as_json the last stdout line is json.dumps(obj)."""
    table(rows if rows is not None else [obj], columns)
    if as_json:
        print(json.dumps(obj, default=float), flush=True)


def save_json(obj, path):
    Path(path).write_text(json.dumps(obj, indent=2, default=float))


def progress(iterable=None, **kw):
    """tqdm on stderr, silent when BILEVEL_QUIET is set (tests)."""
    return tqdm(iterable, file=sys.stderr, disable=bool(os.environ.get("BILEVEL_QUIET")) or None, **kw)
