"""Shared pytest fixtures. Keep each owner's fixtures in their own block."""

import os

import pytest

# Set before anything imports torch or deepspeed; subprocesses started by tests inherit them.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def posttrain_cache(tmp_path_factory):
    """One model cache per test session (tiny:// builds, GGUF conversions), never the user's ~/.cache."""
    if "POSTTRAIN_TEST_CACHE" in os.environ:  # reuse across sessions when a developer asks for it
        os.environ["POSTTRAIN_CACHE"] = os.environ["POSTTRAIN_TEST_CACHE"]
    else:
        os.environ["POSTTRAIN_CACHE"] = str(tmp_path_factory.mktemp("posttrain-cache"))
    return os.environ["POSTTRAIN_CACHE"]


# --- tiny Llama model (posttrain.tiny) -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Folder of a random-init tiny Llama 3 model + tokenizer (default build_tiny arguments), built once a session."""
    from posttrain.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "model")


# --- end tiny Llama model ----------------------------------------------------------------------------------------
