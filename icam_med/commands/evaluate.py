"""``icam-med evaluate``: score CAM methods against ground-truth lesions (see icam_med.evaluation.evaluate)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from icam_med.commands import _args
from icam_med.commands._output import echo

HELP = ("compare Integrative CAM variants, baselines and controls on held-out synthetic dark "
        "and bright lesions with distractors (3-D brains) or on synthetic radiographs with a "
        "known finding (2-D): pointing game, counterfactual deletion, energy, distractor hits, "
        "cascading randomisation, runtime; one or more models")

log = logging.getLogger(__name__)

#: Files written per model (in ``<out>/<model name>/``) and for the whole run (``<out>/``).
OUTPUTS = ("summary.csv", "summary.md", "per_volume.csv", "settings.json")
RUN_OUTPUTS = ("summary.md", "ranking.csv", "settings.json")
DEFAULT_CONFIGS = (Path("configs/eval_lesionnet.yaml"), Path("configs/eval_resnet.yaml"))
#: The benchmarks (``--suite``) and the configs each runs without ``--config``.
SUITES = {
    "brains": DEFAULT_CONFIGS,  # 3-D: icam_med.evaluation.synthetic.EvalSynthesizer
    "radiographs": (Path("configs/demo2d.yaml"),),  # 2-D: icam_med.evaluation.radiograph_suite
}
#: Written per model by the radiograph suite only: the model's answer on the negatives.
NEGATIVES_CSV = "negatives.csv"
#: Options retired with issue 11 (the blurred-baseline deletion could not tell an oracle
#: map from a random one), with what replaces them.
RETIRED = {
    "baseline": "deletion now copies voxels from each volume's healthy twin (no baseline image)",
    "blur_sigma_mm": "deletion now copies voxels from each volume's healthy twin (no blur)",
    "baseline_value": "deletion now copies voxels from each volume's healthy twin",
    "steps": "use --deletion-step and --deletion-max (fractions of the volume)",
    "no_control": "name the rows to run with --methods (e.g. 'default,baselines')",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, action="append", default=None,
                        help="run configuration with the model and its preprocessing; repeat for "
                             "several models (default: configs/eval_lesionnet.yaml and "
                             "configs/eval_resnet.yaml; configs/demo2d.yaml with --suite "
                             "radiographs)")
    parser.add_argument("--suite", choices=tuple(SUITES), default=None,
                        help="the benchmark: 'brains' (3-D synthetic brain volumes, dark and bright "
                             "lesions, distractors) or 'radiographs' (2-D synthetic chest "
                             "radiographs with one bright finding); default: from the configs' "
                             "dimensions (brains without --config)")
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder: <model name>/{summary.csv, summary.md, "
                             "per_volume.csv, settings.json} per model, and summary.md, "
                             "ranking.csv, settings.json for the run")
    parser.add_argument("--n-volumes", type=_args.positive_int, default=100,
                        help="scans with a finding per model: brain volumes alternately dark and "
                             "bright, or radiographs (default 100)")
    parser.add_argument("--n-negatives", type=_args.non_negative_int, default=None,
                        help="radiographs without a finding on which the model's answer is "
                             "recorded (negatives.csv; no map is scored on them); radiograph "
                             "suite only (default: as many as --n-volumes)")
    parser.add_argument("--split", choices=("validation", "test"), default="test",
                        help="synthetic split: 'validation' to choose, 'test' (held out) for the "
                             "table (default test)")
    parser.add_argument("--seed", type=_args.non_negative_int, default=0,
                        help="synthesizer seed; must match the training seed for the splits to "
                             "be held out (default 0)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated row labels or groups (default, variants, "
                             "baselines, single-layer, controls); default: all rows")
    parser.add_argument("--default-options", default=None,
                        help="JSON options of the 'integrative (default)' row, e.g. "
                             "'{\"layer_weighting\": \"net\", \"fusion\": \"multiplicative\"}' "
                             "(default: the engine's current defaults, written out)")
    parser.add_argument("--variant-bias", default="signed,complete",
                        help="bias modes screened at score weighting in the variant grid "
                             "(default 'signed,complete'; modes the engine lacks are skipped)")
    parser.add_argument("--deletion-max", type=_args.positive_float, default=0.05,
                        help="counterfactual deletion runs over this fraction of the volume "
                             "(default 0.05)")
    parser.add_argument("--deletion-step", type=_args.positive_float, default=0.0025,
                        help="deletion step, a fraction of the volume (default 0.0025)")
    parser.add_argument("--tolerance-mm", type=_args.positive_float, default=None,
                        help="pointing-game and distractor tolerance (default: one model voxel, "
                             "4 mm for the brains, 1.6 mm for the radiographs at their nominal "
                             "0.4 mm spacing)")
    parser.add_argument("--n-randomisation", type=_args.non_negative_int, default=10,
                        help="volumes (the first ones) that get the cascading randomisation "
                             "check; 0 skips it (default 10)")
    parser.add_argument("--no-randomisation", action="store_true",
                        help="skip the randomisation check (same as --n-randomisation 0)")
    parser.add_argument("--n-boot", type=_args.positive_int, default=2000, help="bootstrap resamples")
    parser.add_argument("--device", default="cpu", type=_args.device, help="torch device (default cpu)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    # Retired options: still parsed (with their old type checks) so that using one gives
    # a clear message instead of argparse's "unrecognized arguments".
    parser.add_argument("--baseline", choices=("blur", "constant"), default=None,
                        help=argparse.SUPPRESS)
    parser.add_argument("--blur-sigma-mm", type=_args.positive_float, default=None,
                        help=argparse.SUPPRESS)
    parser.add_argument("--baseline-value", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=_args.positive_int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-control", action="store_true", default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    import torch

    from icam_med.config import load_config
    from icam_med.evaluation import metrics
    from icam_med.evaluation.evaluate import (
        SummaryTable,
        engine_default_options,
        evaluate,
        method_rows,
        rank_variants,
        ranking_markdown,
        select_rows,
        variant_grid,
    )
    from icam_med.io.atomic import atomic_write_text, check_writable
    from icam_med.models import load_model

    for name, replacement in RETIRED.items():
        if getattr(args, name, None) not in (None, False):
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} was retired with the evaluation of issue 11: {replacement}. "
                             "See docs/evaluation.md.")
    default_options = engine_default_options()
    if args.default_options:
        try:
            default_options = json.loads(args.default_options)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--default-options is not valid JSON ({exc}); give an object such "
                             "as '{\"layer_weighting\": \"net\"}'.") from exc
        if not isinstance(default_options, dict):
            raise ValueError(f"--default-options must be a JSON object, got {args.default_options!r}.")
    if args.deletion_step > args.deletion_max or args.deletion_max > 1:
        raise ValueError(f"need 0 < --deletion-step <= --deletion-max <= 1, got "
                         f"{args.deletion_step} and {args.deletion_max}.")
    bias = [b.strip() for b in args.variant_bias.split(",") if b.strip()]
    fractions = metrics.deletion_fractions(args.deletion_max, args.deletion_step)
    n_random = 0 if args.no_randomisation else args.n_randomisation
    configs = list(args.config or SUITES[args.suite or "brains"])
    cfgs = [load_config(c) for c in configs]
    suite = _suite(args.suite, configs, cfgs)
    if suite == "brains" and args.n_negatives is not None:
        raise ValueError("--n-negatives belongs to the radiograph suite (the brain suite scores "
                         "positives only); drop it or add --suite radiographs with a 2-D config.")
    n_negatives = args.n_volumes if args.n_negatives is None else args.n_negatives
    names = [c.model.name for c in cfgs]
    if len(set(names)) != len(names):
        raise ValueError(f"the configs name the same model twice ({names}); each model needs its "
                         "own name (its outputs go to <out>/<model name>/).")
    out = Path(args.out)
    per_model = OUTPUTS + ((NEGATIVES_CSV,) if suite == "radiographs" else ())
    targets = [out / n / f for n in names for f in per_model] + [out / f for f in RUN_OUTPUTS]
    for path in targets:  # refuse before any work
        check_writable(path, overwrite=args.overwrite)
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    variants = variant_grid(bias_screen=bias)

    loaded = []
    for cfg_path, cfg in zip(configs, cfgs, strict=True):  # every model and row set checked first
        model, info = load_model(cfg.model, device=args.device)
        target = info.labels.index("present") if "present" in info.labels else 1
        if suite == "radiographs":
            case = _radiograph_case(cfg_path, cfg, info, target, args, n_negatives)
        else:
            case = _brain_case(cfg_path, cfg, info, target, args)
        rows = method_rows(model, case["shape"], default_options=default_options,
                           variants=variants)
        if wanted is not None:
            rows = select_rows(rows, wanted)
        if not rows:
            raise ValueError(f"--methods {args.methods!r} selects no row for {cfg.model.name}.")
        loaded.append((cfg_path, cfg, model, info, case, rows))

    t_run = time.perf_counter()
    tables, sections, run_models = [], [], []
    for cfg_path, cfg, model, info, case, rows in loaded:
        tolerance = args.tolerance_mm if args.tolerance_mm is not None else case["tolerance_mm"]
        volumes = case["volumes"]

        def progress(i: int, name: str, model_name: str = cfg.model.name) -> None:
            echo(f"[{model_name} {i + 1}/{args.n_volumes}] {name}", file=sys.stderr, flush=True)

        t0 = time.perf_counter()
        result = evaluate(model, volumes(), rows, fractions=fractions,
                          tolerance_mm=tolerance, n_randomisation=n_random,
                          n_boot=args.n_boot, seed=args.seed, progress=progress)
        elapsed = time.perf_counter() - t0
        first = rows[0].label
        n_correct = sum(1 for r in result.rows if r["method"] == first
                        and r["predicted"] == r["target"])
        result.settings.update({
            "config": str(cfg_path),
            "model": info.to_dict(),
            "suite": suite,
            "data": case["data"],
            "model_correct_on_evaluated": n_correct,
            "elapsed_seconds": round(elapsed, 1),
            "command": "icam-med evaluate " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else None,
        })
        folder = out / cfg.model.name
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        if suite == "radiographs":
            negatives = case["negatives"](model)
            n_absent = sum(1 for r in negatives if r["predicted"] != case["target"])
            result.settings["negatives"] = {
                "n": len(negatives), "model_said_absent": n_absent,
                "p_present_mean": (round(sum(r["p_target"] for r in negatives) / len(negatives),
                                         4) if negatives else None)}
            title = (f"{cfg.model.name} ({args.split} split, {result.settings['n_volumes']} "
                     f"radiographs with a finding, model correct on {n_correct}; "
                     f"{len(negatives)} without, model correct on {n_absent})")
            md = result.summary_markdown(title, by_polarity=False)
            files.append((NEGATIVES_CSV, _negatives_csv(negatives)))
        else:
            title = (f"{cfg.model.name} ({args.split} split, {result.settings['n_volumes']} "
                     f"volumes; model correct on {n_correct})")
            md = result.summary_markdown(title)
        files = [("summary.csv", result.summary_csv()), ("summary.md", md),
                 ("per_volume.csv", result.rows_csv()),
                 ("settings.json", json.dumps(result.settings, indent=2, default=str) + "\n"),
                 *files]
        for fname, text in files:
            atomic_write_text(folder / fname, text, overwrite=args.overwrite)
        tables.append((cfg.model.name, SummaryTable.from_result(result)))
        sections.append(md)
        run_models.append({"name": cfg.model.name, "config": str(cfg_path),
                           "weights_sha256": info.to_dict().get("weights_sha256"),
                           "elapsed_seconds": round(elapsed, 1), "model_correct": n_correct})
        echo(md)
        if suite == "radiographs":
            neg = result.settings["negatives"]
            echo(f"{cfg.model.name}: model correct on {n_correct}/{result.settings['n_volumes']} "
                 f"radiographs with a finding and {neg['model_said_absent']}/{neg['n']} "
                 f"without; {elapsed:.0f} s")
        else:
            echo(f"{cfg.model.name}: model correct on {n_correct}/"
                 f"{result.settings['n_volumes']} volumes; {elapsed:.0f} s")

    ranking = []
    if any(tables[0][1].labels(("variant",))):
        ranking = rank_variants(tables)
    ranking_csv = "rank,label,mean_rank,runtime_ms\n" + "".join(
        f"{i},\"{r['label']}\",{r['mean_rank']:.4f},{r['runtime_ms']:.1f}\n"
        for i, r in enumerate(ranking, 1))
    text = "\n".join(sections)
    if ranking:
        text += ("\n### Variants ranked (mean rank over pointing game and counterfactual deletion "
                 "AUC, dark and bright, every model; ties broken by runtime)\n\n"
                 + ranking_markdown(ranking))
    run_settings = {"models": run_models, "suite": suite, "split": args.split,
                    "n_volumes": args.n_volumes,
                    "n_negatives": n_negatives if suite == "radiographs" else None,
                    "seed": args.seed, "default_options": default_options,
                    "variant_bias": bias, "deletion_fractions": list(fractions),
                    "n_randomisation": n_random, "elapsed_seconds":
                    round(time.perf_counter() - t_run, 1),
                    "torch_threads": torch.get_num_threads()}
    atomic_write_text(out / "summary.md", text, overwrite=args.overwrite)
    atomic_write_text(out / "ranking.csv", ranking_csv, overwrite=args.overwrite)
    atomic_write_text(out / "settings.json", json.dumps(run_settings, indent=2) + "\n",
                      overwrite=args.overwrite)
    if ranking:
        echo(ranking_markdown(ranking, top=10))
    echo(f"wrote {out}/ ({', '.join(names)})")
    return 0


def _dims(cfg: Any) -> int:
    """The spatial dimensions of a config's model input (3 when it states none)."""
    if cfg.model.spatial_size:
        return len(cfg.model.spatial_size)
    return int(cfg.model.args.get("spatial_dims", 3))


def _suite(requested: str | None, paths: list[Path], cfgs: list[Any]) -> str:
    """The benchmark for these configs: the one asked for, else by their dimensions.

    Raises:
        ValueError: a config's dimensions do not fit the suite (or the configs mix 2-D and
            3-D models), naming the config and the fix.
    """
    dims = {str(p): _dims(c) for p, c in zip(paths, cfgs, strict=True)}
    want = {"brains": 3, "radiographs": 2}
    if requested is None:
        found = set(dims.values())
        if len(found) > 1:
            raise ValueError(f"the configs mix 2-D and 3-D models ({dims}); evaluate them in "
                             "separate runs (--suite radiographs for 2-D, brains for 3-D).")
        requested = "radiographs" if found == {2} else "brains"
    wrong = [p for p, d in dims.items() if d != want[requested]]
    if wrong:
        raise ValueError(f"{wrong[0]} is a {dims[wrong[0]]}-D model but the {requested} suite "
                         f"needs {want[requested]}-D models; use --suite "
                         f"{'radiographs' if dims[wrong[0]] == 2 else 'brains'} (or leave --suite "
                         "out: it follows the configs).")
    return requested


def _brain_case(cfg_path: Path, cfg: Any, info: Any, target: int,
                args: argparse.Namespace) -> dict[str, Any]:
    """The 3-D benchmark for one model: its volumes, shape, tolerance and data settings."""
    import torch

    from icam_med.evaluation.evaluate import EvalVolume
    from icam_med.evaluation.synthetic import (
        POLARITIES,
        EvalSynthesizer,
        input_space_synthesizer,
        normalise_with_twin,
    )

    synth, intensity = input_space_synthesizer(cfg.preprocessing, seed=args.seed,
                                               synthesizer=EvalSynthesizer)
    if info.spatial_size and tuple(info.spatial_size) != synth.shape:
        raise ValueError(f"{cfg_path}: the preprocessing yields {synth.shape} but the model "
                         f"expects {tuple(info.spatial_size)}.")
    spacing = tuple(float(s) for s in synth.spacing)

    def volumes() -> Any:
        for i in range(args.n_volumes):
            vol = synth(i, split=args.split, label=1, polarity=POLARITIES[i % 2])
            x, twin = normalise_with_twin(vol.image, vol.twin, intensity)
            yield EvalVolume(x=torch.from_numpy(x), mask=torch.from_numpy(vol.mask),
                             target=target, spacing=spacing, twin=torch.from_numpy(twin),
                             distractor_mask=torch.from_numpy(vol.distractor_mask),
                             polarity=vol.polarity, name=f"{args.split}-{i:04d}")

    data = {"generator": "icam_med.evaluation.synthetic.EvalSynthesizer on the MNI152 "
                         "2009 template", "split": args.split, "seed": args.seed,
            "label": "present", "polarity": "volume i: ('hypo', 'hyper')[i % 2]",
            "input_spacing_mm": list(spacing), "input_shape": list(synth.shape)}
    return {"shape": synth.shape, "volumes": volumes, "tolerance_mm": 4.0, "data": data,
            "target": target}


def _radiograph_case(cfg_path: Path, cfg: Any, info: Any, target: int, args: argparse.Namespace,
                     n_negatives: int) -> dict[str, Any]:
    """The 2-D benchmark for one model (:mod:`icam_med.evaluation.radiograph_suite`)."""
    from icam_med.evaluation import radiograph_suite as rs

    size = tuple(info.spatial_size or ())
    if len(size) != 2:
        raise ValueError(f"{cfg_path}: the radiograph suite needs the model's 2-D input size "
                         "in the config (model.input.spatial_size: [columns, rows]).")
    # One case through the preprocessing now: a config that does not land on the model's
    # input is refused before any work.
    first = next(rs.radiograph_volumes(cfg.preprocessing, size, 1, target=target,
                                       split=args.split, seed=args.seed))

    def volumes() -> Any:
        return rs.radiograph_volumes(cfg.preprocessing, size, args.n_volumes, target=target,
                                     split=args.split, seed=args.seed)

    def negatives(model: Any) -> list[dict[str, Any]]:
        return rs.negative_predictions(model, cfg.preprocessing, size, n_negatives,
                                       target=target, split=args.split, seed=args.seed)

    data = rs.data_settings(args.split, args.seed, size, args.n_volumes, n_negatives)
    data["input_spacing_mm"] = list(first.spacing)
    data["input_shape"] = list(size)
    return {"shape": size, "volumes": volumes, "negatives": negatives,
            "tolerance_mm": max(first.spacing), "data": data, "target": target}


def _negatives_csv(rows: list[dict[str, Any]]) -> str:
    """The model's answer on each negative radiograph, as CSV."""
    lines = ["case,stream,p_present,predicted"]
    lines += [f"{r['case']},\"{r['stream']}\",{r['p_target']:.6f},{r['predicted']}" for r in rows]
    return "\n".join(lines) + "\n"
