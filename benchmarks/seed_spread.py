"""How much the decision numbers move with the training seed (issue 21): DKGM and the diffusion
baseline trained with several seeds at the default budget, each scored as the pipeline scores it.

Per seed, both networks are trained with params.yaml's recipe (`debiaser.*`, the baseline over
EDM's range, `baseline.sigma_max`), only `debiaser.seed` changed; then three rows at n = 500 on the
same sample seeds as the default run:

- dkgm: DKGM's network at its own novel point, found as calibrate finds it (probe, bisection on s)
  and refined with refine's sampler (the default run's `refined_fid`);
- control: the baseline's network from the same KDE start with the same sampler, at DKGM's point
  (the comparison's "baseline net, KDE start");
- baseline: the baseline's network from pure noise, sample_baseline's sampler (18 Heun steps,
  35 NFE: the default run's `baseline_fid`).

    python benchmarks/seed_spread.py run 1 2          # train and score seeds 1 and 2 (resumable)
    python benchmarks/seed_spread.py run 0 --from-run # seed 0: the default run's own snapshots (models/)
    python benchmarks/seed_spread.py table            # benchmarks/results/seed_spread.{md,json}
    python benchmarks/seed_spread.py table --rows benchmarks/results/seed_spread_rows.jsonl  # from the committed rows

A DKGM-only variant (`--set` takes the debiaser keys the baseline does not share: its noise range
and distribution) trains DKGM's network anew and scores it against the same baseline networks, the
control re-scored at the variant's own point:

    python benchmarks/seed_spread.py run 0 1 --set sigma_dist=lognormal_truncated p_std=0.8
    python benchmarks/seed_spread.py table --set sigma_dist=lognormal_truncated p_std=0.8 --out FILE.md
    python benchmarks/seed_spread.py curve 0 --set p_std=0.8 --out FILE.md  # held-out denoising error per sigma

The same spread as a DVC experiment queue (each runs the whole pipeline, ~50 min here per seed):
`dvc exp run --queue -S debiaser.seed=1 && dvc exp run --queue -S debiaser.seed=2 && dvc queue start`,
then `dvc exp show --only-changed`. Networks and raw rows live in benchmarks/.seeds/ (not committed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import sweep_recipe as sweep  # noqa: E402  (the sweep's training and its calibrate-like scoring)

SEEDS = ROOT / "benchmarks" / ".seeds"
RESULTS = ROOT / "benchmarks" / "results"
ROWS = ("dkgm", "control", "baseline")


def _params():
    from pipeline.params import load_params

    return load_params(ROOT / "params.yaml")


def training_recipe(params) -> dict:
    from pipeline.recipe import training_recipe as recipe

    return recipe(params)


def _sampler(params) -> dict:
    r = params.refine
    return {"schedule": r.schedule, "solver": r.solver, "steps": r.steps, "sigma_min": r.sigma_min, "rho": r.rho,
            "churn": r.churn, "churn_min": r.churn_min, "churn_max": r.churn_max}


def _named(kind: str, seed: int, recipe: dict) -> str:
    """The folder of one network: its seed and a hash of params.yaml's training recipe, so a network
    trained under an earlier recipe is never scored as this recipe's (a changed default trains anew)."""
    import hashlib

    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:8]
    return f"{kind}_seed{seed}_{digest}"


def _train_or_copy(name: str, overrides: dict, run_snapshot: Path | None) -> None:
    folder = SEEDS / name
    if (folder / "snapshot.pt").is_file() and (folder / "train.json").is_file():
        return
    if run_snapshot is not None:  # seed 0: the network the default run trained (same code, data and recipe)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_snapshot, folder / "snapshot.pt")
        (folder / "train.json").write_text(json.dumps({"name": name, "recipe": overrides, "from": str(run_snapshot)}))
        return
    sweep.train(name, overrides, where=SEEDS)


def score_noise(name: str, params, n: int) -> dict:
    """The baseline's network from pure noise with sample_baseline's sampler, scored by evaluate's code."""
    import numpy as np
    import torch

    from dkgm import data as ds
    from dkgm.debias import load_denoiser
    from stages.sampling import denoise_fn, sample_from_noise
    from stages.scoring import EvaluateParams, Scorer

    sb = params.sample_baseline
    device = torch.device("cpu")
    den, snap = load_denoiser(SEEDS / name / "snapshot.pt")
    fn = denoise_fn(den, device, "fp32")
    seeds = sb.seed + np.arange(n, dtype=np.int64)
    t0 = time.perf_counter()
    x, nfe = sample_from_noise(fn, seeds, tuple(snap["network"]["shape"]), float(snap["sigma_max"]), sb.steps,
                               sb.solver, sb.eta, device, sb.batch_size, sb.rho, sb.sigma_min)
    m, _ = Scorer(EvaluateParams(n_samples=n), ROOT, n).score({"baseline": ds.to_float(ds.to_uint8(x))})
    return {"nfe": nfe, "sample_seconds": time.perf_counter() - t0,
            **{k: m.get(f"baseline_{k}") for k in sweep.EVAL_KEYS}, "floor_fid": m.get("real_fid")}


def dkgm_only(pairs: list[str]) -> dict:
    """`--set key=value` pairs as debiaser overrides, each a key only DKGM's network has (the baseline
    trains over EDM's own range with its own distribution, so its networks are shared)."""
    from stages.fitting import DKGM_ONLY_KEYS, DebiaserParams

    out = sweep._parse(pairs)
    bad = sorted(set(out) - set(DKGM_ONLY_KEYS))
    if bad:
        raise SystemExit(f"--set {', '.join(bad)}: not a DKGM-only debiaser key (one of {', '.join(DKGM_ONLY_KEYS)}); "
                         "a key both networks share is a new default: change params.yaml and run again")
    DebiaserParams(**out)  # a bad value fails here, naming its key, before any training
    return out


def variant_recipe(recipe: dict, dkgm_set: dict) -> dict:
    """params.yaml's training recipe with DKGM's debiaser keys replaced (the record's recipe)."""
    return {**recipe, "debiaser": {**recipe["debiaser"], **dkgm_set}} if dkgm_set else recipe


def run(seeds: list[int], from_run: bool, n: int, scales: list[float], dkgm_set: dict | None = None) -> None:
    params = _params()
    sampler = _sampler(params)
    etas = list(params.calibrate.etas)
    out = SEEDS / "spread.jsonl"
    dkgm_set = dkgm_set or {}
    recipe = training_recipe(params)
    mine_recipe = variant_recipe(recipe, dkgm_set)
    if from_run and dkgm_set:
        raise SystemExit("--from-run uses the default run's networks, which were not trained with --set")
    for seed in seeds:
        dk, bl = _named("dkgm", seed, mine_recipe), _named("baseline", seed, recipe)
        _train_or_copy(dk, {"seed": seed, **dkgm_set}, ROOT / "models/debiaser/snapshot.pt" if from_run else None)
        _train_or_copy(bl, {"seed": seed, "sigma_max": params.baseline.sigma_max},
                       ROOT / "models/baseline/snapshot.pt" if from_run else None)
        mine = sweep.score(dk, sampler, etas, scales, f"seed{seed}", n, params.calibrate.probe_samples,
                           params.calibrate.bisect_steps, params.calibrate.margin, where=SEEDS)
        best = min((r for r in mine if r.get("passed")), key=lambda r: r["fid"], default=None)
        rows = {"dkgm": best}
        if best is not None:
            rows["control"] = sweep.score(bl, sampler, [best["eta"]], scales, f"seed{seed}", n,
                                          params.calibrate.probe_samples, 0, params.calibrate.margin,
                                          at=best["scale"], where=SEEDS)[0]
        rows["baseline"] = score_noise(bl, params, n)
        record = {"seed": seed, "from_run": from_run, "n": n, "recipe": mine_recipe, "dkgm_set": dkgm_set,
                  **{k: v for k, v in rows.items() if v is not None}}
        with out.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps({"seed": seed, **{k: (v or {}).get("fid") for k, v in rows.items()}}))


def current_records(records: list[dict], recipe: dict) -> list[dict]:
    """The records made under `recipe` (params.yaml's training recipe). Records that carry none are
    from before recipes were recorded: usable only when no record carries one (a committed legacy
    table); beside recorded ones they are another recipe's and are left out, as are other recipes'."""
    if not any(r.get("recipe") for r in records):
        return records
    kept = [r for r in records if r.get("recipe") == recipe]
    variants = [r for r in records if r not in kept and r.get("dkgm_set")]
    if variants:
        sets = sorted({_set_text(r["dkgm_set"]) for r in variants})
        print(f"seed_spread: {len(variants)} record(s) of DKGM-only variants left out (`table --set ...`: "
              + "; ".join(sets) + ")", file=sys.stderr)
    others = [r for r in records if r not in kept and r not in variants]
    if others:
        left = sorted({r["seed"] for r in others})
        print(f"seed_spread: {len(others)} record(s) of other or unrecorded training recipes left out (seeds {left})",
              file=sys.stderr)
    if not kept:
        raise SystemExit("no record was made under this training recipe: `python benchmarks/seed_spread.py run` "
                         "(with the same --set for a variant)")
    return kept


def summarise(records: list[dict]) -> dict:
    """Per row: each seed's FID, their mean and range; the DKGM - baseline and DKGM - control gaps
    per seed, and whether the smallest gap's sign holds across seeds."""
    latest = {r["seed"]: r for r in records}  # a re-scored seed replaces its earlier record
    seeds = sorted(latest)
    out: dict = {"seeds": seeds, "n": latest[seeds[0]]["n"] if seeds else None, "rows": {}}
    for row in ROWS:
        fids = {s: latest[s][row]["fid"] for s in seeds if latest[s].get(row) and latest[s][row].get("fid") is not None}
        if not fids:
            continue
        vals = list(fids.values())
        out["rows"][row] = {"fid": fids, "mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals),
                            "range": max(vals) - min(vals),
                            "fid_se": {s: latest[s][row].get("fid_se") for s in fids},
                            "zu_pixel": {s: latest[s][row].get("zu_pixel") for s in fids},
                            "scale": {s: latest[s][row].get("scale") for s in fids if latest[s][row].get("scale")}}
    for other in ("baseline", "control"):
        if "dkgm" in out["rows"] and other in out["rows"]:
            gaps = {s: out["rows"]["dkgm"]["fid"][s] - out["rows"][other]["fid"][s]
                    for s in seeds if s in out["rows"]["dkgm"]["fid"] and s in out["rows"][other]["fid"]}
            out[f"dkgm_minus_{other}"] = {"per_seed": gaps, "min": min(gaps.values()), "max": max(gaps.values()),
                                          "same_sign": len({g > 0 for g in gaps.values()}) == 1}
    floors = [latest[s][r]["floor_fid"] for s in seeds for r in ROWS if latest[s].get(r) and latest[s][r].get("floor_fid")]
    out["floor_fid"] = floors[0] if floors else None
    recipes = {json.dumps(latest[s].get("recipe"), sort_keys=True) for s in seeds if latest[s].get("recipe")}
    if len(recipes) > 1:
        raise SystemExit("the seeds' records were made under different recipes: re-run them under one params.yaml")
    # records from before the recipe was recorded: the current params.yaml's (check that it did not change)
    out["recipe"] = json.loads(recipes.pop()) if recipes else training_recipe(_params())
    return out


def _shown(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _set_text(dkgm_set: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(dkgm_set.items()))


def table(records: list[dict], md: Path, js: Path, rows: Path, dkgm_set: dict | None = None) -> None:
    summary = summarise(records)
    seeds = summary["seeds"]
    command = f"python benchmarks/seed_spread.py table --rows {_shown(rows)}"
    if dkgm_set:
        title = f"# A DKGM-only variant, `{_set_text(dkgm_set)}`: {len(seeds)} training seed(s)"
        command += f" --set {_set_text(dkgm_set)} --out {_shown(md)}"
        trained = (f"trains DKGM's network with params.yaml's recipe except `{_set_text(dkgm_set)}` (debiaser keys "
                   "the baseline does not share); the baseline's networks are the default recipe's")
    else:
        title = f"# Seed spread at the default budget: {len(seeds)} training seeds per network (issue 21)"
        trained = ("trains DKGM's network and the baseline's with params.yaml's recipe (only `debiaser.seed` differs; "
                   "seed 0 is the default run's own pair)")
    lines = [title, "",
             f"Generated by `{command}`. Each seed {trained}, on 2 CPU cores in fp32. Rows at n = "
             f"{summary['n']} on the default run's sample seeds: dkgm = DKGM at its own novel point (calibrate's "
             "search) with refine's sampler; control = the baseline's network from the same KDE start, same sampler; "
             "baseline = the baseline from noise, 18 Heun steps (35 NFE). FID against the 2,000-image training "
             f"reference; held-out floor at this n {summary['floor_fid']:.2f}." if summary["floor_fid"] else "", "",
             "| row | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | range (max - min) | range / mean |",
             "|:--|" + "--:|" * (len(seeds) + 3)]
    for row, r in summary["rows"].items():
        cells = [f"{r['fid'][s]:.2f} ± {r['fid_se'][s]:.2f}" if r["fid_se"].get(s) else f"{r['fid'][s]:.2f}"
                 if s in r["fid"] else "n/a" for s in seeds]
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {r['mean']:.2f} | {r['range']:.2f} | "
                     f"{r['range'] / r['mean']:.1%} |")
    lines += ["", "Each cell: FID ± its bootstrap spread at n (which samples were drawn, evaluate.fid_bootstrap). "
              "The range is over training seeds, the spread a same-network re-draw would show.", ""]
    dk = summary["rows"].get("dkgm")
    if dk:
        lines.append("DKGM's point per seed: " + ", ".join(
            f"seed {s}: s = {dk['scale'].get(s, float('nan')):.3g}, pixel Z_U {dk['zu_pixel'][s]:+.2f}" for s in dk["fid"]))
        lines.append("")
        floor = summary["floor_fid"]
        if floor:  # issue 19's goal, per seed: DKGM at its novel point within 2x the held-out floor
            ratios = {s: v / floor for s, v in dk["fid"].items()}
            over = [s for s, r in ratios.items() if r > 2.0]
            lines += ["DKGM / floor per seed: " + ", ".join(f"seed {s}: {r:.2f}x" for s, r in ratios.items())
                      + f" (mean {dk['mean'] / floor:.2f}x; within 2x on "
                      + ("every seed)." if not over else f"{len(ratios) - len(over)} of {len(ratios)} seeds: not on "
                         + ", ".join(f"seed {s}" for s in over) + ")."), ""]
    for other in ("baseline", "control"):
        g = summary.get(f"dkgm_minus_{other}")
        if g:
            verdict = ("the sign holds on every seed" if g["same_sign"] else "the sign changes between seeds: "
                       "no winner at this budget")
            lines.append(f"- DKGM - {other}: " + ", ".join(f"seed {s}: {v:+.2f}" for s, v in g["per_seed"].items())
                         + f" (from {g['min']:+.2f} to {g['max']:+.2f}; {verdict}).")
    latest = {r["seed"]: r for r in records}
    copying = [s for s in seeds if any(not c["passed"] for c in (latest[s].get("control") or {}).get("candidates", []))]
    if copying:  # the control is scored at DKGM's point whatever its own novelty: say where that favours it
        lines.append("- At DKGM's point the control's own probe fails the novelty rule (it copies more than DKGM there) "
                     "on " + ", ".join(f"seed {s} (probe pixel Z_U {latest[s]['control']['probe_zu']:+.2f})"
                                       for s in copying) + ": its FID there is not at equal novelty.")
    md.write_text("\n".join(lines) + "\n")
    js.write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    print("\n".join(lines))


def curve(seed: int, dkgm_set: dict, out: Path, images: int = 500) -> None:
    """Held-out denoising error over sigma of one seed's networks (the default recipe's DKGM network,
    the variant's when --set, the baseline's) on the same validation images and noise draws: where a
    noise distribution buys or loses accuracy. MSE per pixel in [-1, 1] units; identity = sigma^2."""
    import numpy as np
    import torch

    from dkgm.debias import denoising_curve, load_denoiser
    from stages.artifacts import load_prepared

    recipe = training_recipe(_params())
    names = {"dkgm": _named("dkgm", seed, recipe)}
    if dkgm_set:
        names[f"dkgm {_set_text(dkgm_set)}"] = _named("dkgm", seed, variant_recipe(recipe, dkgm_set))
    names["baseline"] = _named("baseline", seed, recipe)
    missing = [n for n in names.values() if not (SEEDS / n / "snapshot.pt").is_file()]
    if missing:
        raise SystemExit(f"no trained network {', '.join(missing)} in {SEEDS}: `run {seed}` (with the same --set) first")
    val = torch.from_numpy(load_prepared(ROOT).split("val")[:images])
    nets = {label: load_denoiser(SEEDS / name / "snapshot.pt") for label, name in names.items()}
    sigma_max = float(nets["dkgm"][1]["sigma_max"])
    sigmas = np.geomspace(0.005, sigma_max, 14).tolist()
    mse = {label: [r["mse"] for r in denoising_curve(den, val, sigmas, device="cpu")] for label, (den, _) in nets.items()}
    labels = list(mse)
    lines = [f"# Held-out denoising error over sigma, seed {seed}", "",
             f"Generated by `python benchmarks/seed_spread.py curve {seed}"
             + (f" --set {_set_text(dkgm_set)}" if dkgm_set else "") + f" --out {_shown(out)}`: {len(val)} validation "
             "images, the same noise draws for every network; MSE per pixel ([-1, 1] units; the identity's is sigma^2). "
             "Ratio: each network's MSE over the default DKGM network's (below 1: more accurate).", "",
             "| sigma | " + " | ".join(f"{lb} MSE" for lb in labels) + " | " + " | ".join(f"{lb} / dkgm" for lb in labels[1:])
             + " |", "|--:|" + "--:|" * (2 * len(labels) - 1)]
    for i, sg in enumerate(sigmas):
        lines.append(f"| {sg:.4f} | " + " | ".join(f"{mse[lb][i]:.3g}" for lb in labels) + " | "
                     + " | ".join(f"{mse[lb][i] / mse['dkgm'][i]:.3f}" for lb in labels[1:]) + " |")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("seeds", type=int, nargs="+")
    r.add_argument("--from-run", action="store_true", help="use the default run's snapshots (models/) for these seeds")
    r.add_argument("--n", type=int, default=500)
    r.add_argument("--scales", default="4,5,6,7,8", help="calibrate's grid from 4 up (below 4 every seed fails)")
    c = sub.add_parser("curve")
    c.add_argument("seed", type=int)
    c.add_argument("--out", type=Path, required=True)
    t = sub.add_parser("table")
    for sp in (r, t, c):
        sp.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="a DKGM-only variant: debiaser keys the baseline does not share (sigma_dist, p_mean, ...)")
    t.add_argument("--rows", type=Path, default=SEEDS / "spread.jsonl", help="the raw records (a committed copy: "
                   "benchmarks/results/seed_spread_rows.jsonl)")
    t.add_argument("--out", type=Path, default=RESULTS / "seed_spread.md")
    args = ap.parse_args(argv)
    dkgm_set = dkgm_only(args.set)
    if args.cmd == "curve":
        curve(args.seed, dkgm_set, args.out)
    elif args.cmd == "run":
        SEEDS.mkdir(parents=True, exist_ok=True)
        run(args.seeds, args.from_run, args.n, [float(v) for v in args.scales.split(",")], dkgm_set)
    else:
        if dkgm_set and args.out == RESULTS / "seed_spread.md":
            raise SystemExit("--set: name the variant's table with --out (seed_spread.md is the default recipe's)")
        records = current_records(sweep.load_rows(args.rows), variant_recipe(training_recipe(_params()), dkgm_set))
        table(records, args.out, args.out.with_suffix(".json"), args.rows, dkgm_set)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
