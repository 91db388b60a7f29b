"""litdata round trip: chunks written from a dataset stream back every sample, and train."""

from __future__ import annotations

import pytest
import torch

from lowmem.cli import LowMemCLI
from lowmem.lightning_modules import DigitsDataModule, StreamingDataModule
from lowmem.lightning_modules.streaming import _main as streaming_main


@pytest.fixture(scope="module")
def digits_chunks(tmp_path_factory):
    root = tmp_path_factory.mktemp("litdata")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(root / "tmp"))  # litdata stages files under $TMPDIR
        (root / "tmp").mkdir()
        streaming_main(["digits", str(root / "chunks")])
    return root / "chunks"


def test_streamed_samples_equal_the_source(digits_chunks):
    source = DigitsDataModule()
    source.setup()
    dm = StreamingDataModule(str(digits_chunks), batch_size=50)
    batches = list(dm.val_dataloader())
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    expected_images, expected_labels = source.splits["val"][:]
    n = len(images)
    assert n == (len(expected_labels) // 50) * 50  # drop_last: whole batches only
    assert torch.equal(images, expected_images[:n]) and torch.equal(labels, expected_labels[:n])


def test_fit_streams_from_chunks(digits_chunks, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = LowMemCLI(args=["fit", "--model=lowmem.lightning_modules.ImageClassifier",
                          "--model.init_args.widths=[8]", "--data=lowmem.lightning_modules.StreamingDataModule",
                          f"--data.init_args.root={digits_chunks}", "--trainer.max_steps=4",
                          "--trainer.limit_val_batches=1", "--trainer.val_check_interval=2", "--trainer.enable_progress_bar=false",
                          "--trainer.logger=false", "--trainer.enable_checkpointing=false"])  # fmt: skip
    assert cli.trainer.global_step == 4 and torch.isfinite(cli.trainer.callback_metrics["val/loss"])


def test_missing_chunks_are_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no litdata chunks in .*write them first"):
        StreamingDataModule(str(tmp_path))



def test_text_chunks_default_to_the_lm_configs_block_size():
    from pathlib import Path

    import yaml

    from lowmem.lightning_modules.streaming import TEXT_BLOCK_SIZE

    base = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "base" / "lm.yaml").read_text())
    assert base["data"]["init_args"]["block_size"] == base["model"]["init_args"]["block_size"] == TEXT_BLOCK_SIZE
