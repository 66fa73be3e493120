import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    from sdft_utils.testing import byte_level_tokenizer

    return byte_level_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from sdft_utils.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama"))
