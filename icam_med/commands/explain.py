"""``icam-med explain SCAN --config CONFIG --out DIR``: one scan in, map(s) and a summary out."""

from __future__ import annotations

import argparse
import sys

from icam_med.commands import _args
from icam_med.commands._output import echo

HELP = "explain one scan (DICOM series folder, DICOM file or NIfTI): maps on the scan's grid"


def _option(text: str) -> tuple[str, object]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--option expects KEY=VALUE, got {text!r}")
    return key.strip(), yaml.safe_load(value)


def _region(text: str) -> object:
    from icam_med.config import RegionConfig

    try:
        return RegionConfig.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scan", help="a DICOM series folder, a DICOM file or a .nii/.nii.gz file")
    parser.add_argument("--config", required=True, help="YAML run config (model, preprocessing, method)")
    parser.add_argument("--out", help="output folder (created if missing; required unless --list-series)")
    parser.add_argument("--series-uid", help="Series Instance UID to use when the folder holds several")
    parser.add_argument("--volume-index", type=_args.non_negative_int, help="volume of a 4-D NIfTI to explain (0-based)")
    parser.add_argument("--method", help="CAM method, overriding the config's "
                        "(integrative, gradcam, gradcam++, hirescam, layercam)")
    parser.add_argument("--option", action="append", type=_option, default=[], metavar="KEY=VALUE",
                        help="a method option overriding the config's (repeatable), e.g. alpha_fn=sigmoid")
    parser.add_argument("--target", help="class to explain, by index or label (default: the "
                        "config's target.label, else the predicted class); for a segmentation "
                        "network, the output label to explain")
    parser.add_argument("--region", type=_region, metavar="predicted|predicted:LABEL|MASK",
                        help="segmentation networks: the region whose output is explained: "
                        "'predicted' (the voxels predicted as the target label; the default), "
                        "'predicted:LABEL' (those predicted as another label) or a mask file on "
                        "the scan's grid (a file named 'predicted': write ./predicted)")
    parser.add_argument("--layer-maps", action="store_true", help="also write each layer's map as NIfTI")
    parser.add_argument("--device", default="cpu", type=_args.device, help="torch device, e.g. cpu or cuda:0 (default cpu)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing output files that have no audit record "
                        "(audited outputs, pinned by the ledger, are never replaced)")
    parser.add_argument("--list-series", action="store_true",
                        help="list the DICOM series in the SCAN folder and exit")


def run(args: argparse.Namespace) -> int:
    if args.list_series:
        from icam_med.io import list_series

        for s in list_series(args.scan):
            echo(s.line().strip())
        return 0
    if not args.out:
        raise ValueError("--out DIR is required: the folder the maps and summary are written to.")
    from icam_med.explain import explain_scan

    explanation, written = explain_scan(
        args.scan, args.config, args.out, device=args.device, series_uid=args.series_uid,
        volume_index=args.volume_index, method=args.method,
        method_options=dict(args.option) or None, targets=args.target, region=args.region,
        layer_maps=args.layer_maps, overwrite=args.overwrite)
    r = explanation.result
    info = explanation.scan_info
    echo(f"scan: {info.format} {info.modality or ''} shape {list(info.shape)} "
          f"spacing {[round(s, 3) for s in info.spacing]} mm, orientation {info.orientation}")
    for warning in info.warnings:
        echo(f"warning: {warning}", file=sys.stderr)
    predicted = explanation.predicted_label or r.predicted_class
    target = explanation.target_label or r.target_class
    if r.predicted_class is None and explanation.region_info is not None:
        predicted = "a map per label"  # a segmentation output has no single predicted class
    echo(f"method: {r.method}; predicted: {predicted}; explained: {target}; "
         f"score {r.score:.4g}")
    region = explanation.region_info
    if region is not None:
        where = ("mask" if region["source"] == "mask" else
                 f"predicted as {region.get('region_label') or region.get('region_class_index')}")
        echo(f"region: {where}, {region['voxels']} voxels on the scan's grid, "
             f"sha256 {region['sha256'][:12]}...")
    if explanation.sliding_window is not None:
        sw = explanation.sliding_window
        echo(f"sliding window: roi {sw['roi_size']}, overlap {sw['overlap']}, {sw['mode']} "
             f"blending; explained {sw['windows_explained']} of {sw['windows_total']} windows")
    stats = explanation.map_statistics()
    echo(f"map peak at voxel {list(stats.peak_voxel)}, RAS {list(stats.peak_world_ras_mm)} mm")
    for w in written:
        echo(f"wrote {w.path}  ({w.role}, sha256 {w.sha256[:12]}...)")
    return 0
