"""Experiments that `bilevel reproduce` runs.

register(name, run) adds an experiment; run(quick: bool, outdir: Path) returns rows, each
{"experiment", "setting", "metric", "ours", "published"} (published: a number, or None).
"""
EXPERIMENTS = {}


def register(name, run):
    if name in EXPERIMENTS:
        raise ValueError(f"experiment {name!r} registered twice")
    EXPERIMENTS[name] = run
    return run
