"""The README's main job: compile a model with CQIL (p=2) and generate from it.

    python tools/demo.py [MODEL_DIR] [--p 2] [--prompt TEXT] [-o ENGINE_DIR]

Without MODEL_DIR it uses the project's small trained LLaMA (tests/fixtures/small-llama) when
present, else makes a small random-weight one. It runs the real command lines, printing each:
`cqil-compile --dry-run`, `cqil-compile`, `cqil-check` and `cqil-run`.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "small-llama"


def sh(*cmd: str):
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    rc = subprocess.call(cmd)
    if rc:
        sys.exit(rc)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="HuggingFace checkpoint folder (default: see above)")
    parser.add_argument("--p", type=int, default=2)
    parser.add_argument("--prompt", default="def main(")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("-o", "--output", help="engine directory (default: a temporary folder)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cqil-demo-"))
    model = args.model
    if model is None and (FIXTURE / "config.json").is_file():
        model = str(FIXTURE)
    prompt = ["--prompt", args.prompt]
    if model is None:
        from cqil.testing import random_checkpoint

        model = str(random_checkpoint(work / "tiny-llama", "llama", init_std=0.1, num_hidden_layers=12))
        print(f"made a random-weight LLaMA (no tokenizer) at {model}")
        prompt = ["--input-ids", "1,2,3,4,5"]
    engine = args.output or str(work / "engine")

    sh("cqil-compile", model, "--p", str(args.p), "--dry-run")
    sh("cqil-compile", model, "--p", str(args.p), "-o", engine, "--max-seq-len", "512", "--force")
    sh("cqil-check", engine, "--model", model, "--steps", "8")
    sh("cqil-run", engine, *prompt, "--max-new-tokens", str(args.max_new_tokens))
    print(f"\nengine directory: {engine}")


if __name__ == "__main__":
    main()
