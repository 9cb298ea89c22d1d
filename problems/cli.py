"""The `bilevel` command line. Each module in COMMAND_MODULES may define
add_commands(subparsers) for top-level commands and add_bench(bench_subparsers) for
`bilevel bench NAME`; it registers its reproductions with problems.registry.register."""
import argparse
import importlib
import sys
import traceback

import torch

from . import registry
from .report import emit, results_dir, save_json

COMMAND_MODULES = [
    "problems.engine_bench",
    "problems.motion_cli",
    "problems.graph_embedding_cli",
    "problems.ot_cli",
    "problems.taskmet.cli",
    "problems.geometry_bench",
]


def _reproduce(args):
    names = list(registry.EXPERIMENTS) if args.name == "all" else [args.name]
    unknown = [n for n in names if n not in registry.EXPERIMENTS]
    if unknown:
        sys.exit(f"unknown experiment {unknown[0]!r}; choose from {['all', *registry.EXPERIMENTS]}")
    outdir = results_dir("reproduce" + ("-quick" if args.quick else ""))
    rows, failed = [], []
    threads = torch.get_num_threads()
    for name in names:
        sub = outdir / name
        sub.mkdir()
        try:
            new = registry.EXPERIMENTS[name](args.quick, sub)
        except Exception as err:  # one failed experiment must not lose the others' results
            traceback.print_exc()
            failed.append(name)
            new = [{"experiment": name, "setting": "FAILED", "metric": f"{type(err).__name__}: {err}",
                    "ours": None, "published": None}]
        finally:
            torch.set_num_threads(threads)  # experiments may tune threads for themselves
        rows.extend(new)
        save_json(new, sub / "rows.json")  # written as each experiment ends: nothing is lost later
    print(f"results in {outdir}", file=sys.stderr)
    emit({"rows": rows}, args.json, rows=rows,
         columns=["experiment", "setting", "metric", "ours", "published"])
    if failed:
        sys.exit(f"experiments failed: {', '.join(failed)} (tracebacks above; other results in {outdir})")


def build_parser():
    p = argparse.ArgumentParser(prog="bilevel", description="End-to-end learning of geometries by bilevel "
                                "optimization and implicit differentiation.")
    sub = p.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmarks (ratios side by side in one run)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    rep = sub.add_parser("reproduce", help="run registered experiments and compare with published numbers")
    rep.add_argument("name", nargs="?", default="all")
    rep.add_argument("--quick", action="store_true", help="the quick setting of each experiment")
    rep.add_argument("--json", action="store_true")
    rep.set_defaults(func=_reproduce)
    for name in COMMAND_MODULES:
        mod = importlib.import_module(name)
        if hasattr(mod, "add_commands"):
            mod.add_commands(sub)
        if hasattr(mod, "add_bench"):
            mod.add_bench(bench_sub)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    main()
