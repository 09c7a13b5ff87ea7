"""Shared pytest fixtures. Keep each owner's fixtures in their own block."""

import pytest

# --- tiny Llama model (posttrain.tiny) -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Folder of a random-init tiny Llama 3 model + tokenizer (default build_tiny arguments), built once a session."""
    from posttrain.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "model")


# --- end tiny Llama model ----------------------------------------------------------------------------------------
