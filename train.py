"""Train a jaxllm model.

    python train.py --config configs/tiny.json --out_dir out/tiny
    python train.py --config configs/default.json --out_dir out/default --max_steps 20 --lr=3e-3
    python train.py --out_dir out/tiny --resume          # continue from the latest checkpoint

Any field of the preset's "model" or "train" section can be overridden as `--field=value`
or `--field value` (typed by the field; see jaxllm/config.py). OUT_DIR ends up usable as
`python sample.py --checkpoint OUT_DIR`. Bad input exits with code 2 and one line naming the
problem; a NaN/inf loss stops the run with exit code 1, keeping the last good checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from jaxllm.cli import Parser, fail


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    p = Parser(
        prog="train.py",
        description="Train a jaxllm model. Other --field=value flags override config fields.",
        allow_abbrev=False,
    )
    p.add_argument("--config", help="preset JSON file (configs/*.json); optional with --resume")
    p.add_argument("--out_dir", required=True, help="run directory: checkpoints, metrics, the model")
    p.add_argument("--resume", action="store_true", help="continue the run in --out_dir from its latest checkpoint")
    p.add_argument("--no_progress", action="store_true", help="no progress bar (metrics still go to metrics.jsonl)")
    p.add_argument("--no_compile_cache", action="store_true", help="do not keep compiled programs on disk")
    args, overrides = p.parse_known_args(argv)
    if args.config is None and not args.resume:
        p.error("the following arguments are required: --config (or --resume to continue a run)")
    return args, overrides


def quiet_closed_loop_reports(report) -> None:
    """When a damaged checkpoint fails to restore, TensorStore reads still in flight report
    into Orbax's already-closed event loop; after our one-line error those are noise."""
    if not (report.exc_type is RuntimeError and "Event loop is closed" in str(report.exc_value)):
        sys.__unraisablehook__(report)


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    sys.unraisablehook = quiet_closed_loop_reports
    import jaxllm  # after parsing: --help and flag errors stay instant
    from jaxllm import train_loop
    from jaxllm.compilation import enable_persistent_cache
    from jaxllm.config import apply_overrides, load_preset

    try:
        if args.config:
            cfg, tcfg, description = load_preset(args.config)
        else:
            (cfg, tcfg), description = train_loop.read_run(args.out_dir), "resumed run"
        cfg, tcfg = apply_overrides(cfg, tcfg, overrides)
        if not args.no_compile_cache:
            try:
                enable_persistent_cache()
            except jaxllm.CacheError as e:  # a cache others can write could hand XLA their code: go without
                print(f"train.py: warning: {e}; running without the persistent compilation cache", file=sys.stderr)
        print(f"train.py: {args.config or args.out_dir}: {description}")
        train_loop.run(cfg, tcfg, args.out_dir, resume=args.resume, progress=not args.no_progress)
    except jaxllm.TrainingError as e:  # the run itself failed (exit 1), not its input
        fail("train.py", str(e))
        return 1
    except jaxllm.JaxllmError as e:
        return fail("train.py", str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
