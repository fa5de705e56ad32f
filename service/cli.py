"""The ``flaircad`` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESEARCH_NOTICE = "flaircad: RESEARCH USE ONLY, NOT FOR DIAGNOSIS."


def _phantom(args: argparse.Namespace) -> int:
    # Imported here so that `flaircad --help` and the service never pay for (or need) it.
    from model_export.phantoms import write_dicom_series

    try:
        files = write_dicom_series(args.label, args.seed, args.out, variant=args.variant,
                                   slices=args.slices, compress=args.compress)
    except ValueError as error:  # e.g. a codec pydicom cannot encode here
        print(f"flaircad phantom: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"label": args.label, "seed": args.seed, "variant": args.variant,
                      "compress": args.compress, "n_instances": len(files),
                      "out": str(args.out)}))
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app
    from service.config import Settings

    overrides = {"model_path": args.model} if args.model else {}
    settings = Settings(**overrides)
    print(RESEARCH_NOTICE, file=sys.stderr)
    uvicorn.run(create_app(settings), host=args.host or settings.host,
                port=args.port or settings.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flaircad",
        description="MS vs cSVD on T2-FLAIR MRI with Grad-CAM overlays. " + RESEARCH_NOTICE,
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
    phantom.set_defaults(func=_phantom)

    serve = commands.add_parser(
        "serve", help="run the HTTP service",
        description="Run the flaircad HTTP service (settings from FLAIRCAD_* variables).",
    )
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--model", type=Path, help="ONNX model (default: the bundled demo)")
    serve.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
