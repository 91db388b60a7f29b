"""litdata round trip: the built-in sets written as prepared datasets read back every sample, and train."""

from __future__ import annotations

import pytest
import torch

from lowmem.cli import LowMemCLI
from lowmem.lightning_modules import DigitsDataModule, StreamingDataModule
from lowmem.lightning_modules.streaming import _main as streaming_main


@pytest.fixture(scope="module")
def digits_chunks(tmp_path_factory):
    root = tmp_path_factory.mktemp("litdata")
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
    assert len(images) == len(expected_labels) and len(batches[-1][0]) < 50  # validation: every sample, in order
    assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)
    assert dm.manifest.kind == "images" and dm.manifest.classes == [str(i) for i in range(10)]


def test_fit_streams_from_chunks(digits_chunks, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = LowMemCLI(args=["fit", "--model=lowmem.lightning_modules.ImageClassifier",
                          "--model.init_args.widths=[8]", "--data=lowmem.lightning_modules.StreamingDataModule",
                          f"--data.init_args.root={digits_chunks}", "--trainer.max_steps=4",
                          "--trainer.limit_val_batches=1", "--trainer.val_check_interval=2", "--trainer.enable_progress_bar=false",
                          "--trainer.logger=false", "--trainer.enable_checkpointing=false"])  # fmt: skip
    assert cli.trainer.global_step == 4 and torch.isfinite(cli.trainer.callback_metrics["val/loss"])


def test_missing_chunks_are_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="is not a prepared dataset, or its preparation did not finish .*lowmem data "
                                         "prepare"):  # fmt: skip
        StreamingDataModule(str(tmp_path))


def test_text_chunks_default_to_the_lm_configs_block_size():
    from pathlib import Path

    import yaml

    from lowmem.lightning_modules.streaming import TEXT_BLOCK_SIZE

    base = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "base" / "lm.yaml").read_text())
    assert base["data"]["init_args"]["block_size"] == base["model"]["init_args"]["block_size"] == TEXT_BLOCK_SIZE


def test_text_chunks_are_the_stdlib_windows(tmp_path):
    from lowmem.lightning_modules import StdlibTextDataModule

    streaming_main(["text", str(tmp_path / "text"), "--max_bytes", "20000"])
    source = StdlibTextDataModule(block_size=64, max_bytes=20000)
    source.setup()
    dm = StreamingDataModule(str(tmp_path / "text"))
    dm.setup()
    assert (dm.manifest.block_size, dm.manifest.vocab_size) == (64, 256)
    for split in ("train", "val"):
        assert len(dm.splits[split]) == len(source.splits[split]) > 0
        for i in range(len(source.splits[split])):
            x, y = dm.splits[split][i]
            expected_x, expected_y = source.splits[split][i]
            assert torch.equal(x, expected_x) and torch.equal(y, expected_y)
