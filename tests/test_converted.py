"""A model converted to blocks once starts from its converted file at later starts, and answers the same."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoModelForCausalLM

from app.domain.generation import ChatTurn
from app.services import kernels
from app.services.model import ModelService
from app.settings import Settings
from tests.model_helpers import last_logits

pytestmark = [
    pytest.mark.model,
    pytest.mark.skipif(not kernels.available(), reason=f"no block kernels here: {kernels.unavailable_reason()}"),
]

QUESTION = "What is the capital of France?"


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    """A folder of its own holding the default model's files (links to them), with no converted file yet."""
    source = Path(Settings.from_env().model)
    folder = tmp_path / source.name
    folder.mkdir()
    for file in source.iterdir():
        if not file.name.startswith("chipi-"):
            (folder / file.name).symlink_to(file.resolve())
    return folder


def load_and_read(settings: Settings) -> tuple[Any, list[float]]:
    """The loaded model's layers' types and its next-token logits after QUESTION."""
    service = ModelService.load(settings)
    try:
        token_ids = service.build_prompt(None, [ChatTurn("user", QUESTION)], 16).token_ids
        return type(service.model.lm_head).__name__, last_logits(service, token_ids).tolist()
    finally:
        service.close()


def test_a_converted_model_starts_from_its_file_and_answers_the_same(
    model_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = replace(Settings.from_env(), model=str(model_folder), quantize="auto", dtype="auto")
    converted = model_folder / "chipi-auto.safetensors"

    built = load_and_read(settings)  # from the checkpoint, through transformers; writes the converted file
    assert converted.exists()

    def no_checkpoint(*args: object, **kwargs: object) -> None:
        raise AssertionError("the checkpoint was read although a converted file was there")

    with monkeypatch.context() as patch:
        patch.setattr(AutoModelForCausalLM, "from_pretrained", no_checkpoint)
        assert load_and_read(settings) == built  # the same layers and the very same logits

    # A changed checkpoint makes the file stale: the next start converts again and rewrites it.
    written = converted.stat().st_mtime_ns
    config = model_folder / "config.json"
    real_config = config.resolve()
    config.unlink()
    shutil.copy(real_config, config)  # the same content, newer: as after a fresh download
    assert load_and_read(settings) == built
    assert converted.stat().st_mtime_ns != written


def test_a_converted_file_that_cannot_be_read_or_written_only_costs_the_slow_start(model_folder: Path) -> None:
    (model_folder / "chipi-auto.safetensors").mkdir()  # in the way: neither readable as a file nor replaceable
    settings = replace(Settings.from_env(), model=str(model_folder), quantize="auto", dtype="auto")
    layers, _ = load_and_read(settings)
    assert layers == "BlockLinear"
