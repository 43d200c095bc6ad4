"""The params.yaml schema, assembled from the stage modules' Section models; loading and checking.

Each stage module declares its section's model; this module only puts them together (one field
per section) and turns pydantic's errors into one line per bad key, e.g.
`params.yaml: kde.bandwidth_scale: must be greater than 0 (got -1)`, with "did you mean" for a
misspelt key.
"""

from __future__ import annotations

import re
from difflib import get_close_matches
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model

from dkgm.errors import DKGMError
from pipeline import registry
from stages.contract import Section

PARAMS_FILE = "params.yaml"
# keys that moved: an old params.yaml gets told where they went, not only that they are unknown
MOVED = {
    "kde.bandwidth_scale": "sample_kde.bandwidth_scale (auto: calibrate's operating point, or a number)",
    "debiaser.sigma_max_factor": "debiaser.sigma_max_margin (sigma_max = margin x the largest calibrate.scales x h_kde)",
    "calibrate.steps": "refine.steps (calibrate probes with refine's own sampler: schedule, steps, solver, churn)",
    "calibrate.eval_samples": "evaluate.n_samples (calibrate reads it)",
    "calibrate.min_zu": "gates.eval.min_zu_pixel (calibrate applies the evaluation gate's rule, plus calibrate.margin)",
    "calibrate.copy_floor_factor": "gates.eval.copy_floor_factor (calibrate reads it)",
    "calibrate.copy_allowance": "gates.eval.copy_allowance (calibrate reads it)",
    "calibrate.max_authenticity_drop": "gates.eval.max_authenticity_drop (calibrate reads it)",
    "calibrate.copy_ratio": "evaluate.copy_ratio (calibrate reads it)",
    "comparison.control_kde_steps": "refine.steps (the control runs refine's own sampler)",
}


class ParamsError(DKGMError):
    """params.yaml is missing, unreadable or does not match the schema."""


@cache
def params_model() -> type[BaseModel]:
    """The whole params.yaml schema: one field per stage section (dotted sections such as
    `gates.kde` nest), each the stage's own Section model with its defaults."""
    tree: dict[str, Any] = {}
    # plain sections first, nested ones (gates.<name>) after them, as params.yaml orders them
    for stage in sorted(registry.all_stages().values(), key=lambda s: "." in s.section):
        if not stage.section:
            continue
        *parents, leaf = stage.section.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = stage.params

    def build(name: str, node: dict[str, Any]) -> type[BaseModel]:
        fields = {}
        for key, sub in node.items():
            model = build(f"{name}_{key}", sub) if isinstance(sub, dict) else sub
            fields[key] = (model, Field(default_factory=model))
        return create_model(name, __base__=Section, **fields)

    return build("Params", tree)


def _known_keys(model: type[BaseModel], path: list[str]) -> list[str]:
    """The keys allowed next to the one at `path` (its siblings in the schema)."""
    for part in path[:-1]:
        field = model.model_fields.get(part)
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _describe(err: dict[str, Any]) -> str:
    parts = [str(p) if str(p).isprintable() and str(p).strip() else repr(str(p))  # a key like "\r" shown as '\r'
             for p in err["loc"] if not str(p).startswith(("literal[", "float", "union[", "function-"))]
    key = ".".join(parts)
    kind = err["type"]
    if kind == "extra_forbidden" and key in MOVED:
        return f"{key}: moved to {MOVED[key]}"
    if kind == "extra_forbidden":
        known = _known_keys(params_model(), parts)
        close = get_close_matches(parts[-1], known, n=1)
        hint = f"did you mean {'.'.join([*parts[:-1], close[0]])}?" if close else (
            f"known keys here: {', '.join(known)}" if known else "check the spelling")
        return f"{key}: unknown key ({hint})"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if "(got" not in msg:
        msg = f"{msg} (got {err.get('input')!r})"
    return f"{key}: {msg}"


def validate(raw: dict[str, Any], source: str = PARAMS_FILE) -> BaseModel:
    """Validate a parsed params mapping; raise ParamsError with one line per bad key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        params = params_model().model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        # a union (e.g. bandwidth: cv|...|number) reports one error per branch; keep the first per key
        seen: dict[str, str] = {}
        for e in errors:
            line = _describe(e)
            seen.setdefault(line.split(":", 1)[0], line)
        raise ParamsError("; ".join(f"{source}: {line}" for line in seen.values())) from None
    broken = cross_section_problems(params)
    if broken:
        raise ParamsError("; ".join(f"{source}: {line}" for line in broken))
    return params


def cross_section_problems(p: BaseModel) -> list[str]:
    """Keys of different sections that must agree, one line per broken rule naming both keys: a
    mistake that would otherwise surface inside a later stage (after the training) or be capped
    without a word is refused by `pipeline check` and before any stage starts."""
    out = []
    ev, skde, sbase = p.evaluate, p.sample_kde, p.sample_baseline
    if ev.n_samples > skde.n_samples:
        out.append(f"evaluate.n_samples ({ev.n_samples}) exceeds sample_kde.n_samples ({skde.n_samples}): evaluate "
                   "scores the first evaluate.n_samples of the samples drawn; raise sample_kde.n_samples or lower "
                   "evaluate.n_samples")
    if p.baseline.enabled and ev.n_samples > sbase.n_samples:
        out.append(f"evaluate.n_samples ({ev.n_samples}) exceeds sample_baseline.n_samples ({sbase.n_samples}): "
                   "evaluate_baseline scores the first evaluate.n_samples of the baseline's samples; raise "
                   "sample_baseline.n_samples")
    if sbase.seed != skde.seed:
        out.append(f"sample_baseline.seed ({sbase.seed}) differs from sample_kde.seed ({skde.seed}): both seed "
                   "sample s with seed + s, so that sample s of each stage is paired; set them equal")
    top = p.debiaser.sigma_max_margin * max(p.calibrate.scales)
    if isinstance(skde.bandwidth_scale, (int, float)) and skde.bandwidth_scale > top:
        out.append(f"sample_kde.bandwidth_scale ({skde.bandwidth_scale:g}) lies beyond the debiaser's noise range, "
                   f"debiaser.sigma_max_margin x max(calibrate.scales) = {p.debiaser.sigma_max_margin:g} x "
                   f"{max(p.calibrate.scales):g}: refine would start where the network never trained; add the scale "
                   "to calibrate.scales or raise debiaser.sigma_max_margin")
    if p.refine.sigma_min < p.debiaser.sigma_min:
        out.append(f"refine.sigma_min ({p.refine.sigma_min:g}) is below debiaser.sigma_min ({p.debiaser.sigma_min:g}): "
                   "refine's last noise levels would lie where the network never trained")
    cal = p.calibrate
    if cal.fidelity == "inception" and cal.fid_samples > cal.probe_samples:
        out.append(f"calibrate.fid_samples ({cal.fid_samples}) exceeds calibrate.probe_samples ({cal.probe_samples}): "
                   "a candidate's FID is taken on its probe samples")
    return out


def _yaml_problem(path: Path, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}" if mark is not None else "somewhere"
    if "'\\t'" in str(getattr(exc, "problem", "")):  # PyYAML: "found character '\t' that cannot start any token"
        return f"{path}: {where}: tabs are not allowed in YAML indentation: use spaces"
    reason = getattr(exc, "problem", None) or str(exc)
    return f"{path}: not valid YAML at {where}: {reason}".replace("\n", " ")


def load_params(path: str | Path = PARAMS_FILE) -> BaseModel:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: file not found (run from the project root, or pass --params)")
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ParamsError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise ParamsError(_yaml_problem(path, exc)) from None
    if raw is None:  # DVC reads each stage's keys from this file: an empty one is never meant
        raise ParamsError(f"{path}: empty (expected a mapping of sections such as prepare:, kde:, debiaser:)")
    return validate(raw, str(path))


def defaults() -> BaseModel:
    """Every section at its schema defaults."""
    return params_model()()


def section(params: BaseModel, dotted: str) -> Any:
    """The sub-model (or value) at a dotted name, e.g. 'gates.kde' or 'debiaser.channels'."""
    node: Any = params
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def descriptions(model: type[BaseModel]) -> dict[str, str]:
    """{field: its description}: the one declaration of what a key means (`Field(description=...)` in
    the stage module); params.yaml's comments and `python -m pipeline run STAGE --help` show it."""
    return {name: info.description for name, info in model.model_fields.items() if info.description}


def key_descriptions() -> dict[str, str]:
    """{dotted params.yaml key: its description}, for every key of every section."""
    out: dict[str, str] = {}
    for stage in registry.all_stages().values():
        if stage.section and stage.params:
            out.update({f"{stage.section}.{k}": d for k, d in descriptions(stage.params).items()})
    return out


_KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_]\w*):(?P<value>[^#]*?)(?P<pad> *)(?:#\s?(?P<comment>.*))?$")
COMMENT_COLUMN = 28  # where a key's comment starts when the line has none to align with


def sync_comments(text: str, wanted: dict[str, str] | None = None) -> tuple[str, list[str]]:
    """params.yaml's text with every key's end-of-line comment set to the key's description (values,
    order, blank lines and section comments kept), and the keys whose comment changed. Keys are found by
    indentation (two spaces a level); a comment stays at its column, or starts at COMMENT_COLUMN."""
    wanted = key_descriptions() if wanted is None else wanted
    path: list[str] = []
    out, changed = [], []
    for line in text.splitlines():
        m = _KEY_LINE.match(line)
        if not m or not m.group("value").strip():  # not a key, or a section header: kept as written
            if m:
                path = path[: len(m.group("indent")) // 2] + [m.group("key")]
            out.append(line)
            continue
        path = path[: len(m.group("indent")) // 2] + [m.group("key")]
        key = ".".join(path)
        want = wanted.get(key)
        if want is None or (m.group("comment") or "").strip() == want:
            out.append(line)
            continue
        head = f"{m.group('indent')}{m.group('key')}:{m.group('value').rstrip()}"
        column = line.index("#") if m.group("comment") is not None else COMMENT_COLUMN  # a value holds no "#"
        out.append(f"{head.ljust(max(column, len(head) + 2))}# {want}")
        changed.append(key)
    return "\n".join(out) + ("\n" if text.endswith("\n") else ""), changed
