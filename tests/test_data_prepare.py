"""`lowmem data prepare` and `StreamingDataModule`: a user's own images and text, end to end.

Small image folders (class sub-folders of 8x8 PNGs made with Pillow) and text files in
tmp_path are prepared through the real entry point (``lowmem.cli.main(["data", "prepare", ...])``)
and trained from through ``lowmem fit`` for the CNN, the diffusion model and the language model.
Also: every bad input is one ``lowmem: error:`` line (exit 2); a half-written or interrupted
output folder is refused; the model must fit the manifest; DDP shares are disjoint and equal; a
run resumed mid-epoch trains on exactly the remaining batches.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lowmem.cli import LowMemCLI, main
from lowmem.data import MANIFEST_NAME, PreparedOutput, prepare_images, prepare_text, read_manifest
from lowmem.lightning_modules import StreamingDataModule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {family: str(ROOT / "configs" / f"{family}_adamw.yaml") for family in ("cnn", "diffusion", "lm")}
FAST = ["--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.logger=false", "--trainer.enable_checkpointing=false"]  # fmt: skip
CLASSES = ("ant", "bee", "cat")

pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers.*")


def make_images(folder: Path, per_class: int = 6, size: tuple[int, int] = (8, 8), mode: str = "L", seed: int = 0) -> dict:
    """``folder/<class>/<i>.png`` of random pixels; returns {(class, i): uint8 array (H, W[, C])}."""
    rng = np.random.default_rng(seed)
    pixels = {}
    for name in CLASSES:
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
            pixels[name, i] = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(pixels[name, i], mode).save(folder / name / f"{i}.png")
    return pixels


TEXTS = {"a.txt": "The quick brown fox jumps over the lazy dog. " * 12, "sub/b.md": "Pack my box with five dozen jugs!\n" * 10}


def make_text(folder: Path) -> bytes:
    """Text files under ``folder``; returns their bytes concatenated in sorted path order."""
    for name, text in TEXTS.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return b"".join(TEXTS[name].encode() for name in sorted(TEXTS))


def prepare(capsys, *args: str) -> tuple[int, str, str]:
    """``lowmem data prepare ARGS`` through lowmem.cli.main: (exit code, stdout, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "prepare", *args])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("lowmem: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def image_data(tmp_path_factory):
    """A prepared image dataset (3 classes x 6 8x8 greyscale PNGs) and the source pixels."""
    root = tmp_path_factory.mktemp("images")
    pixels = make_images(root / "source")
    prepare_images(root / "source", root / "prepared", show_progress=False)
    return root / "prepared", pixels


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    """A prepared byte-level text dataset (block_size 16) and the source bytes."""
    root = tmp_path_factory.mktemp("text")
    (root / "source").mkdir()
    corpus = make_text(root / "source")
    prepare_text([root / "source"], root / "prepared", block_size=16, show_progress=False)
    return root / "prepared", corpus


def _all(dm: StreamingDataModule, split: str) -> list:
    return [dm.splits[split][i] for i in range(len(dm.splits[split]))]


# ---------------------------------------------------------------------------- images
def test_images_are_prepared_with_manifest_summary_and_exact_pixels(tmp_path, capfd):
    pixels = make_images(tmp_path / "src")
    (tmp_path / "src" / "cat" / "README.txt").write_text("not an image")
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "prepare", "--kind", "images", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "out")])
    out, err = capfd.readouterr()  # file-descriptor level: litdata's own output would show here
    assert exit_info.value.code == 0 and err == "", err
    assert out.count("\n") == 1 and "\x1b[" not in out and "lightning.ai" not in out, out
    assert "wrote 18 images of 3 classes (8x8, 1 channel, skipped 1 non-image files)" in out
    assert "15 train + 3 val items" in out and "bytes in 2 chunks" in out and out.rstrip().endswith(" s")

    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert manifest["kind"] == "images" and manifest["classes"] == list(CLASSES)
    assert manifest["image_size"] == [8, 8] and manifest["channels"] == 1 and manifest["pixel_format"] == "uint8"
    assert manifest["splits"] == {"train": 15, "val": 3} and manifest["format_version"] == 1
    assert not list(tmp_path.glob("out.partial-*"))

    dm = StreamingDataModule(str(tmp_path / "out"))
    dm.setup("fit")
    samples = _all(dm, "train") + _all(dm, "val")
    expected = {(CLASSES.index(c), torch.from_numpy(p).float().div(127.5).sub(1).unsqueeze(0).numpy().tobytes())
                for (c, _), p in pixels.items()}  # fmt: skip
    got = {(label, image.numpy().tobytes()) for image, label in samples}
    assert got == expected and len(samples) == 18  # every image once, exact, with its class
    image, _ = samples[0]
    assert image.dtype == torch.float32 and image.shape == (1, 8, 8) and -1 <= image.min() < image.max() <= 1
    assert sorted(label for _, label in _all(dm, "val")) == [0, 1, 2]  # stratified: one per class


def test_the_split_is_fixed_by_the_seed(tmp_path):
    make_images(tmp_path / "src")
    val = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        prepare_images(tmp_path / "src", tmp_path / name, seed=seed, show_progress=False)
        dm = StreamingDataModule(str(tmp_path / name))
        dm.setup()
        val[name] = {image.numpy().tobytes() for image, _ in _all(dm, "val")}
    assert val["a"] == val["b"] != val["c"]


def test_size_and_channels_crop_resize_and_convert(tmp_path, capsys):
    make_images(tmp_path / "src", size=(8, 8), mode="L")
    Image.fromarray(np.zeros((6, 10, 3), np.uint8), "RGB").save(tmp_path / "src" / "ant" / "wide.png")
    code, _, err = prepare(capsys, "--kind", "images", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "o"))
    assert code == 2 and "images differ in size:" in one_error_line(err) and "pass --size N" in err
    code, out, err = prepare(capsys, "--kind", "images", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "o"),
                             "--size", "4")  # fmt: skip
    assert code == 0, err
    manifest = read_manifest(tmp_path / "o")
    assert manifest.image_size == [4, 4] and manifest.channels == 3  # one colour image: RGB for all
    dm = StreamingDataModule(str(tmp_path / "o"))
    dm.setup()
    assert all(image.shape == (3, 4, 4) for image, _ in _all(dm, "train") + _all(dm, "val"))
    code, _, err = prepare(capsys, "--kind", "images", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "g"),
                           "--size", "4", "--channels", "1")  # fmt: skip
    assert code == 0 and read_manifest(tmp_path / "g").channels == 1, err


def test_a_progress_bar_is_drawn_on_a_terminal_only(tmp_path, capsys, monkeypatch):
    make_images(tmp_path / "src")
    code, _, err = prepare(capsys, "--kind", "images", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "a"))
    assert code == 0 and err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, _, err = prepare(capsys, "--kind", "images", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "b"))
    assert code == 0 and "writing train images" in err and "0/15 [" in err, err


# ---------------------------------------------------------------------------- text
def test_text_is_cut_into_shifted_blocks_with_the_end_for_validation(text_data):
    root, corpus = text_data
    manifest = read_manifest(root)
    assert (manifest.kind, manifest.block_size, manifest.tokenizer, manifest.vocab_size) == ("text", 16, "bytes", 256)
    n_blocks = (len(corpus) - 1) // 16
    assert manifest.splits == {"train": n_blocks - round(n_blocks * 0.1), "val": round(n_blocks * 0.1)}
    dm = StreamingDataModule(str(root))
    dm.setup()
    blocks = _all(dm, "train") + _all(dm, "val")
    tokens = torch.tensor(list(corpus))
    for i, (x, y) in enumerate(blocks):
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (16,)
        assert torch.equal(x, tokens[i * 16 : i * 16 + 16]) and torch.equal(y, tokens[i * 16 + 1 : i * 16 + 17])


def test_a_hugging_face_tokenizer_file_tokenizes_the_text(tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"], show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(TEXTS.values(), trainer=trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "src").mkdir()
    make_text(tmp_path / "src")
    code, _, err = prepare(capsys, "--kind", "text", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "o"),
                           "--tokenizer", str(tmp_path / "tokenizer.json"), "--block_size", "4")  # fmt: skip
    assert code == 0, err
    manifest = read_manifest(tmp_path / "o")
    assert manifest.vocab_size == tok.get_vocab_size(with_added_tokens=True) > 256 and manifest.token_dtype == "int32"
    ids = [i for name in sorted(TEXTS) for i in tok.encode(TEXTS[name], add_special_tokens=False).ids]
    dm = StreamingDataModule(str(tmp_path / "o"))
    dm.setup()
    x, y = dm.splits["train"][1]
    assert x.tolist() == ids[4:8] and y.tolist() == ids[5:9]
    (tmp_path / "bad.json").write_text("{}")
    code, _, err = prepare(capsys, "--kind", "text", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "p"),
                           "--tokenizer", str(tmp_path / "bad.json"))  # fmt: skip
    assert code == 2 and "bad.json is not a Hugging Face tokenizer.json file" in one_error_line(err)


def test_a_tiktoken_encoding_is_never_downloaded(tmp_path, capsys, monkeypatch):
    pytest.importorskip("tiktoken")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    (tmp_path / "a.txt").write_text("hello")
    code, _, err = prepare(capsys, "--kind", "text", "--source", str(tmp_path / "a.txt"), "--out", str(tmp_path / "o"),
                           "--tokenizer", "tiktoken:gpt2")  # fmt: skip
    assert code == 2 and "--tokenizer tiktoken:gpt2 is not available offline" in one_error_line(err)
    code, _, err = prepare(capsys, "--kind", "text", "--source", str(tmp_path / "a.txt"), "--out", str(tmp_path / "o"),
                           "--tokenizer", "tiktoken:nope")  # fmt: skip
    assert code == 2 and "tiktoken has no encoding 'nope'" in one_error_line(err)


# ---------------------------------------------------------------------------- training through lowmem fit
FAMILY_ARGS = {
    "cnn": ["--model.init_args.widths=[4]", "--model.init_args.num_classes=3", "--data.init_args.batch_size=4"],
    "diffusion": ["--model.init_args.channels=[8,16]", "--model.init_args.timesteps=10", "--data.init_args.batch_size=4"],
    "lm": ["--model.init_args.n_layer=1", "--model.init_args.n_head=2", "--model.init_args.n_embd=32",
           "--trainer.val_check_interval=2", "--data.init_args.batch_size=4"],
}  # fmt: skip


def _data_args(root: Path) -> list[str]:
    return ["--data=lowmem.lightning_modules.StreamingDataModule", f"--data.init_args.root={root}"]


@pytest.mark.parametrize("family", ["cnn", "diffusion", "lm"])
def test_each_family_trains_from_prepared_data(family, image_data, text_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    root = (text_data if family == "lm" else image_data)[0]
    main(["fit", "--config", CONFIGS[family], *_data_args(root), *FAMILY_ARGS[family], *FAST])
    out = capsys.readouterr().out
    assert "lowmem fit: step 2: " in out and "val/loss=" in out, out


@pytest.mark.parametrize(
    ("family", "args", "expected"),
    [
        ("cnn", [], "model.init_args.num_classes=10, but it has 3 classes (ant, bee, cat): set "
                    "--model.init_args.num_classes=3"),
        ("cnn", ["--model.init_args.in_channels=3"], "model.init_args.in_channels=3, but its images have 1 channel(s)"),
        ("diffusion", ["--model.init_args.image_size=16"], "model.init_args.image_size=16, but its images are 8x8: "
                                                           "set --model.init_args.image_size=8"),
        ("lm", ["--model.init_args.block_size=8"], "model.init_args.block_size=8, but its blocks have 16 tokens"),
        ("lm", ["--model.init_args.vocab_size=100"], "model.init_args.vocab_size=100, but its tokenizer bytes has 256"),
        ("lm-on-images", [], "it holds images, but LanguageModel takes token blocks"),
    ],
    ids=["num-classes", "in-channels", "image-size", "block-size", "vocab-size", "kind"],
)  # fmt: skip
def test_a_model_that_does_not_fit_the_manifest_is_one_line(family, args, expected, image_data, text_data, tmp_path,
                                                            monkeypatch, capsys):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    root = (text_data if family == "lm" else image_data)[0]
    config = CONFIGS["lm" if family == "lm-on-images" else family]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config, *_data_args(root), "--data.init_args.batch_size=4", *args, *FAST])
    assert exit_info.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"the model does not fit the prepared data in {root}" in line and expected in line, line


def test_a_batch_larger_than_the_training_split_is_one_line(image_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", CONFIGS["cnn"], *_data_args(image_data[0]), *FAMILY_ARGS["cnn"],
              "--data.init_args.batch_size=16", *FAST])  # fmt: skip
    assert exit_info.value.code == 2
    assert "train has 15 samples, fewer than one batch of data.init_args.batch_size=16" in one_error_line(
        capsys.readouterr().err)  # fmt: skip
    assert len(list(StreamingDataModule(str(image_data[0]), batch_size=15).train_dataloader())) == 1  # direct use


# ---------------------------------------------------------------------------- bad input
def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (prepare arguments, expected part of the error line); the sources are made here."""
    make_images(tmp / "imgs")
    (tmp / "empty").mkdir()
    (tmp / "flat").mkdir()
    Image.new("L", (8, 8)).save(tmp / "flat" / "x.png")
    shutil.copytree(tmp / "imgs", tmp / "corrupt")
    (tmp / "corrupt" / "bee" / "2.png").write_bytes(b"this is not a png")
    shutil.copytree(tmp / "imgs", tmp / "truncated")
    data = (tmp / "imgs" / "cat" / "0.png").read_bytes()
    (tmp / "truncated" / "cat" / "0.png").write_bytes(data[: len(data) // 2])
    shutil.copytree(tmp / "imgs", tmp / "mixed")
    Image.new("L", (9, 8)).save(tmp / "mixed" / "ant" / "odd.png")
    shutil.copytree(tmp / "imgs", tmp / "classless")
    shutil.rmtree(tmp / "classless" / "bee")
    (tmp / "classless" / "bee").mkdir()
    (tmp / "blank.txt").write_text("")
    (tmp / "short.txt").write_text("tiny")
    (tmp / "binary.txt").write_bytes(b"text\0with a NUL")
    (tmp / "taken").mkdir()
    (tmp / "taken" / "thesis.tex").write_text("keep me")
    images, text = ["--kind", "images", "--source"], ["--kind", "text", "--source"]
    imgs, txt = str(tmp / "imgs"), str(tmp / "short.txt")
    return {
        "missing-source": ([*images, str(tmp / "nope")], f"--source {tmp / 'nope'}: no such folder"),
        "missing-text": ([*text, str(tmp / "nope.txt")], f"--source {tmp / 'nope.txt'}: no such file or folder"),
        "empty-folder": ([*images, str(tmp / "empty")], "is empty: it has no class sub-folders with images"),
        "no-class-folders": ([*images, str(tmp / "flat")], "has images (x.png, ...) but no class sub-folders"),
        "empty-class": ([*images, str(tmp / "classless")], f"class folder {tmp / 'classless' / 'bee'} has no image"),
        "empty-text-folder": ([*text, str(tmp / "empty")], "is an empty folder: it has no text files"),
        "empty-text": ([*text, str(tmp / "blank.txt")], "no text: the 1 file(s) of --source are empty"),
        "corrupt-image": ([*images, str(tmp / "corrupt")], f"cannot read image {tmp / 'corrupt' / 'bee' / '2.png'}"),
        "truncated-image": ([*images, str(tmp / "truncated")], f"cannot read image {tmp / 'truncated' / 'cat' / '0.png'}"),
        "mixed-sizes": ([*images, str(tmp / "mixed")], "is 9x8; pass --size N"),
        "binary-text": ([*text, str(tmp / "binary.txt")], "binary.txt is not text (it has NUL bytes)"),
        "too-little-text": ([*text, txt, "--block_size", "4"], "too little text: 4 tokens make 0 block(s)"),
        "block-size-0": ([*text, txt, "--block_size", "0"], "--block_size 0 must be at least 1 token"),
        "val-fraction-0": ([*images, imgs, "--val_fraction", "0"], "--val_fraction 0.0 must be between 0 and 1"),
        "val-fraction-1.5": ([*text, txt, "--val_fraction", "1.5"], "--val_fraction 1.5 must be between 0 and 1"),
        "size-0": ([*images, imgs, "--size", "0"], "--size 0 must be a positive number of pixels"),
        "unknown-tokenizer": ([*text, txt, "--tokenizer", "gpt5"], "--tokenizer gpt5: not 'bytes', 'tiktoken:<encoding>'"),
        "option-of-other-kind": ([*images, imgs, "--block_size", "8"], "--block_size applies to --kind text only"),
        "two-image-sources": ([*images, imgs, imgs], "--kind images takes one --source folder"),
        "out-exists": ([*images, imgs, "--out", str(tmp / "taken")], "already exists; pass --overwrite"),
        "out-not-a-dataset": ([*images, imgs, "--out", str(tmp / "taken"), "--overwrite"],
                              "exists and is not a prepared dataset (no lowmem_data.json); refusing to replace it"),
        "out-parent-is-a-file": ([*images, imgs, "--out", str(tmp / "binary.txt" / "dir")], "binary.txt is a file"),
        "unknown-kind": (["--kind", "audio", "--source", imgs], "argument --kind: invalid choice: 'audio'"),
    }  # fmt: skip


BAD = ["missing-source", "missing-text", "empty-folder", "no-class-folders", "empty-class", "empty-text-folder",
       "empty-text", "corrupt-image", "truncated-image", "mixed-sizes", "binary-text", "too-little-text",
       "block-size-0", "val-fraction-0", "val-fraction-1.5", "size-0", "unknown-tokenizer", "option-of-other-kind",
       "two-image-sources", "out-exists", "out-not-a-dataset", "out-parent-is-a-file", "unknown-kind"]  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_clear_line_and_exit_code_2(case, tmp_path, capsys):
    cases = _bad_inputs(tmp_path)
    assert list(cases) == BAD  # every case is parametrized
    args, expected = cases[case]
    out = tmp_path / "out"
    code, stdout, err = prepare(capsys, *args, *([] if "--out" in args else ["--out", str(out)]))
    assert code == 2 and expected in one_error_line(err), err
    assert len(err.splitlines()) == 1 and stdout == "", err
    assert not out.exists() and not list(tmp_path.glob("*.partial-*"))  # nothing half-written is left
    if case.startswith("out-"):
        assert (tmp_path / "taken" / "thesis.tex").read_text() == "keep me"


def test_text_that_is_not_utf8_is_refused_by_a_named_tokenizer_only(tmp_path, monkeypatch):
    import lowmem.data.text
    from lowmem.data import DataError, Tokenizer

    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait, s'il vous pla\xeet".encode("latin-1"))
    utf8_only = Tokenizer("utf8", 0x110000, lambda data: np.array([ord(c) for c in data.decode("utf-8")]))
    real = lowmem.data.tokenizers.load_tokenizer
    monkeypatch.setattr(lowmem.data.text, "load_tokenizer", lambda spec: utf8_only if spec == "utf8" else real(spec))
    with pytest.raises(DataError, match=r"latin1.txt is not UTF-8 text \(invalid continuation byte at byte 3\)"):
        prepare_text([tmp_path / "latin1.txt"], tmp_path / "o", block_size=2, tokenizer="utf8", show_progress=False)
    manifest, _ = prepare_text([tmp_path / "latin1.txt"], tmp_path / "b", block_size=2, show_progress=False)
    assert manifest.tokenizer == "bytes"


@pytest.mark.parametrize(("spec", "package"), [("tiktoken:gpt2", "tiktoken"), ("TOKENIZER_FILE", "tokenizers")])
def test_a_tokenizer_whose_package_is_not_installed_is_one_line(spec, package, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # import fails as when not installed
    (tmp_path / "tok.json").write_text("{}")
    (tmp_path / "a.txt").write_text("hello world " * 20)
    spec = spec.replace("TOKENIZER_FILE", str(tmp_path / "tok.json"))
    code, _, err = prepare(capsys, "--kind", "text", "--source", str(tmp_path / "a.txt"), "--out", str(tmp_path / "o"),
                           "--tokenizer", spec)  # fmt: skip
    assert code == 2 and f"--tokenizer {spec} needs the `{package}` package, which is not installed" in one_error_line(err)


# ---------------------------------------------------------------------------- half-written output
def test_a_half_written_or_interrupted_output_is_never_taken_for_a_dataset(tmp_path, capsys, monkeypatch):
    make_images(tmp_path / "src")
    # What a prepare killed outright leaves: chunks in <out>.partial-<pid>, no manifest, no <out>.
    with PreparedOutput(tmp_path / "out") as output:
        output.write_split("train", [(torch.zeros(1, 8, 8, dtype=torch.uint8), 0)], 1, "train")
        partial = output.path
        assert partial.name.startswith("out.partial-") and (partial / "train" / "index.json").is_file()
        assert not (tmp_path / "out").exists()
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", CONFIGS["cnn"], *_data_args(partial), *FAST])
        assert exit_info.value.code == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"{partial} is not a prepared dataset, or its preparation did not finish" in line
        assert "run `lowmem data prepare --kind images|text --source <folder or files> --out" in line
    assert not partial.exists()  # left the block without finish(): removed

    # Ctrl-C during a prepare: exit 130, neither <out> nor a partial folder remain.
    import lowmem.data.images as images

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(images, "_load", interrupt)
    code, _, err = prepare(capsys, "--kind", "images", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "out"))
    assert code == 130 and "interrupted" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.*"))


def test_a_dataset_with_a_missing_split_or_no_folder_is_refused(image_data, tmp_path):
    from lowmem.lightning_modules import ConfigError

    broken = tmp_path / "broken"
    shutil.copytree(image_data[0], broken)
    (broken / "val" / "index.json").unlink()
    with pytest.raises(ConfigError, match=r"broken/val has no readable litdata index \(index.json\); the dataset is "
                                          "incomplete"):  # fmt: skip
        StreamingDataModule(str(broken))
    with pytest.raises(ConfigError, match="prepared dataset .*nowhere: no such directory"):
        StreamingDataModule(str(tmp_path / "nowhere"))


def test_overwrite_replaces_a_prepared_dataset_and_an_empty_folder_needs_none(tmp_path, capsys):
    make_images(tmp_path / "src")
    (tmp_path / "out").mkdir()
    args = ["--kind", "images", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "out")]
    assert prepare(capsys, *args)[0] == 0
    assert prepare(capsys, *args, "--size", "4")[0] == 2  # exists
    code, out, err = prepare(capsys, *args, "--size", "4", "--overwrite")
    assert code == 0 and read_manifest(tmp_path / "out").image_size == [4, 4], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


# ---------------------------------------------------------------------------- DDP shares and resume
def test_ddp_ranks_get_disjoint_equal_shares_in_whole_batches(image_data):
    """What each of 2 ranks trains on (ResumableSampler with the rank's trainer): disjoint shares of
    equal size, full batches only, the 15 samples' odd one dropped; a new order each epoch."""
    from types import SimpleNamespace

    shares, orders = [], []
    for rank in (0, 1):
        dm = StreamingDataModule(str(image_data[0]), batch_size=2)
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank, training=False, lightning_module=None)
        dm.setup("fit")
        loader = dm.train_dataloader()
        epochs = []
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)
            epochs.append(list(loader.sampler))
            assert all(len(images) == 2 for images, _ in loader)  # drop_last: 7 samples -> 3 batches
            assert len(loader) == 3
        shares.append(set(epochs[0]))
        orders.append(epochs)
    assert len(shares[0]) == len(shares[1]) == 7 and not shares[0] & shares[1]
    assert orders[0][0] != orders[0][1]  # reshuffled each epoch


def test_a_run_resumed_mid_epoch_trains_on_the_remaining_batches(image_data, tmp_path, monkeypatch):
    """8 steps over 3-batch epochs with in-fit validation, checkpoint at step 4 (epoch 1, batch 1):
    resumed there, the run trains exactly the uninterrupted run's batches 4..7 and ends with its
    parameters; another seed trains other batches (the recorder sees the order)."""
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", CONFIGS["cnn"], *_data_args(image_data[0]), *FAMILY_ARGS["cnn"], "--trainer.max_steps=8",
            "--trainer.limit_val_batches=1", "--trainer.val_check_interval=2", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--trainer.logger=false",
            "--trainer.callbacks+=scripts.lightning_harness.BatchRecorder",
            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.callbacks.dirpath=ckpts",
            "--trainer.callbacks.every_n_train_steps=4", "--trainer.callbacks.save_top_k=-1",
            "--trainer.callbacks.filename={step}"]  # fmt: skip

    def run(*extra):
        cli = LowMemCLI(args=[*args, *extra])
        recorder = next(c for c in cli.trainer.callbacks if type(c).__name__ == "BatchRecorder")
        return recorder.batches, {k: v.detach().clone() for k, v in cli.model.state_dict().items()}

    straight, straight_params = run()
    assert [step for step, _ in straight] == list(range(8))
    resumed, resumed_params = run("--ckpt_path", str(tmp_path / "ckpts" / "step=4.ckpt"), "--trainer.callbacks.dirpath=resumed")
    assert resumed == straight[4:]
    assert all(torch.equal(resumed_params[k], v) for k, v in straight_params.items())
    other_seed, _ = run("--data.init_args.seed=1", "--trainer.max_steps=4", "--trainer.callbacks.dirpath=other")
    assert other_seed != straight[:4]


@pytest.mark.distributed
def test_two_ranks_train_like_one_process_at_the_global_batch(tmp_path, monkeypatch):
    """``lowmem fit`` on 2 gloo ranks at batch 8 from a prepared folder ends where one process at
    batch 16 ends: each step's two rank shares are together the one-process batch."""
    from test_cli_ddp import BATCH, run_two_ranks, val_losses, write_config

    make_images(tmp_path / "src", per_class=24)
    prepare_images(tmp_path / "src", tmp_path / "data", show_progress=False)
    config = write_config(tmp_path / "config.yaml", "AdamW")
    overlay = yaml.safe_load(config.read_text())
    overlay["model"]["init_args"]["num_classes"] = 3
    overlay["data"] = {"class_path": "lowmem.lightning_modules.StreamingDataModule",
                       "init_args": {"root": str(tmp_path / "data")}}  # fmt: skip
    config.write_text(yaml.safe_dump(overlay))
    (tmp_path / "single").mkdir(), (tmp_path / "ddp").mkdir()
    monkeypatch.chdir(tmp_path / "single")
    reference = LowMemCLI(args=["fit", "--config", str(config), f"--data.init_args.batch_size={2 * BATCH}"])
    reference_params = {k: v.detach().clone() for k, v in reference.model.state_dict().items()}
    proc = run_two_ranks(config, tmp_path / "ddp", "ddp")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-6000:]}"
    log_dir = tmp_path / "ddp" / "lightning_logs" / "version_0"
    state = torch.load(next((log_dir / "checkpoints").glob("*.ckpt")), map_location="cpu", weights_only=False)
    diff = max(float((state["state_dict"][k] - v).abs().max()) for k, v in reference_params.items())
    assert diff < 1e-4, diff
    assert val_losses(log_dir) == pytest.approx(val_losses(Path(reference.trainer.log_dir)), rel=1e-5, abs=1e-6)



def test_out_creates_missing_parent_folders(tmp_path, capsys):
    """``--out data/photos`` in a fresh checkout: the parents are made, as ``mkdir -p`` would."""
    make_images(tmp_path / "src", size=(8, 8), mode="L")
    code, _, err = prepare(capsys, "--kind", "images", "--source", str(tmp_path / "src"),
                           "--out", str(tmp_path / "data" / "nested" / "photos"))  # fmt: skip
    assert code == 0, err
    assert read_manifest(tmp_path / "data" / "nested" / "photos").kind == "images"
