"""Every artifact path, relative to the project root. dvc.yaml declares the same paths and
a test checks that the two agree, so a path is changed in both places or the suite fails."""

PARAMS = "params.yaml"
STAGING = ".dkgm/staging"  # outputs are written here first, then renamed into place

# prepare
PREPARED = "data/prepared"  # data.npy, manifest.parquet, meta.json
PREPARE_REPORTS = "reports/prepare"
PREPARE_PREVIEW = "reports/prepare/preview.png"
PREPARE_METRICS = "reports/prepare/metrics.json"

# fit_kde
KDE = "data/kde"
KDE_BANDWIDTH = "data/kde/bandwidth.json"
KDE_TOPK = "data/kde/val_topk.npz"
KDE_REPORTS = "reports/kde"
KDE_CV_CURVE = "reports/kde/cv_curve.csv"
KDE_CV_PLOT = "reports/kde/cv_curve.png"
KDE_METRICS = "reports/kde/metrics.json"

# sample_kde
KDE_SAMPLES = "data/samples/kde"  # samples.npy, manifest.parquet, meta.json
SAMPLE_KDE_GRID = "reports/sample_kde/grid.png"
SAMPLE_KDE_METRICS = "reports/sample_kde/metrics.json"

# train_debiaser
DEBIASER = "models/debiaser"
DEBIASER_SNAPSHOT = "models/debiaser/snapshot.pt"
DEBIASER_STATES = "checkpoints/debiaser"  # resumable training states, outside DVC (one folder per config)
TRAIN_LOG = "reports/train/log.parquet"
TRAIN_LOSS_PLOT = "reports/train/loss.png"
TRAIN_DENOISE_PLOT = "reports/train/denoise.png"
TRAIN_METRICS = "reports/train/metrics.json"

# refine
REFINED = "data/samples/refined"  # samples.npy (uint8 images / float32 points), manifest.parquet, meta.json
REFINE_GRID = "reports/refine/grid.png"
REFINE_TRAJECTORY = "reports/refine/trajectory.png"
REFINE_PROGRESS = "reports/refine/progress.png"
REFINE_METRICS = "reports/refine/metrics.json"

# reference (Inception features of the real data, once per dataset and feature network)
REFERENCE = "data/reference"  # features.npz, meta.json
REFERENCE_METRICS = "reports/reference/metrics.json"

# evaluate
EVAL_METRICS = "reports/eval/metrics.json"
EVAL_SAMPLES = "reports/eval/per_sample.parquet"  # per sample: nearest training items, distances, anchor match
EVAL_NEAREST = "reports/eval/nearest.png"
EVAL_MEMORIZATION = "reports/eval/memorization.png"

# report (the review document: everything above in one page)
REPORT_MD = "reports/report.md"
REPORT_HTML = "reports/report.html"  # self-contained: images embedded as data URIs

# gates
GATES = "reports/gates"


def gate_record(name: str) -> str:
    """The full gate record: every check, value, threshold and params key."""
    return f"{GATES}/{name}.json"


def gate_token(name: str) -> str:
    """What downstream stages depend on: the decision alone, so that moving a threshold
    without changing the decision does not re-run what follows."""
    return f"{GATES}/{name}.go"
