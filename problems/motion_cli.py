"""`bilevel motion`: geodesic motion skills on a VAE's pullback metric, and its `reproduce` entry."""
import sys

from . import registry
from .motion import default_obstacle, plot_motion, run_motion
from .motion_data import DEFAULT_FAMILY, FAMILIES, get_demos
from .report import emit, progress, results_dir, save_json


def parse_obstacle(text, dim):
    """'x,y,r' (2-D) or 'x,y,z,r' (3-D) -> (center list, radius); 'none' -> None."""
    if text.lower() == "none":
        return None
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--obstacle {text!r}: expected comma-separated numbers") from None
    if len(vals) != dim + 1 or not vals[-1] > 0:
        raise ValueError(f"--obstacle {text!r}: expected {dim} center coordinates and a positive radius "
                         f"for {dim}-D demonstrations")
    return vals[:-1], vals[-1]


def motion_experiment(demos_spec=DEFAULT_FAMILY, obstacle=None, seed=0, quick=False, outdir=None):
    """One run: scores dict (the JSON object) with the figure saved in outdir."""
    name, demos = get_demos(demos_spec, seed=seed)
    start, goal = demos[:, 0].mean(0), demos[:, -1].mean(0)
    ball = default_obstacle(start, goal) if obstacle is None else parse_obstacle(obstacle, demos.shape[-1])
    obstacles = [ball] if ball else []
    scores, details = run_motion(demos, obstacles, seed=seed, quick=quick,
                                 progress=lambda r, **kw: progress(r, leave=False, **kw))
    result = {"demos": name, "seed": seed, "obstacle": [*ball[0], ball[1]] if ball else None, **scores}
    if outdir is not None:
        fig = outdir / f"motion-{name}-seed{seed}.png"
        plot_motion(demos, details, fig, title=name)
        result["figure"] = str(fig)
    return result


def _cmd_motion(args):
    outdir = results_dir("motion")
    try:
        result = motion_experiment(args.demos, args.obstacle, args.seed, args.quick, outdir)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"bilevel motion: {err}")
    save_json(result, outdir / "result.json")
    print(f"results in {outdir}", file=sys.stderr)
    emit(result, args.json, columns=["demos", "geodesic_dist_to_data", "linear_dist_to_data",
                                     "latent_linear_dist_to_data", "hits_obstacle", "seconds"])


def add_commands(sub):
    p = sub.add_parser("motion", help="geodesic motion skills on a learned pullback metric (Beik-Mohammadi 2021)")
    p.add_argument("--demos", default=DEFAULT_FAMILY,
                   help=f"built-in family {sorted(FAMILIES)} or a .npy/.npz [demo, time, dim] file")
    p.add_argument("--obstacle", default=None,
                   help="ball 'x,y,r' (or 'x,y,z,r' in 3-D), or 'none'; default: on the straight line start-goal")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--quick", action="store_true", help="shorter VAE training and geodesic refinement")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_motion)


def reproduce(quick, outdir):
    """Default obstacle on the straight line; quick: c_shape (2-D) and helix (3-D), one seed; else all
    families, seeds 0-2."""
    families = ["c_shape", "helix"] if quick else sorted(FAMILIES)
    seeds = [0] if quick else [0, 1, 2]
    rows = []
    for fam in families:
        for seed in seeds:
            r = motion_experiment(fam, None, seed, quick, outdir)
            setting = f"{fam} seed {seed} obstacle on straight line"
            rows += [{"experiment": "motion", "setting": setting, "metric": m, "ours": r[m], "published": None}
                     for m in ("geodesic_dist_to_data", "linear_dist_to_data", "latent_linear_dist_to_data",
                               "ratio_vs_linear", "ratio_vs_latent_linear", "hits_obstacle", "seconds")]
    return rows


registry.register("motion", reproduce)
