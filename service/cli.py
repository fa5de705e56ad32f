"""The ``flaircad`` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from service.core.outputs import DicomOutput, parse_outputs

if TYPE_CHECKING:  # the subcommands import what they need when they run
    from service.core.config import Settings
    from service.core.flair import RuleSet
    from service.core.volume import SeriesOutcome

RESEARCH_NOTICE = "flaircad: RESEARCH USE ONLY, NOT FOR DIAGNOSIS."


def _settings(command: str) -> Settings | None:
    """The FLAIRCAD_* settings, or None after saying on stderr which ones are invalid (the
    command then exits 2 instead of starting)."""
    from pydantic import ValidationError

    from service.core.config import Settings

    try:
        return Settings()
    except ValidationError as error:
        for problem in error.errors():
            name = "FLAIRCAD_" + "_".join(str(p) for p in problem["loc"][:1]).upper()
            print(f"flaircad {command}: invalid setting {name}: {problem['msg']}",
                  file=sys.stderr)
        return None


def _phantom(args: argparse.Namespace) -> int:
    # Imported here so that `flaircad --help` and the service never pay for (or need) it.
    from dataclasses import asdict

    from service.phantoms import Shift, write_dicom_series, write_lesion_seg

    seg_path: Path | None = args.lesion_seg
    if seg_path is not None and seg_path.resolve().is_relative_to(args.out.resolve()):
        # OUT/*.dcm is posted as one series: the SEG, a series of its own, must not be in it
        print(f"flaircad phantom: --lesion-seg {seg_path} is inside --out {args.out}; write "
              "it outside the series folder", file=sys.stderr)
        return 2
    try:
        shift = Shift(noise_scale=args.noise_scale, fat_scale=args.fat_scale,
                      contrast=args.contrast, lesions=args.lesions)
        files, truth = write_dicom_series(
            args.label, args.seed, args.out, variant=args.variant, slices=args.slices,
            compress=args.compress, shift=shift, matrix=args.matrix, pixel_mm=args.pixel_mm,
            slice_thickness_mm=args.slice_thickness_mm, truth=True)
        if seg_path is not None:
            write_lesion_seg(files, truth, seg_path)
    except ValueError as error:  # e.g. a codec pydicom cannot encode here
        print(f"flaircad phantom: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"label": args.label, "seed": args.seed, "variant": args.variant,
                      "compress": args.compress, "n_instances": len(files),
                      "out": str(args.out), "shift": asdict(shift),
                      "lesion_voxels": int(truth.lesion_mask.sum()),
                      "lesion_seg": None if seg_path is None else str(seg_path)}))
    return 0


def _outputs(text: str) -> frozenset[DicomOutput]:
    try:
        return parse_outputs(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _serve(args: argparse.Namespace) -> int:
    import logging.config
    import os
    import shutil
    import tempfile

    import uvicorn

    from service.runtime import logs

    # Command-line values travel as FLAIRCAD_* variables: with --workers the worker processes
    # build their own Settings from the environment.
    for name, value in (("MODEL_PATH", args.model), ("HOST", args.host), ("PORT", args.port),
                        ("HTTP_WORKERS", args.workers)):
        if value is not None:
            os.environ[f"FLAIRCAD_{name}"] = str(value)
    settings = _settings("serve")
    if settings is None:
        return 2
    refusal = _serve_preflight(settings)
    if refusal is not None:  # one clear line, before any log, spool or model is touched
        print(f"flaircad serve: {refusal}", file=sys.stderr)
        return 2
    log_config = logs.config(settings.log_level)
    logging.config.dictConfig(log_config)
    logging.getLogger("service.cli").warning(RESEARCH_NOTICE)
    workers = settings.http_workers
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    created = False
    if workers > 1 and not metrics_dir:
        metrics_dir, created = tempfile.mkdtemp(prefix="flaircad-metrics-"), True
    if metrics_dir:
        # prometheus-client multiprocess mode: the variable must be set before any worker
        # imports prometheus_client, and the folder must not hold a previous run's files.
        os.makedirs(metrics_dir, exist_ok=True)
        for stale in Path(metrics_dir).glob("*.db"):
            stale.unlink()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        uvicorn.run(
            "service.runtime.app:create_app", factory=True, host=settings.host, port=settings.port,
            workers=workers, log_config=log_config, log_level=settings.log_level.lower(),
            access_log=False,  # the request middleware logs each request (route template)
            # X-Forwarded-For/-Proto only from the configured proxies: uvicorn's default
            # believes them from any 127.0.0.1 peer, which any local process (or a sidecar) is
            proxy_headers=bool(settings.trusted_proxies),
            forwarded_allow_ips=settings.trusted_proxies,
            # h11 with bounded heads and timeouts (service/intake/http_limits.py): httptools bounds
            # neither the request line nor the headers
            http="service.intake.http_limits:BoundedH11Protocol",
            h11_max_incomplete_event_size=settings.http_max_header_bytes,
            # connections still open once the analyses have drained get this long
            timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_s)))
    finally:
        if created and metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _serve_preflight(settings: Settings) -> str | None:
    """Why ``flaircad serve`` cannot start, checked before anything is opened: no
    credentials with authentication on, unreadable credentials, or a port already in use
    (uvicorn would find that out only after the app had started and logged "ready")."""
    import socket

    from service.runtime.auth import Authenticator, check_configured

    try:
        check_configured(settings, Authenticator.from_settings(settings))
    except (RuntimeError, OSError, ValueError) as error:
        return str(error)
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((settings.host, settings.port))
        except OSError as error:
            return (f"cannot listen on {settings.host}:{settings.port}: {error.strerror} "
                    "(FLAIRCAD_HOST, FLAIRCAD_PORT)")
    return None


def _inspect_record(
    outcome: SeriesOutcome, rules: RuleSet, nifti_dir: Path | None
) -> dict[str, object]:
    from service.core.volume import nifti_layout, orientation_code, to_nifti

    info = outcome.info
    match = rules.evaluate(info.attributes)
    record: dict[str, object] = {
        "series_instance_uid": info.series_instance_uid,
        "series_description": info.series_description,
        "modality": info.modality,
        "is_flair": match.is_flair,
        "flair_rule": match.rule,
        "shape": None,
        "spacing_mm": None,
        "affine_ras": None,
        "orientation": None,
        "transfer_syntaxes": list(info.transfer_syntaxes),
        "n_instances": info.n_instances,
        "warnings": [str(w) for w in outcome.warnings],
        "nifti_path": None,
        "rejection": outcome.rejection.to_json() if outcome.rejection else None,
    }
    volume = outcome.volume
    if volume is not None:
        data, affine_ras = nifti_layout(volume)
        record["shape"] = list(data.shape)
        record["spacing_mm"] = [round(float(v), 6) for v in volume.spacing_mm[::-1]]
        record["affine_ras"] = [[round(float(v), 6) for v in row] for row in affine_ras]
        record["orientation"] = orientation_code(volume.affine_lps[:, [2, 1, 0, 3]])
        if nifti_dir is not None:
            import nibabel

            path = nifti_dir / f"{info.series_instance_uid}.nii.gz"
            nibabel.save(to_nifti(volume), path)
            record["nifti_path"] = str(path)
    return record


def _inspect(args: argparse.Namespace) -> int:
    from service.core.flair import RulesError, load_rules
    from service.core.volume import load_folder

    folder: Path = args.series_dir
    if not folder.is_dir():
        print(f"flaircad inspect: {folder} is not a folder", file=sys.stderr)
        return 2
    settings = _settings("inspect")
    if settings is None:
        return 2
    try:
        rules = load_rules(args.rules or settings.flair_rules)
    except (OSError, RulesError) as error:
        print(f"flaircad inspect: FLAIR rules: {error}", file=sys.stderr)
        return 2
    if args.nifti_dir is not None:
        try:
            args.nifti_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            print(f"flaircad inspect: --nifti-dir: {error}", file=sys.stderr)
            return 2
    outcomes, skipped = load_folder(folder)
    for skip in skipped:
        print(f"flaircad inspect: skipped {skip}", file=sys.stderr)
    for outcome in outcomes:
        print(json.dumps(_inspect_record(outcome, rules, args.nifti_dir)), flush=True)
    if not outcomes:
        print(f"flaircad inspect: no DICOM image series in {folder}", file=sys.stderr)
        return 3
    return 3 if any(o.rejection is not None for o in outcomes) else 0


def _analyze(args: argparse.Namespace) -> int:
    from service.core.flair import RulesError, load_rules
    from service.core.reading import iter_folder
    from service.pipeline.analysis import AnalysisRejected, analyse
    from service.pipeline.engine import Engine
    from service.storage.results import write_outputs

    folder: Path = args.series_dir
    if not folder.is_dir():
        print(f"flaircad analyze: {folder} is not a folder", file=sys.stderr)
        return 2
    settings = _settings("analyze")
    if settings is None:
        return 2
    try:
        rules = load_rules(args.rules or settings.flair_rules)
    except (OSError, RulesError) as error:
        print(f"flaircad analyze: FLAIR rules: {error}", file=sys.stderr)
        return 2
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(f"flaircad analyze: --out: {error}", file=sys.stderr)
        return 2
    model_path = args.model or settings.model_path
    if not Path(model_path).is_file():
        print(f"flaircad analyze: no model file {model_path}", file=sys.stderr)
        return 2
    try:
        # onnxruntime prints its CUDA library probing to stdout, which carries the result JSON
        with contextlib.redirect_stdout(sys.stderr):
            engine = Engine(model_path, settings.providers)
    except Exception as error:  # onnxruntime's own error types, or a model without the contract
        print(f"flaircad analyze: cannot load the model {model_path}: {error}", file=sys.stderr)
        return 2
    print(RESEARCH_NOTICE, file=sys.stderr)
    try:
        analysis = analyse(iter_folder(folder), engine, rules=rules,
                           accept_non_flair=args.accept_non_flair or settings.accept_non_flair,
                           explanation=args.explanation or settings.explanation,
                           outputs=args.outputs or settings.outputs,
                           series_uid=args.series, pick_flair=True)
    except AnalysisRejected as rejected:
        print(json.dumps(rejected.to_json()), file=sys.stderr)
        return 3
    write_outputs(analysis, args.out)
    print(json.dumps(analysis.to_json()), flush=True)
    return 0


def _dimse(args: argparse.Namespace) -> int:
    import asyncio
    import logging.config
    import os

    from service.runtime import logs
    from service.runtime.pacs import run_standalone

    for name, value in (("MODEL_PATH", args.model), ("DIMSE_HOST", args.host),
                        ("DIMSE_PORT", args.port), ("DIMSE_AE_TITLE", args.ae_title)):
        if value is not None:
            os.environ[f"FLAIRCAD_{name}"] = str(value)
    if args.allow_calling_ae:
        os.environ["FLAIRCAD_DIMSE_ALLOWED_CALLING_AES"] = json.dumps(args.allow_calling_ae)
    settings = _settings("dimse")
    if settings is None:
        return 2
    if settings.dimse_port is None:
        settings = settings.model_copy(update={"dimse_port": 11112})
    logging.config.dictConfig(logs.config(settings.log_level))
    logging.getLogger("service.cli").warning(RESEARCH_NOTICE)
    return asyncio.run(run_standalone(settings))


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    from service.core.contract import DEFAULT_EXPLANATION, EXPLANATIONS

    parser = argparse.ArgumentParser(
        prog="flaircad",
        description="MS vs cSVD on T2-FLAIR MRI with explanation-map overlays (HiResCAM by "
        "default). " + RESEARCH_NOTICE,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    phantom = commands.add_parser(
        "phantom", help="write a synthetic FLAIR phantom as a DICOM series",
        description="Write a synthetic T2-FLAIR brain phantom (class MS or cSVD) as a DICOM MR "
        "series, one .dcm per instance. Same seed, same files.",
    )
    phantom.add_argument("--label", required=True, choices=("MS", "cSVD"))
    phantom.add_argument("--out", required=True, type=Path, help="folder for the .dcm files")
    phantom.add_argument("--seed", type=int, default=0)
    phantom.add_argument("--slices", type=int, default=None,
                         help="number of slices (default depends on the variant)")
    phantom.add_argument("--variant", choices=("axial", "sagittal", "oblique"), default="axial")
    phantom.add_argument("--compress", nargs="?", const="jpegls", default=None,
                         choices=("jpegls", "jpeg2000", "rle", "jpeg-lossless"),
                         help="lossless compression (bare flag: JPEG-LS lossless)")
    phantom.add_argument("--lesion-seg", type=Path, default=None, metavar="PATH",
                         help="also write the exact lesion mask as a DICOM Segmentation of the "
                         "series to PATH (a file outside --out: it is a series of its own)")
    shift = phantom.add_argument_group(
        "distribution shift", "move the phantom off the training distribution (defaults: none)")
    shift.add_argument("--noise-scale", type=_positive_float, default=1.0, metavar="X",
                       help="multiply the noise level (the 'higher noise' cohort uses 2)")
    shift.add_argument("--fat-scale", type=_positive_float, default=1.0, metavar="X",
                       help="multiply the fat intensity (the 'brighter fat' cohort uses 1.25)")
    shift.add_argument("--contrast", choices=("flair", "t1"), default="flair",
                       help="t1: T1-weighted tissue intensities under the FLAIR header")
    shift.add_argument("--lesions", choices=("default", "none", "mass"), default="default",
                       help="none: no lesion; mass: one large mass with oedema instead")
    grid = phantom.add_argument_group("axial grid", "the axial variant only")
    grid.add_argument("--matrix", type=_positive, default=None, metavar="N",
                      help="rows and columns (default 256)")
    grid.add_argument("--pixel-mm", type=_positive_float, default=None, metavar="MM",
                      help="pixel size (default 0.9375)")
    grid.add_argument("--slice-thickness-mm", type=_positive_float, default=None, metavar="MM",
                      help="slice thickness and spacing (default 5)")
    phantom.set_defaults(func=_phantom)

    serve = commands.add_parser(
        "serve", help="run the HTTP service",
        description="Run the flaircad HTTP service (settings from FLAIRCAD_* variables). Logs "
        "are JSON lines on stderr. SIGTERM drains: readiness turns 503, queued and running "
        "analyses finish within FLAIRCAD_SHUTDOWN_GRACE_S, then the server exits.",
    )
    serve.add_argument("--host", help="listen address (FLAIRCAD_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (FLAIRCAD_PORT, default 8000)")
    serve.add_argument("--model", type=Path, help="ONNX model (default: the bundled demo)")
    serve.add_argument("--workers", type=_positive, metavar="N",
                       help="uvicorn worker processes (FLAIRCAD_HTTP_WORKERS, default 1); "
                       "FLAIRCAD_WORKERS is the analysis threads of each")
    serve.set_defaults(func=_serve)

    dimse = commands.add_parser(
        "dimse", help="run the DIMSE listener (C-STORE, C-ECHO) with the analyses, no HTTP",
        description="Receive MR series by DIMSE C-STORE (and answer C-ECHO), analyse each "
        "series once nothing has arrived for FLAIRCAD_STABILITY_WINDOW_S and send the results "
        "to FLAIRCAD_DESTINATIONS, like the service does, without HTTP. Same spool and "
        "database as `flaircad serve` (FLAIRCAD_SPOOL_DIR), so both may run side by side. "
        "SIGTERM/SIGINT drain and stop. " + RESEARCH_NOTICE,
    )
    dimse.add_argument("--port", type=int, help="listen port (FLAIRCAD_DIMSE_PORT, default "
                       "11112)")
    dimse.add_argument("--host", help="listen address (FLAIRCAD_DIMSE_HOST, default "
                       "127.0.0.1)")
    dimse.add_argument("--ae-title", help="called AE title (FLAIRCAD_DIMSE_AE_TITLE, default "
                       "FLAIRCAD)")
    dimse.add_argument("--allow-calling-ae", action="append", metavar="AE",
                       help="accept associations from this calling AE title only (repeat; "
                       "FLAIRCAD_DIMSE_ALLOWED_CALLING_AES; default: any)")
    dimse.add_argument("--model", type=Path, help="ONNX model (default: the bundled demo)")
    dimse.set_defaults(func=_dimse)

    inspect = commands.add_parser(
        "inspect", help="read a DICOM folder: one JSON line per series, optional NIfTI",
        description="Read every DICOM file under SERIES_DIR, group it into series and build each "
        "series' 3D volume. Prints one JSON object per series (JSON Lines): series_instance_uid, "
        "series_description, modality, is_flair, flair_rule, shape, spacing_mm, affine_ras, "
        "orientation, transfer_syntaxes, n_instances, warnings, nifti_path and rejection "
        "(null, or {code, message} when the series is not one 3D volume). shape, spacing_mm "
        "and affine_ras describe the NIfTI array (i = image columns, j = rows, k = slices; "
        "affine to RAS mm, as nibabel reads it). Skipped files are listed on stderr. "
        "Exit status: 0 every series converted, 3 some series rejected (or none found), "
        "2 usage error.",
    )
    inspect.add_argument("series_dir", type=Path, metavar="SERIES_DIR")
    inspect.add_argument("--nifti-dir", type=Path, default=None, metavar="DIR",
                         help="write DIR/<SeriesInstanceUID>.nii.gz per converted series")
    inspect.add_argument("--rules", type=Path, default=None, metavar="JSON",
                         help="FLAIR selection rules (default: FLAIRCAD_FLAIR_RULES or the "
                         "packaged service/rules/flair.json)")
    inspect.set_defaults(func=_inspect)

    analyze = commands.add_parser(
        "analyze", help="analyse one FLAIR series folder: result.json, SC + SR .dcm, preview.png",
        description="Run the analysis the service runs, without a server, on the one DICOM "
        "series under SERIES_DIR: MS vs cSVD probabilities, overlays of an explanation map "
        "(--explanation) as a DICOM "
        "Secondary Capture series (OUT_DIR/sc/IM0001.dcm ...), a Comprehensive SR "
        "(OUT_DIR/sr.dcm), a preview montage (OUT_DIR/preview.png) and OUT_DIR/result.json, "
        "which is also printed. Exit status: 0 done; 3 the series was refused (not one usable "
        "FLAIR MR series; the reason is printed on stderr as JSON with code and message); "
        "2 usage error. " + RESEARCH_NOTICE,
    )
    analyze.add_argument("series_dir", type=Path, metavar="SERIES_DIR")
    analyze.add_argument("--out", required=True, type=Path, metavar="OUT_DIR",
                         help="folder for the outputs (created if needed)")
    analyze.add_argument("--model", type=Path, default=None,
                         help="ONNX model (default: FLAIRCAD_MODEL_PATH or the bundled demo)")
    analyze.add_argument("--rules", type=Path, default=None, metavar="JSON",
                         help="FLAIR selection rules (default: FLAIRCAD_FLAIR_RULES or the "
                         "packaged service/rules/flair.json)")
    analyze.add_argument("--series", default=None, metavar="UID",
                         help="the series to analyse when SERIES_DIR holds several (default: "
                         "the only one, or the only one the FLAIR rules recognise)")
    analyze.add_argument("--accept-non-flair", action="store_true",
                         help="research override: analyse a series no FLAIR rule matches "
                         "(also FLAIRCAD_ACCEPT_NON_FLAIR=1)")
    analyze.add_argument("--explanation", choices=tuple(EXPLANATIONS), default=None,
                         help="the map the overlays and the preview show: hirescam (HiResCAM), "
                         "gradcam (Grad-CAM) or attention (the model's own attention) "
                         f"(default: FLAIRCAD_EXPLANATION or {DEFAULT_EXPLANATION})")
    analyze.add_argument("--outputs", type=_outputs, default=None, metavar="LIST",
                         help="DICOM outputs to write, comma-separated from sc (Secondary "
                         "Capture overlays), pm (Parametric Map), sr (SR) (default: "
                         "FLAIRCAD_OUTPUTS or all three)")
    analyze.set_defaults(func=_analyze)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
