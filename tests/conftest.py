import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # test helper modules (hf_oracle, assets)
torch.set_num_threads(1)  # the test models are tiny: one thread is faster than two and immune to a busy machine


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """Tiny random transformers models of both families, saved by transformers: {family: (hf_model, directory)}."""
    from hf_oracle import hf_model

    out = {}
    for family in ("llama", "t5"):
        model = hf_model(family)
        directory = tmp_path_factory.mktemp(f"hf-{family}")
        model.save_pretrained(directory)
        out[family] = (model, str(directory))
    return out
