"""notebooks/colab_tpu.ipynb, run top to bottom on a CPU as CI runs it.

`JAXLLM_NOTEBOOK_SMOKE=1` makes the notebook's parameters cell shrink the TPU preset to a tiny
model and a few steps; every other cell runs as written (the install and Drive cells take their
non-Colab branch). nbclient, nbformat and ipykernel come with the `test` extra: without them this
module fails to import, it does not skip.

The notebook is executed once, in one test, because a module-scoped fixture would run it again
on every pytest-xdist worker that drew one of its tests.
"""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

import nbclient
import nbformat
import numpy as np
from matplotlib.image import imread

from jaxllm import ModelConfig, generate, load_checkpoint
from conftest import REPO

NOTEBOOK = REPO / "notebooks" / "colab_tpu.ipynb"
# Appended to the notebook before it runs: the values the test checks against, read from the kernel.
PROBE = """
import json, sys
print(json.dumps(dict(
    OUT=OUT, SAVE_DIR=SAVE_DIR, MAX_STEPS=MAX_STEPS, RESUME_STEPS=RESUME_STEPS, PROMPT=PROMPT,
    MAX_NEW_TOKENS=MAX_NEW_TOKENS, TEMPERATURE=TEMPERATURE, SEED=SEED, jax_imported="jax" in sys.modules,
)))
"""
# matplotlib's first two default line colours: the train and the validation curve
TRAIN_RGB, VAL_RGB = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)


def execute(out_dir: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    env = {
        **os.environ,
        "JAXLLM_NOTEBOOK_SMOKE": "1",
        "JAXLLM_NOTEBOOK_OUT": str(out_dir),
        # train.py's and sample.py's compiled programs, kept with the suite's (see conftest.py)
        "JAXLLM_CACHE_DIR": str(os.environ.get("JAXLLM_TEST_CACHE", REPO / ".jax_cache")),
    }
    # Jupyter starts a notebook's kernel in the notebook's folder; so does this.
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute(env=env)
    return nb


def code_cells(nb, containing: str = "") -> list:
    return [c for c in nb.cells if c.cell_type == "code" and containing in c.source]


def stdout(cell) -> str:
    return "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


def pngs(cell) -> list[np.ndarray]:
    """The cell's image outputs as RGB uint8 [H, W, 3]."""
    images = [imread(io.BytesIO(base64.b64decode(o.data["image/png"])), format="png") for o in cell.outputs if "image/png" in o.get("data", {})]
    return [(img[..., :3] * 255).round().astype(np.uint8) for img in images]


def pixels_of(img: np.ndarray, rgb: tuple[int, int, int]) -> int:
    return int((np.abs(img.astype(int) - rgb).max(axis=-1) <= 8).sum())


def test_the_colab_notebook_trains_plots_samples_saves_and_resumes_on_a_cpu(tmp_path):
    nb = execute(tmp_path / "run")

    # Every cell ran (nbclient stops at the first error; this also catches a swallowed one).
    assert all(c.execution_count for c in code_cells(nb))
    errors = [o for c in code_cells(nb) for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    values = json.loads(stdout(nb.cells[-1]))
    out, max_steps, resume_steps = Path(values["OUT"]), values["MAX_STEPS"], values["RESUME_STEPS"]
    assert out == tmp_path / "run" and resume_steps > max_steps
    # On a TPU the kernel must leave the chip to train.py and sample.py: only one process can hold it.
    assert not values["jax_imported"], "the notebook's kernel imported JAX"

    # The TPU preset, shrunk, with the attention path a TPU takes: pallas, on whole 128-token tiles.
    preset = json.loads((REPO / "configs" / "tpu_v5e.json").read_text())
    run = json.loads((out / "run.json").read_text())
    assert run["model"]["attention_impl"] == "pallas"
    assert (run["train"]["seq_len"] or run["model"]["max_seq_len"]) % 128 == 0
    assert run["model"]["param_dtype"] == preset["model"]["param_dtype"]
    assert {k: run["train"][k] for k in ("lr", "min_lr_ratio", "weight_decay", "grad_clip")} == {
        k: preset["train"][k] for k in ("lr", "min_lr_ratio", "weight_decay", "grad_clip")
    }

    # Train, then resume: the resumed run starts from the first run's last checkpoint and goes on.
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), steps
    assert max_steps in steps and steps[-1] == resume_steps and any(s > max_steps for s in steps), steps
    log = (out / "train.log").read_text()
    assert f"resumed from step {max_steps}" in log and f"done at step {resume_steps}" in log, log[-2000:]
    assert str(resume_steps) in {p.name for p in (out / "state").iterdir()}

    # The loss curve: each watch cell (train, resume) ends showing both curves.
    watch_cells = code_cells(nb, "watch(training)")
    assert len(watch_cells) == 2
    for cell in watch_cells:
        (img,) = pngs(cell)
        assert pixels_of(img, TRAIN_RGB) > 100 and pixels_of(img, VAL_RGB) > 100

    # Sample, then save: sample.py printed what the saved model directory generates.
    params, cfg, tok = load_checkpoint(values["SAVE_DIR"])
    assert cfg == ModelConfig.from_dict(run["model"])
    want = generate(
        params, cfg, [values["PROMPT"]], tokenizer=tok, max_new_tokens=values["MAX_NEW_TOKENS"],
        temperature=values["TEMPERATURE"], seed=values["SEED"],
    ).texts[0]  # fmt: skip
    (sample_cell,) = code_cells(nb, '"sample.py"')
    assert values["PROMPT"] + want + "\n" in stdout(sample_cell)
