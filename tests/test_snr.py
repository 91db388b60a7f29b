"""`lowmem snr`: SlimAdam's SNR analysis, its rules file, table and figures (docs/snr.md)."""

from __future__ import annotations

import math
import re
import warnings
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from torch import nn

from lowmem.analysis import ParamSNR, choose_rules, generalise_over_depth
from lowmem.analysis.snr_table import format_snr_table
from lowmem.cli import main
from lowmem.lightning_modules import LanguageModel
from lowmem.optim import classify_parameters, load_slim_rules, slimadam_param_groups
from lowmem.optim.slim_rules import ROLE_RULES, candidate_dims, snr

ROOT = Path(__file__).resolve().parents[1]
LM_ADAMW = str(ROOT / "configs" / "lm_adamw.yaml")
LM_SLIM = str(ROOT / "configs" / "lm_slimadamw.yaml")
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--trainer.limit_val_batches=0"]
TINY = ["--model.init_args.n_layer=2", "--model.init_args.n_head=2", "--model.init_args.n_embd=32",
        "--model.init_args.block_size=16", "--data.init_args.block_size=16", "--data.init_args.batch_size=8", *QUIET]  # fmt: skip
STEPS = 101  # snapshots at steps 1 and 100


# ---------------------------------------------------------------- synthetic v


def _synthetic_v(gen: torch.Generator) -> torch.Tensor:
    """(8, 50): one random scale per row (spread over 4 decades), nearly constant along dim 1."""
    scale = 10 ** (4 * torch.rand(8, 1, generator=gen, dtype=torch.float64) - 2)
    return scale * (1 + 0.01 * torch.randn(8, 50, generator=gen, dtype=torch.float64)) ** 2


def test_synthetic_v_has_high_snr_along_the_constant_dim_and_low_along_the_random_one():
    gen = torch.Generator().manual_seed(0)
    v = _synthetic_v(gen)
    assert snr(v, (1,)) > 1000  # per row: std/mean = 2% -> SNR ~ 1 / 0.02^2
    assert snr(v, (0,)) < 1  # per column: the 4-decade spread of row scales
    assert snr(v, (0, 1)) < 1

    # The tool's path: series of such snapshots on a Linear(50 -> 8) weight (fan_in = dim 1).
    info = next(i for i in classify_parameters(nn.Sequential(nn.Linear(50, 8, bias=False))))
    series = {k: [(s, snr(_synthetic_v(gen), k)) for s in (1, 100, 200)] for k in candidate_dims((8, 50))}
    record = ParamSNR(info, series=series)
    assert choose_rules([record], cutoff=1.0) == {info.name: "fan_in"}
    assert choose_rules([record], cutoff=1e6) == {info.name: None}  # nothing above the cutoff
    flipped = ParamSNR(info, series={tuple(1 - d for d in k) if len(k) == 1 else k: s for k, s in series.items()})
    assert choose_rules([flipped], cutoff=1.0) == {info.name: "fan_out"}
    table = format_snr_table([record], choose_rules([record], 1.0), "t", [])
    assert "v bytes: 32 of 1,600 (2.0%)" in table  # 8 row values of 50 x 8 float32 elements


def test_size_one_dims_are_no_candidates_and_fans_are_named_without_them():
    """A 1x1 conv (64, 32, 1, 1): averaging over the kernel dims compresses nothing (and their zero
    variance would read as SNR = inf), so K ranges over dims 0 and 1; (1,) is its fan-in."""
    assert candidate_dims((64, 32, 1, 1)) == [(0,), (1,), (0, 1)]
    assert candidate_dims((7,)) == [(0,)] and candidate_dims((1,)) == []
    info = next(i for i in classify_parameters(nn.Sequential(nn.Conv2d(32, 64, 1, bias=False))))
    gen = torch.Generator().manual_seed(1)
    rows = 10 ** (4 * torch.rand(64, 1, 1, 1, generator=gen, dtype=torch.float64) - 2)
    v = rows * (1 + 0.01 * torch.randn(64, 32, 1, 1, generator=gen, dtype=torch.float64)) ** 2
    record = ParamSNR(info, series={k: [(1, snr(v, k))] for k in candidate_dims(v.shape)})
    assert record.label((1,)) == "fan_in" and record.label((0, 1)) == "all"
    assert choose_rules([record], 1.0) == {info.name: "fan_in"}


def test_norms_and_biases_are_never_compressed_even_with_high_snr():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    records = [ParamSNR(info, series={(0,): [(1, math.inf)]}) for info in classify_parameters(model)
               if info.param.ndim == 1]  # fmt: skip
    assert set(choose_rules(records, 1.0).values()) == {None}


def test_depth_patterns_only_where_they_reproduce_every_measured_rule():
    rules = {"h.0.a.w": "fan_in", "h.1.a.w": "fan_in", "h.2.a.w": None, "h.0.b.w": "fan_out", "h.1.b.w": "fan_out",
             "h.0.x.b.w": [0, 1], "emb.w": "fan_in"}  # fmt: skip
    folded = generalise_over_depth(rules, [*rules, "h.0.norm"])
    assert folded == {"h.2.a.w": None, "emb.w": "fan_in", "h.*.x.b.w": [0, 1], "h.*.a.w": "fan_in",
                      "h.*.b.w": "fan_out"}  # fmt: skip
    assert list(folded).index("h.*.x.b.w") < list(folded).index("h.*.b.w")  # the specific pattern matches first
    # `h.*.w` would also be the first match of the unmeasured h.n.w: exact names instead. (`*` is one
    # name component, so the deeper h.0.extra.w is no match.)
    assert generalise_over_depth({"h.0.w": None, "h.1.w": None}, ["h.0.w", "h.1.w", "h.n.w"]) == {
        "h.0.w": None, "h.1.w": None}  # fmt: skip
    assert generalise_over_depth({"h.0.w": None, "h.1.w": None}, ["h.0.w", "h.1.w", "h.0.extra.w"]) == {"h.*.w": None}


# ---------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """`lowmem snr` on a small GPT (2 layers, width 32) for 101 steps."""
    root = tmp_path_factory.mktemp("snr")
    out = root / "out"
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        main(["snr", "--config", LM_SLIM, f"--steps={STEPS}", f"--out={out}", "--layers=3", *TINY,
              f"--trainer.default_root_dir={root}"])  # fmt: skip
    return out, buffer.getvalue()


def _tiny_model(n_layer: int = 2, n_embd: int = 32) -> LanguageModel:
    return LanguageModel(n_layer=n_layer, n_head=2, n_embd=n_embd, block_size=16)


def _table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = cells
    return rows


def test_command_writes_rules_table_and_figures(tiny_run):
    import matplotlib.image

    out, stdout = tiny_run
    rules = load_slim_rules(out / "rules.json")  # parses and validates every rule
    assert any("*" in key for key in rules)  # folded over depth
    for figure in ("snr_heatmap.png", "snr_over_steps.png"):
        assert matplotlib.image.imread(out / figure).ndim == 3
    assert str(out / "snr_table.md") in stdout and "chosen rule per role" in stdout

    model = _tiny_model()
    text = (out / "snr_table.md").read_text()
    rows = _table_rows(text)
    assert set(rows) == {i.name for i in classify_parameters(model)}
    assert "snapshots of v at steps 1, 100." in text
    # Every chosen dim in the table is what SlimAdamW resolves from rules.json for that parameter.
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no rule that matches nothing
        groups = slimadam_param_groups(model, rules=out / "rules.json")
    dims = {name: g["compress_dims"] for g in groups for name, _ in g["params"]}
    shapes = {name: p.shape for g in groups for name, p in g["params"]}
    for name, cells in rows.items():
        shown = re.search(r"\[([\d, ]+)\]", cells[7])
        assert (tuple(int(d) for d in shown.group(1).split(",")) if shown else None) == dims[name], name
        assert cells[5] != "—" or cells[1] in ("norm", "bias")  # measured unless never compressed
    # The byte totals: X = v kept under rules.json, Y = AdamW's v, and the saved column adds up.
    kept = sum(4 * math.prod(1 if d in (dims[n] or ()) else s for d, s in enumerate(shapes[n])) for n in dims)
    full = sum(4 * math.prod(shapes[n]) for n in dims)
    total = re.search(r"v bytes: ([\d,]+) of ([\d,]+) \((\d+\.\d)%\)", text)
    assert (int(total.group(1).replace(",", "")), int(total.group(2).replace(",", ""))) == (kept, full)
    assert float(total.group(3)) == pytest.approx(100 * kept / full, abs=0.05)
    assert sum(int(c[8].replace(",", "")) for c in rows.values()) == full - kept
    assert kept < full / 4  # the small GPT compresses most of its matrices


def test_generated_rules_train_slimadamw_through_lowmem_fit(tiny_run, tmp_path):
    out, _ = tiny_run
    main(["fit", "--config", LM_SLIM, *TINY, "--trainer.max_steps=2", f"--trainer.default_root_dir={tmp_path}",
          f"--model.init_args.optimizer.init_args.rules={out / 'rules.json'}"])  # fmt: skip
    (ckpt,) = tmp_path.glob("lightning_logs/*/checkpoints/*.ckpt")
    optimizer = torch.load(ckpt, map_location="cpu", weights_only=True)["optimizer_states"][0]
    model = _tiny_model()
    expected = {name: g["compress_dims"] for g in slimadam_param_groups(model, rules=out / "rules.json")
                for name, _ in g["params"]}  # fmt: skip
    shapes = dict(model.named_parameters())
    seen = 0
    for group in optimizer["param_groups"]:
        for index, name in zip(group["params"], group["param_names"]):
            reduced = [1 if d in (expected[name] or ()) else n for d, n in enumerate(shapes[name].shape)]
            assert list(optimizer["state"][index]["exp_avg_sq"].shape) == reduced, name
            seen += expected[name] is not None
    assert seen >= 8  # the compressed matrices really trained with a reduced v


def _fan_terms(model: nn.Module, rules_path: Path) -> dict[str, set]:
    """Role -> the set of rules (in fan terms) SlimAdamW resolves for the model's parameters."""
    infos = {i.name: i for i in classify_parameters(model)}
    by_role: dict[str, set] = defaultdict(set)
    for group in slimadam_param_groups(model, rules=rules_path):
        for name, _ in group["params"]:
            info, dims = infos[name], group["compress_dims"]
            term = {tuple(info.fan_in_dims): "fan_in", tuple(info.fan_out_dims): "fan_out"}.get(dims, dims)
            by_role[info.role.value].add(term)
    return dict(by_role)


def test_rules_transfer_to_a_deeper_and_wider_model_of_the_family(tiny_run):
    out, _ = tiny_run
    rules = load_slim_rules(out / "rules.json")
    big = _tiny_model(n_layer=3, n_embd=48)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every exact name and pattern matches a parameter of the big model
        big_terms = _fan_terms(big, out / "rules.json")
    assert big_terms == _fan_terms(_tiny_model(), out / "rules.json")
    import fnmatch

    for name, _ in big.named_parameters():  # no parameter of the new layer falls back to the role table
        assert name in rules or any(fnmatch.fnmatchcase(name, k) for k in rules), name


@pytest.mark.parametrize("family", ["lm", "cnn", "diffusion"])
def test_committed_rules_files_fit_their_family(family):
    """configs/rules/<family>_snr.json (the quality benchmark's "SlimAdamW (SNR rules)") still names
    the family's parameters: every entry matches and no parameter falls back to the role table."""
    import fnmatch
    import importlib

    from lowmem.cli.config_files import load_with_bases

    model_config = load_with_bases(ROOT / "configs" / f"{family}_slimadamw.yaml")["model"]
    module, _, name = model_config["class_path"].rpartition(".")
    init_args = {k: v for k, v in model_config["init_args"].items() if k not in ("optimizer", "lr_scheduler")}
    model = getattr(importlib.import_module(module), name)(**init_args)
    path = ROOT / "configs" / "rules" / f"{family}_snr.json"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        slimadam_param_groups(model, rules=path)
    rules = load_slim_rules(path)
    for info in classify_parameters(model):
        assert info.name in rules or any(fnmatch.fnmatchcase(info.name, k) for k in rules), info.name


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["snr", "--config", "missing.yaml"], "File does not exist"),
        (["snr", "--config", LM_ADAMW, "--steps=0"], "--steps=0: the AdamW run needs at least 1 optimizer step"),
        (["snr", "--config", LM_ADAMW, "--cutoff=nan"], "cutoff=nan: expected a number"),
        (["snr", "--config", LM_ADAMW, "--cutoff=1e400"], "--cutoff=inf: the SNR cutoff must be a finite number >= 0"),
        (["snr", "--config", LM_ADAMW, "--cutoff=-1"], "--cutoff=-1.0: the SNR cutoff must be a finite number >= 0"),
        (["snr", "--config", LM_ADAMW, "--layers=0"], "--layers=0: snr_over_steps.png draws at least one"),
        (["snr", "--config", str(ROOT / "examples" / "plain_lightning.yaml")], "lowmem snr needs a LowMemModule"),
    ],
    ids=["missing-config", "steps-0", "cutoff-nan", "cutoff-overflow", "cutoff-negative", "layers-0",
         "plain-lightning-module"],
)
def test_bad_input_gives_one_line_and_exit_code_2(args, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lowmem: error:")]
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err
    assert not list(tmp_path.glob("**/*.ckpt"))  # refused before any training


# ---------------------------------------------------------------- the default transformer


@pytest.mark.slow
def test_default_lm_config_agrees_with_the_paper_or_docs_explain(tmp_path):
    """On configs/lm_adamw.yaml (300 steps) every role's chosen rules are the paper's (the role table,
    docs/algorithms.md §3) or the role is listed under the differences in docs/snr.md."""
    main(["snr", "--config", LM_ADAMW, f"--out={tmp_path}", f"--trainer.default_root_dir={tmp_path}", *QUIET])
    model = LanguageModel(block_size=64)
    measured = _fan_terms(model, tmp_path / "rules.json")
    docs = (ROOT / "docs" / "snr.md").read_text()
    explained = set(re.findall(r"^\| `(\w+)` \| .* \| differs \|", docs, flags=re.M))
    for role, terms in measured.items():
        paper = ROLE_RULES[next(i.role for i in classify_parameters(model) if i.role.value == role)]
        assert terms == {paper} or role in explained, (role, terms, paper)
