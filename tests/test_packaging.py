"""Our top-level `kernels` package must not be taken for Hugging Face's `kernels` hub package."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import importlib.util, kernels
assert importlib.util.find_spec("kernels").origin.startswith(%r), "another kernels package shadows ours"
from transformers.utils.import_utils import is_kernels_available
assert not is_kernels_available(), "transformers believes the HF kernels hub package is installed"
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(%r)  # would try hub kernels if it thought they were there
print("ok", model(torch.tensor([[1, 2, 3]])).logits.shape)
"""


def test_transformers_ignores_our_kernels_package(tiny_model):
    r = subprocess.run([sys.executable, "-c", PROBE % (str(ROOT / "kernels"), tiny_model)], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("ok")
