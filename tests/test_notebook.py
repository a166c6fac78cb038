"""notebooks/quickstart.ipynb executed top to bottom in a real Jupyter kernel (nbclient), with its
parameters cell swapped for a tiny ViLReF run: install, train, loss plot, zero-shot results and the
predictor on the three real photographs."""
import os

import nbformat
from nbclient import NotebookClient

from test_train import REPO, subprocess_env
from test_vilref import TINY

NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")


def test_quickstart_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    workdir = str(tmp_path / "quickstart")
    nb.cells[params[0]].source = "\n".join([
        "import os",
        f"REPO = {REPO!r}",
        f"WORKDIR = {workdir!r}",
        "CLIP_CONFIG = None",  # stage `clip` skipped: TINY trains stage `vilref` from scratch
        "CONFIG = 'configs/vilref.py:demo'",
        f"OVERRIDES = {({**TINY, 'evals.multilabel_finetune.at_end': False})!r}",
        "INSTALL = True",
    ])
    for key, value in subprocess_env().items():  # the kernel inherits 8 fake CPU devices
        monkeypatch.setenv(key, value)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    def outputs(i, kind):
        return [o for o in nb.cells[i].outputs if o.output_type == kind]

    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    text = {i: "".join(o.get("text", "") for o in outputs(i, "stream")) for i in code}
    images = {i: [o for o in outputs(i, "display_data") if "image/png" in o.data] for i in code}
    train, loss, zero_shot, predict = code[2:6]
    assert "12 steps" in text[train]
    assert images[loss] and "-> " in text[loss] and "at step 12" in text[loss]
    assert images[zero_shot] and "zero-shot aca" in text[zero_shot] and "linear_probe/macro_auc" in text[zero_shot]
    assert images[predict]
    for photo in ("normal_sample.png", "sample_macular_hole.png", "severe_nonprol_dr.jpg"):
        assert photo in text[predict]
    assert os.path.isfile(os.path.join(workdir, "checkpoints", "12", "_CHECKPOINT_METADATA"))
