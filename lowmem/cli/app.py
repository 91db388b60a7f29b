"""`lowmem fit|validate|test|predict --config X.yaml`: LightningCLI wired the lowmem way.

- model and data in subclass mode: any ``LightningModule`` / ``LightningDataModule`` subclass is
  selected by ``class_path``, including a user's own (``LowMemModule`` subclasses get the optimizer
  injected; a plain LightningModule with the ``FoldedMomentumMixin`` builds its own);
- ``MemoryMonitor`` is on by default, and ``LowMemCallback`` (fit-start checks, training RNG
  stream) too: a ``LowMemModule`` brings its own, any other module gets one;
- optimizers are injected into the module as callables (``model.init_args.optimizer``), never via
  the CLI's automatic top-level ``optimizer:`` key, which cannot express parameter groups and
  builds the optimizer before sharding;
- ``config.yaml`` is saved next to the logs and overwritten on a second run into the same dir;
- bad input (missing file, unknown class, misspelled key, invalid hyperparameter) ends with a
  one-line ``lowmem: error: ...`` and exit code 2; an exception raised inside the user's own code
  (a model's ``__init__``) keeps its traceback.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any

# Lightning 2.6 itself calls jsonargparse APIs deprecated in 4.49; the warnings are not actionable
# for a lowmem user.
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")

import torch
import yaml
from torch.distributed.fsdp import FSDPModule
from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.model_helpers import is_overridden

import lowmem.lightning_modules  # noqa: F401  (registers short class names for configs)
from lowmem.cli.compare import compare_main, read_scalars
from lowmem.cli.config_files import expand_config_bases
from lowmem.cli.memory import format_memory_table, memory_report
from lowmem.cli.trainer_checks import check_trainer_config
from lowmem.lightning_modules.base import LowMemModule
from lowmem.lightning_modules.errors import ConfigError, lightning_config_error, user_code_error
from lowmem.lightning_modules.callbacks import MemoryMonitor
from lowmem.lightning_modules.integration import LowMemCallback, TrainingDiverged
from lowmem.strategies import StrategyError

__all__ = ["LowMemCLI", "main"]


# Lines of jsonargparse's Union-type diagnostics that restate the obvious.
_PARSER_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Expected a <class 'NoneType'>",
    "Given value type:",
    "Given value:",
)


def condense_parser_error(message: str) -> str:
    """One readable line from a jsonargparse error: the key, the problem, the detail."""
    lines = [line.strip(" -") for line in message.splitlines()]
    line = " ".join(line for line in lines if line and not any(noise in line for noise in _PARSER_NOISE))
    return _key_value_form(line) or line


_PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
_WRONG_TYPE = re.compile(r"Expected a <class '(\w+)'>\. Got value: (.*?)(?= Type |\. Got value:|$)")
_TYPE_WORDS = {"int": "an int", "float": "a number", "str": "a string", "bool": "true or false"}


def _key_value_form(line: str) -> str | None:
    """``model.init_args.optimizer.init_args.lr=abc: expected a number`` for jsonargparse's nested
    'Parser key "model": Problem with given class_path ...: Parser key "lr": Expected a <class
    'float'>. Got value: abc ...' (the key as a config writes it); None for other messages."""
    keys, wrong = _PARSER_KEY.findall(line), _WRONG_TYPE.search(line)
    if not keys or wrong is None or wrong.group(1) not in _TYPE_WORDS:
        return None
    return f"{'.init_args.'.join(keys)}={wrong.group(2)}: expected {_TYPE_WORDS[wrong.group(1)]}"


# ``--ckpt_path`` values Lightning resolves itself rather than reading a file.
_CKPT_KEYWORDS = ("last", "best", "hpc", "registry")
_CKPT_SCHEMES = ("s3://", "gs://", "http://", "https://", "registry:")


class LowMemArgumentParser(LightningArgumentParser):
    """Prints parse errors as one ``lowmem: error: ...`` line instead of the full usage text."""

    def error(self, message: str, ex: Exception | None = None):  # type: ignore[override]
        if not self.exit_on_error:
            return super().error(message, ex)
        prog = self.prog.replace(" [options]", "")
        sys.stderr.write(f"lowmem: error: {condense_parser_error(message)}\n(see `{prog} --help`)\n")
        self.exit(2)


_DESCRIPTION = (
    "Train with memory-efficient Adam variants. Subcommands: fit, validate, test, predict (Lightning's), "
    "memory (optimizer state of a config vs AdamW, no training) and compare (train several configs, one figure: "
    "`lowmem compare --help`)."
)


class LowMemTrainer(Trainer):
    """Lightning's Trainer plus lowmem's own subcommands."""

    def memory(self, model: LightningModule, datamodule: LightningDataModule, ranks: int = 1) -> None:
        """Print the params/grads/optimizer-state table (MiB) of the config's model and optimizer vs AdamW.

        Args:
            ranks: also show the persistent state per rank and in total under FSDP2 with this many
                ranks (from the shard plan; nothing is started).
        """
        if ranks < 1:
            raise ConfigError(f"--ranks={ranks} must be >= 1 (the number of FSDP2 ranks to plan for)")
        if not isinstance(model, LowMemModule):
            raise ConfigError(
                f"lowmem memory needs a LowMemModule (it runs compute_loss and swaps the injected optimizer); "
                f"model.class_path {type(model).__module__}.{type(model).__qualname__} is a plain LightningModule. "
                "Subclass lowmem.lightning_modules.LowMemModule, or measure with lowmem.optim.state_bytes."
            )
        print(format_memory_table(memory_report(model, datamodule, ranks)))

    def roles(self, model: LightningModule, datamodule: LightningDataModule) -> None:
        """Print every parameter's role and what SlimAdamW, AdaPM, Adam-mini and IO-Adam do with it, no training."""
        from lowmem.cli.roles import roles_command

        print(roles_command(model))

    def snr(self, model: LightningModule, datamodule: LightningDataModule, steps: int | None = None,
            cutoff: float = 1.0, out: str | None = None, layers: int = 4) -> None:  # fmt: skip
        """Train with AdamW, measure the SNR of Adam's v per layer, write SlimAdamW rules, table, figures (docs/snr.md).

        Args:
            steps: optimizer steps of the AdamW run (default: the config's own length).
            cutoff: minimum mean SNR for compressing along a set of dims (the paper's 1.0).
            out: output folder (default: the run's log dir, or snr/ without a logger).
            layers: parameters drawn in snr_over_steps.png.
        """
        from lowmem.cli.snr import snr_command

        snr_command(self, model, datamodule, steps=steps, cutoff=cutoff, out=out, layers=layers)


class LowMemCLI(LightningCLI):
    """LightningCLI with lowmem's conventions; ``LOWMEM_*`` environment variables override keys."""

    def __init__(self, args: ArgsType = None, run: bool = True) -> None:
        args = _resolve_config_bases(args)
        self._argv = [str(a) for a in args] if isinstance(args, (list, tuple)) else sys.argv[1:]
        super().__init__(
            model_class=LightningModule,
            datamodule_class=LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"env_prefix": "LOWMEM", "default_env": False, "description": _DESCRIPTION},
            parser_class=LowMemArgumentParser,
            trainer_class=LowMemTrainer,
            trainer_defaults={"callbacks": [MemoryMonitor()]},
            args=args,
            run=run,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "memory": {"model", "datamodule"}, "snr": {"model", "datamodule"},
                "roles": {"model", "datamodule"}}

    def before_instantiate_classes(self) -> None:
        """An optimizer class named on the command line starts from its own defaults.

        jsonargparse keeps the config file's ``init_args`` that the new class also accepts, so
        ``--model.init_args.optimizer=lowmem.strategies.Adafactor`` on an AdamW config would train
        Adafactor with AdamW's lr and weight decay. Here the new class gets its defaults plus only
        what the command line itself sets for it.
        """
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        check_trainer_config(config.get("trainer") or {})
        optimizer = _get(config, "model.init_args.optimizer")
        explicit = _optimizer_keys_on_command_line(self._argv)
        if explicit is None or not isinstance(getattr(optimizer, "init_args", None), dict | Namespace):
            return
        defaults = _signature_defaults(optimizer.class_path)
        for key in list(optimizer.init_args.keys()):
            if key not in explicit and key in defaults:
                optimizer.init_args[key] = defaults[key]

    def _parse_ckpt_path(self) -> None:
        """Refuse a ``--ckpt_path`` that is no file or no checkpoint (truncated, not a ``torch.save``
        archive) in one line, before Lightning reads the hyperparameters from it."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path == "last":
            ckpt_path = self.config[subcommand]["ckpt_path"] = self._resolve_last(subcommand)
        if ckpt_path and ckpt_path not in _CKPT_KEYWORDS and not str(ckpt_path).startswith(_CKPT_SCHEMES):
            path = Path(ckpt_path)
            if path.is_dir():  # a distributed (sharded) checkpoint: one folder, one file per rank
                if not (path / ".metadata").is_file():
                    raise ConfigError(f"--ckpt_path {ckpt_path} is a folder but not a distributed checkpoint (it has no "
                                      ".metadata); give a .ckpt file or folder written by a fit")  # fmt: skip
            elif not path.is_file():
                raise ConfigError(f"--ckpt_path {ckpt_path}: no such file; give a .ckpt file written by a fit, "
                                  "e.g. lightning_logs/version_0/checkpoints/<name>.ckpt")  # fmt: skip
            elif not zipfile.is_zipfile(path):
                raise ConfigError(f"--ckpt_path {ckpt_path} is not a readable checkpoint (truncated, or not written by "
                                  "torch.save); pick another checkpoint of the run")  # fmt: skip
            else:
                self._check_checkpoint_model(subcommand, ckpt_path)
        super()._parse_ckpt_path()

    def _resolve_last(self, subcommand: str) -> str | None:
        """``--ckpt_path last``: the newest checkpoint any earlier run in this folder wrote
        (``<default_root_dir>/lightning_logs/version_*/checkpoints/``, or ``checkpoints/`` without
        a logger). Lightning looks only in this run's new ``version_N`` folder, finds nothing, and
        starts from step 0; a fit with none to resume says so and starts from step 0."""
        root = Path(self.config[subcommand]["trainer"].get("default_root_dir") or os.getcwd())
        candidates = [*root.glob("lightning_logs/*/checkpoints/*.ckpt"), *root.glob("checkpoints/*.ckpt")]
        stamp = lambda p: (p / ".metadata" if p.is_dir() else p).stat().st_mtime  # noqa: E731
        candidates = [p for p in candidates if p.is_file() or (p / ".metadata").is_file()]
        if candidates:
            newest = max(candidates, key=stamp)
            print(f"lowmem {subcommand}: --ckpt_path last: resuming from {newest}", file=sys.stderr)
            return str(newest)
        if subcommand != "fit":
            raise ConfigError(f"--ckpt_path last: no checkpoint under {root}/lightning_logs/*/checkpoints to "
                              f"{subcommand}; give the path of a .ckpt file")  # fmt: skip
        print(f"lowmem fit: --ckpt_path last: no checkpoint under {root}/lightning_logs yet; starting from step 0",
              file=sys.stderr)  # fmt: skip
        return None

    def _check_checkpoint_model(self, subcommand: str, ckpt_path: str) -> None:
        """The checkpoint's model against the config's: another class is an error; other
        hyperparameters are an error when resuming a fit (the weights would not fit, or training
        would silently change model) and a note for validate/test/predict, which evaluate the
        checkpoint's model (Lightning takes its hyperparameters)."""
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
        self._checkpoint_step = checkpoint.get("global_step")  # reported after validate/test
        saved = checkpoint.get("hyper_parameters") or {}
        model = self.config[subcommand].get("model")
        if not saved or model is None or "_class_path" not in saved:
            return
        configured = model.get("class_path")
        if configured and saved["_class_path"] != configured:
            raise ConfigError(f"--ckpt_path {ckpt_path} holds a {saved['_class_path']}, but model.class_path is "
                              f"{configured}; use the config the checkpoint was trained with")  # fmt: skip
        init_args = model.get("init_args") or {}
        differ = sorted(k for k, v in saved.items() if not k.startswith("_") and k in init_args
                        and _plain(init_args[k]) != _plain(v))  # fmt: skip
        if not differ:
            return
        shown = ", ".join(f"model.init_args.{k}: {_plain(saved[k])!r} in the checkpoint, {_plain(init_args[k])!r} "
                          "in the config" for k in differ)  # fmt: skip
        if subcommand == "fit":
            raise ConfigError(f"--ckpt_path {ckpt_path} was trained with other model settings ({shown}); resume "
                              "with the checkpoint's settings")  # fmt: skip
        print(f"lowmem {subcommand}: note: evaluating the checkpoint's model ({shown})", file=sys.stderr)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Swap ``trainer.precision`` for the plugin the optimizer strategy needs (fp16 + HMAdam)."""
        config = self._get(self.config_init, "trainer", default={})
        strategy = getattr(self.model, "optimizer_strategy", None)
        precision, accelerator = config.get("precision"), config.get("accelerator")
        if strategy is not None and precision is not None and not config.get("plugins"):
            device = "cpu" if accelerator == "cpu" or not torch.cuda.is_available() else "cuda"
            plugin = strategy.precision_plugin(str(precision), device)
            if plugin is not None:
                kwargs.update(precision=None, plugins=[plugin])
        trainer = super().instantiate_trainer(**kwargs)
        _reserve_log_version(trainer)
        if not any(isinstance(c, LowMemCallback) for c in trainer.callbacks):  # a LowMemModule brings its own
            if not isinstance(self.model, LowMemModule):
                trainer.callbacks.append(LowMemCallback())
        return trainer

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            if (original := user_code_error(err)) is not None:
                raise original
            if (own := _config_error_in(err)) is not None:  # already one line naming the key
                raise own from None
            raise ConfigError(f"could not build the configured classes: {condense_parser_error(str(err))}") from err

    def before_validate(self) -> None:
        self._warn_if_untrained("validate")

    def before_test(self) -> None:
        self._warn_if_untrained("test")

    def _warn_if_untrained(self, stage: str) -> None:
        if self.config[self.subcommand].get("ckpt_path") is None:
            print(f"lowmem {stage}: warning: no --ckpt_path given, so this evaluates the model as initialised "
                  "(untrained); pass --ckpt_path path/to/file.ckpt to evaluate a trained one", file=sys.stderr)  # fmt: skip

    def after_fit(self) -> None:
        self._validate_if_none_ran()
        self._report("fit")
        # What the run held, against AdamW: replayed in this process, so one-process runs only (a replay
        # on rank 0 would run the optimizers' collectives alone; FSDP2 modules cannot be copied).
        sharded = any(isinstance(m, FSDPModule) for m in self.model.modules())  # FSDP2, also on 1 device
        if self.trainer.world_size == 1 and not sharded and not self.trainer.interrupted:
            from lowmem.cli.memory import fit_memory_summary

            summary = fit_memory_summary(self.trainer, self.model, self.datamodule)
            if summary:
                print(summary)

    def _validate_if_none_ran(self) -> None:
        """A fit that ended before its first validation (``max_steps`` below ``val_check_interval``)
        is validated once at its end, so every fit reports ``val/*`` (and ``lowmem compare`` has a
        number); not when validation is switched off (``limit_val_batches: 0``)."""
        trainer = self.trainer
        if trainer.limit_val_batches == 0 or trainer.global_step == 0 or trainer.interrupted:
            return
        if any(k.startswith("val/") for k in trainer.callback_metrics):
            return
        if not (is_overridden("validation_step", self.model) and is_overridden("val_dataloader", self.datamodule)):
            return
        trainer.validate(self.model, datamodule=self.datamodule, verbose=False)

    def after_validate(self) -> None:
        self._report("validate")

    def after_test(self) -> None:
        self._report("test")

    def _evaluated(self, stage: str) -> str:
        """What the metrics are of: the fit's last step, or the evaluated checkpoint's step."""
        if stage == "fit":
            return f"step {self.trainer.global_step}"
        step, ckpt = getattr(self, "_checkpoint_step", None), self.config[stage].get("ckpt_path")
        if step is not None:
            return f"checkpoint step {step}"
        return f"checkpoint {ckpt}" if ckpt else "untrained model"

    def _report(self, stage: str) -> None:
        """Print the final validation/test metrics and the log folder, on global rank 0 only.

        ``Trainer.log_dir`` is a collective (a broadcast from rank 0) under DDP/FSDP: every rank
        reads it before the non-zero ranks return, or rank 0 waits on peers that have exited.
        """
        log_dir = self.trainer.log_dir if self.trainer.logger is not None else None
        if not self.trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith(("val/", "test/"))}
        if metrics:
            shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
            print(f"lowmem {stage}: {self._evaluated(stage)}: {shown}")
        if log_dir:
            print(f"lowmem {stage}: logs in {log_dir}")


# version_N folders this process reserved (rank 0): a run refused at setup leaves no empty one behind.
_RESERVED_LOG_DIRS: list[Path] = []


def _discard_unused_log_dirs() -> None:
    """Remove the ``version_N`` folders this run reserved if nothing was trained into them: no
    checkpoint and no logged scalar (the config copy and an hparams-only event file of a run
    refused at setup). A folder with either is kept."""
    for folder in _RESERVED_LOG_DIRS:
        if folder.is_dir() and not (folder / "checkpoints").exists() and not read_scalars(folder):
            shutil.rmtree(folder, ignore_errors=True)
    _RESERVED_LOG_DIRS.clear()


def _reserve_log_version(trainer: Trainer) -> None:
    """Give a TensorBoard logger without a fixed version the first free ``version_N`` folder,
    created at once (``mkdir`` fails if it exists): two runs started together in one folder would
    otherwise both pick the same N (Lightning picks it by listing, later) and write into one
    folder, the second config overwriting the first. Only the launching process (rank 0, or no
    rank yet) reserves; other ranks use the folder rank 0 broadcasts."""
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = trainer.logger
    rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
    if not isinstance(logger, TensorBoardLogger) or logger._version is not None or rank != "0":
        return
    root = Path(logger.root_dir)
    root.mkdir(parents=True, exist_ok=True)
    version = logger._get_next_version()
    while True:
        try:
            (root / f"version_{version}").mkdir()
            _RESERVED_LOG_DIRS.append(root / f"version_{version}")
            break
        except FileExistsError:
            version += 1
    logger._version = version


def _resolve_config_bases(args: ArgsType) -> ArgsType:
    """``args`` (or, for the console script, ``sys.argv``, rewritten in place so that Lightning's
    DDP launcher starts the other ranks with the same arguments) with config bases merged in."""
    argv = [str(a) for a in args] if isinstance(args, (list, tuple)) else None if args is not None else sys.argv[1:]
    if argv is None:  # a dict or Namespace: nothing to expand
        return args
    try:
        expanded = expand_config_bases(argv)
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise ConfigError(str(err).replace("\n", " ")) from err
    if args is not None:
        return expanded
    sys.argv[1:] = expanded
    return None


_OPTIMIZER_KEY = "--model.init_args.optimizer"


def _optimizer_keys_on_command_line(argv: list[str]) -> set[str] | None:
    """The optimizer ``init_args`` keys the command line sets, if it names an optimizer class
    (``--model.init_args.optimizer=<class or {class_path, init_args}>``); else None."""
    keys: set[str] | None = None
    for i, token in enumerate(argv):
        name, _, value = token.partition("=")
        if name == _OPTIMIZER_KEY:
            value = value if "=" in token else (argv[i + 1] if i + 1 < len(argv) else "")
            parsed = yaml.safe_load(value) if value else None
            keys = set((parsed.get("init_args") or {}) if isinstance(parsed, dict) else ())
        elif name.startswith(_OPTIMIZER_KEY + ".init_args.") and keys is not None:
            keys.add(name.removeprefix(_OPTIMIZER_KEY + ".init_args.").split(".")[0])
    return keys


def _signature_defaults(class_path: str) -> dict[str, Any]:
    module, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return {k: p.default for k, p in inspect.signature(cls).parameters.items() if p.default is not p.empty}


def _config_error_in(err: BaseException) -> ConfigError | None:
    """The :class:`ConfigError` a constructor raised, if ``err`` is it or wraps it (jsonargparse re-raises)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ConfigError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _plain(value: Any) -> Any:
    """Lists for tuples (YAML gives lists, signatures tuples), for comparing hyperparameters."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _get(namespace: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        namespace = namespace.get(part) if namespace is not None and hasattr(namespace, "get") else None
    return namespace


def main(args: ArgsType = None) -> None:
    """Entry point of the ``lowmem`` console script; ``main(["fit", "--config", path])`` from Python.

    ``lowmem compare ...`` is dispatched to :mod:`lowmem.cli.compare` (it runs several fits).
    """
    argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else []
    if argv[:1] == ["compare"]:
        raise SystemExit(compare_main(argv[1:]))
    _RESERVED_LOG_DIRS.clear()
    try:
        LowMemCLI(args=args)
    except (ConfigError, StrategyError, MisconfigurationException) as err:
        _close_process_group(wait_for_peers=False)
        _discard_unused_log_dirs()
        print(f"lowmem: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except TrainingDiverged as err:
        _close_process_group(wait_for_peers=False)
        print(f"lowmem: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except ValueError as err:
        _close_process_group(wait_for_peers=False)
        if not lightning_config_error(err):
            raise
        _discard_unused_log_dirs()
        print(f"lowmem: error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    except BaseException:
        _close_process_group(wait_for_peers=False)
        raise
    _close_process_group(wait_for_peers=True)


def _close_process_group(wait_for_peers: bool) -> None:
    """Tear down the process group Lightning's DDP/FSDP strategies leave behind.

    Lightning never destroys it; a process that exits with it alive aborts now and then in gloo's
    thread destructors ("terminate called without an active exception", exit 134) after a run that
    succeeded. After a success a barrier keeps a fast rank from tearing down while a peer still
    communicates; after a failure there is no barrier, which a failed peer might never reach.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()
