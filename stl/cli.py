"""The ``stl`` command and the error handling shared by the DVC stage scripts.

stl models                      # the model table: names, aliases, parameters, outputs
stl params                      # every params.yaml key with its default and meaning
stl predict models/student/model.pt photos/ cat.jpg --topk 3 [--format json] [--output preds.csv]
stl export models/student/model.pt --format onnx [--tokens] [--output model.onnx]   # torchscript | onnx

Errors in predict and export print one ``error: ...`` line and exit with status 1 (STL_DEBUG=1: traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from stl.distributed import get_rank

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, RuntimeError)


def run_stage(main: Callable[[], object]) -> None:
    """Run a stage's ``main``; a user error prints one ``error: ...`` line and exits with status 1.

    Set ``STL_DEBUG=1`` to get the full traceback instead.
    """
    try:
        main()
    except USER_ERRORS as e:
        if os.environ.get("STL_DEBUG"):
            raise
        rank = get_rank()  # every rank reports: an error on rank 1 alone must not exit silently
        print(f"error: {e}" if rank == 0 else f"error [rank {rank}]: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


def _cmd_models(_: argparse.Namespace) -> None:
    from stl.models import models_markdown_table

    print(models_markdown_table())


def _cmd_params(_: argparse.Namespace) -> None:
    from stl.config import describe_keys

    for key, default, text in describe_keys():
        print(f"{key:32s} {default!s:24.24s} {text}")


def _cmd_predict(args: argparse.Namespace) -> None:
    from stl.evaluate.infer import find_images, format_predictions, predict_files, resolve_device
    from stl.io import write_bytes_atomic
    from stl.models import load_trained_model

    fmt = args.format or ("json" if args.output and args.output.lower().endswith(".json") else "csv")
    files, skipped = find_images(args.paths)  # a missing path fails before the model is loaded
    if skipped:
        print(f"note: skipped {skipped} hidden or non-image-extension entries in the folders given",
              file=sys.stderr)
    if not files:
        raise FileNotFoundError(f"no image files in {' '.join(args.paths)} (extensions: jpg, png, ...)")
    device = resolve_device(args.device)
    model, meta = load_trained_model(args.model, device)
    rows = predict_files(model, meta, files, topk=args.topk, batch_size=args.batch_size, device=device,
                         workers=args.workers, fused=args.fused,
                         **({} if args.fused_weight is None else {"fused_weight": args.fused_weight}))
    failed = sum(bool(r["error"]) for r in rows)
    if failed == len(rows):
        raise RuntimeError(f"none of the {len(rows)} file(s) could be read as an image (reasons above); "
                           "nothing written. Check the paths point at image files")
    text = format_predictions(rows, fmt, args.topk)
    if args.output:
        write_bytes_atomic(args.output, text)
        print(f"wrote {len(rows) - failed} prediction(s) to {args.output}"
              + (f"; {failed} file(s) unreadable (listed with an error)" if failed else ""), file=sys.stderr)
    else:
        sys.stdout.write(text)
        if failed:
            print(f"{failed} of {len(rows)} file(s) unreadable (listed with an error)", file=sys.stderr)


_EXPORT_TOLERANCE = 1e-3  # max |export - PyTorch| accepted; float32 kernels differ by ~1e-6


def _cmd_export(args: argparse.Namespace) -> None:
    from stl.export import export_trained_model

    result = export_trained_model(args.model, args.format, args.output, tokens=args.tokens,
                                  batch_size=args.batch_size, opset=args.opset, tolerance=_EXPORT_TOLERANCE)
    print(f"exported {args.format} ({', '.join(result['outputs'])}) to {result['path']}; "
          f"sidecar {result['sidecar']}")
    print(f"max abs difference vs PyTorch: {result['max_abs_diff']:.3g} (tolerance {_EXPORT_TOLERANCE:g})")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list the registered models and aliases").set_defaults(fn=_cmd_models)
    sub.add_parser("params", help="list every params.yaml key").set_defaults(fn=_cmd_params)

    p = sub.add_parser("predict", help="top-k predictions of a trained model for image files and folders",
                       description="Predict image files and folders (searched recursively) with a trained "
                                   "model file (models/student/model.pt or models/labeler/labeler.pt).")
    p.add_argument("model", metavar="MODEL", help="the trained model file (model.pt / labeler.pt)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    p.add_argument("--topk", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--workers", type=int, default=0, help="image-decoding worker processes (default 0)")
    p.add_argument("--format", choices=("csv", "json"), default=None,
                   help="output format (default: json for an --output ending in .json, else csv)")
    p.add_argument("--output", default=None, help="write here (atomically) instead of stdout")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="token models: class token + W * max over tokens of the aux head (default); "
                        "--no-fused: class token only")
    p.add_argument("--fused-weight", type=float, default=None, metavar="W",
                   help="W of --fused (default 0.5, the STL reference's); give the run's "
                        "evaluate.fused_weight to predict as its evaluate stage scored")
    p.set_defaults(fn=_cmd_predict)

    e = sub.add_parser("export", help="export a trained model to TorchScript or ONNX, checked vs PyTorch",
                       description="Export a trained model file; the export takes normalised images "
                                   "[B, 3, S, S] (dynamic batch) and returns the class logits. A JSON "
                                   "sidecar beside it holds classes, img_size, mean and std.")
    e.add_argument("model", metavar="MODEL", help="the trained model file (model.pt / labeler.pt)")
    e.add_argument("--format", choices=("torchscript", "onnx"), required=True)
    e.add_argument("--output", default=None,
                   help="export path (default: exports/<MODEL's folder>-<MODEL's stem>.onnx or "
                        ".torchscript.pt)")
    e.add_argument("--tokens", action="store_true",
                   help="token models: also output the token map (aux logits [B, N, K])")
    e.add_argument("--batch-size", type=int, default=2, help="batch size of the traced example (default 2)")
    e.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    e.set_defaults(fn=_cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``stl`` console script; returns the exit status (1 after a user error).

    Run as the command (``argv`` None: the process is this command's alone), ``predict`` first makes glibc
    keep freed memory for the next batch (:func:`stl.evaluate.infer.keep_freed_memory`); called with ``argv``
    from Python, the caller's process is left as it is.
    """
    args = _build_parser().parse_args(argv)
    if argv is None and args.fn is _cmd_predict:
        from stl.evaluate.infer import keep_freed_memory

        keep_freed_memory()
    try:
        args.fn(args)
    except (*USER_ERRORS, OSError) as e:  # OSError: e.g. --output in a folder without write permission
        if os.environ.get("STL_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
