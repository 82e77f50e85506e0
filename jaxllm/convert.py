"""Command line conversions: `python -m jaxllm.convert export --checkpoint DIR --out HF_DIR`.

Turns a jaxllm checkpoint (a train.py output) into a Hugging Face directory: Llama, Mistral,
Qwen2 or Gemma, whichever architecture has the model's options (`hf.export_hf`).
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxllm.cli import Parser, fail
from jaxllm.errors import JaxllmError


def main(argv=None) -> int:
    """python -m jaxllm.convert export --checkpoint DIR --out HF_DIR  (a train.py output -> transformers)."""
    parser = Parser(prog="python -m jaxllm.convert", description="Export a jaxllm checkpoint to the HF layout.")
    parser.add_argument("command", choices=["export"])
    parser.add_argument("--checkpoint", required=True, help="a jaxllm checkpoint directory")
    parser.add_argument("--out", required=True, help="where to write the HF directory")
    args = parser.parse_args(argv)
    # JAX is imported once the flags are good
    from jaxllm.checkpoint import load_checkpoint
    from jaxllm.hf import export_hf

    try:
        params, cfg, tokenizer = load_checkpoint(args.checkpoint)
        export_hf(args.out, params, cfg, tokenizer)
    except JaxllmError as e:
        return fail(parser.prog, str(e))
    architecture = json.loads((Path(args.out) / "config.json").read_text())["architectures"][0]
    print(f"wrote {args.out} ({architecture})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
