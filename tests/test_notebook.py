"""notebooks/colab_tpu.ipynb, run on a CPU as CI runs it.

`JAXLLM_NOTEBOOK_SMOKE=1` makes the notebook's parameters cell shrink the TPU preset to a tiny
model and a few steps; every other cell runs as written (the install and Drive cells take their
non-Colab branch). Every cell runs in order, with a disconnect before the last section: a fresh
kernel runs the cells its text lists, then resumes. nbclient, nbformat and ipykernel come with the
`test` extra: without them this module fails to import, it does not skip.

The notebook runs once, in one test, because a module-scoped fixture would run it again on every
pytest-xdist worker that drew one of its tests.
"""

from __future__ import annotations

import base64
import copy
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


# What the Resume section says to run again after a disconnect, before itself.
AFTER_A_DISCONNECT = ("Parameters", "Helpers", "Install", "Google Drive (optional)")


def sections(nb) -> dict[str, list]:
    """The notebook's cells under each "## " heading (the heading cell included), in order."""
    out, name = {}, ""
    for cell in nb.cells:
        if cell.cell_type == "markdown" and cell.source.startswith("## "):
            name = cell.source.splitlines()[0][3:]
        out.setdefault(name, []).append(cell)
    return out


def execute(cells: list, out_dir: Path) -> nbformat.NotebookNode:
    """Runs `cells` and the probe in a fresh kernel, as Jupyter would run the notebook."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells = [*map(copy.deepcopy, cells), nbformat.v4.new_code_cell(PROBE)]
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
    parts = sections(nbformat.read(NOTEBOOK, as_version=4))
    *before, resume = parts
    assert resume == "Resume after a disconnect" and set(AFTER_A_DISCONNECT) <= set(parts)
    first = execute([c for name in before for c in parts[name]], tmp_path / "run")
    # The disconnect: a new kernel, which knows nothing of the first one.
    second = execute([c for name in (*AFTER_A_DISCONNECT, resume) for c in parts[name]], tmp_path / "run")

    for nb in (first, second):
        # Every cell ran (nbclient stops at the first error; this also catches a swallowed one).
        assert all(c.execution_count for c in code_cells(nb))
        errors = [o for c in code_cells(nb) for o in c.outputs if o.output_type == "error"]
        assert not errors, errors
        # On a TPU the kernel must leave the chip to train.py and sample.py: one process holds it.
        assert not json.loads(stdout(nb.cells[-1]))["jax_imported"], "the notebook's kernel imported JAX"
    values = json.loads(stdout(first.cells[-1]))
    out, max_steps, resume_steps = Path(values["OUT"]), values["MAX_STEPS"], values["RESUME_STEPS"]
    assert out == tmp_path / "run" and resume_steps > max_steps

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
    watch_cells = code_cells(first, "watch(training)") + code_cells(second, "watch(training)")
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
    (sample_cell,) = code_cells(first, '"sample.py"')
    assert values["PROMPT"] + want + "\n" in stdout(sample_cell)
