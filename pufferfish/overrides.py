"""The command line checked as Hydra will read it, before Hydra runs.

Hydra answers the commonest mistakes with many lines and exit 1 (an unknown option prints its config
search path; a misspelled key suggests `+key=...`, which then fails silently) or with a traceback (a
missing `checkpoint=`, an unwritable hydra.run.dir); these become one ConfigError each, which the entry
point prints as one line with exit 2, like every other Pufferfish error. The same checks explain a bad
override given to the Python API.
"""

from __future__ import annotations

import difflib
import shutil
import tempfile
from pathlib import Path

from hydra.errors import HydraException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import GROUPS, compose_config
from .errors import ConfigError
from .paths import CONF_DIR
from .validate import check_overrides

# Hydra flags whose value is the next argument: it is not an override
FLAGS_WITH_VALUE = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun",
                    "--cfg", "-c", "--package", "-p"}  # fmt: skip
# flags after which Hydra composes another config, or from other folders: only Hydra knows it then
FLAGS_OTHER_CONFIG = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun"}
# flags that print and run nothing (--cfg: the composed config)
FLAGS_WITHOUT_RUN = {"--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc", "--version", "--cfg",
                     "-c"}  # fmt: skip
LAUNCHERS_NEEDING = {"submitit_slurm": "sbatch"}  # launcher option -> the program it submits jobs with
REQUIRED = {  # what a ??? key of the entry point's YAML wants, in plain words
    "checkpoint": "a run directory, its checkpoints folder or a .pt file",
    "out": "the folder to write the Hugging Face files into",
}
MEASURE = "python -m pufferfish.lab.measure"
MOVED = {  # settings that left the training config, and where they are now
    "job": f"the measuring job (job=measure) is a command of its own: {MEASURE} [group=option ...]",
    "train.measure_steps": f"the measuring job's steps are measure.steps of {MEASURE}",
    "train.measure_batches": f"the measuring job's batches are measure.batches of {MEASURE}",
}


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(overrides, flags) of a Hydra command line."""
    overrides, flags, skip = [], [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.startswith("-"):
            flags.append(arg.split("=", 1)[0])
            skip = arg in FLAGS_WITH_VALUE
        else:
            overrides.append(arg)
    return overrides, flags


def composes_groups(conf_dir: Path, config_name: str) -> bool:
    """Whether the primary config conf/<config_name>.yaml composes the config groups (train.yaml does;
    export.yaml and generate.yaml have none)."""
    defaults = OmegaConf.load(conf_dir / f"{config_name}.yaml").get("defaults", [])
    return any(isinstance(d, DictConfig) and set(d) & set(GROUPS) for d in defaults)


def group_options(conf_dir: Path) -> dict[str, list[str]]:
    """{group: its options} from the YAML files under conf/<group>/ (experiment options may be nested)."""
    groups = {}  # nested folders are groups too (experiment/memory=all)
    for folder in sorted(p for p in conf_dir.rglob("*") if p.is_dir() and p.relative_to(conf_dir).parts[0] != "hydra"):
        name = folder.relative_to(conf_dir).as_posix()
        groups[name] = sorted(f.relative_to(folder).with_suffix("").as_posix() for f in folder.rglob("*.yaml"))
    launchers = conf_dir / "hydra" / "launcher"
    groups["hydra/launcher"] = sorted(["basic", *(f.stem for f in launchers.glob("*.yaml"))])
    return groups


def one_line(e: BaseException) -> str:
    """Hydra's and OmegaConf's message with its cause, without the config search path and object types."""
    lines = []
    for part in (e, e.__cause__):
        for line in str(part or "").splitlines():
            line = line.strip()
            if not line or line.startswith(("full_key:", "reference_type", "object_type", "Config search path",
                                            "provider=", "See https://")):  # fmt: skip
                if line.startswith("Config search path"):
                    break
                continue
            if line not in lines:
                lines.append(line)
    return "; ".join(lines) or type(e).__name__


def keys_of(node, prefix: str = "") -> list[str]:
    found = []
    for key in node.keys():
        found.append(f"{prefix}{key}")
        if not OmegaConf.is_missing(node, key) and isinstance(node.get(key), DictConfig):
            found += keys_of(node[key], f"{prefix}{key}.")
    return found


def first_values(parsed, items: list[str]) -> list[str]:
    """Each override with a sweep (a,b,c) reduced to its first value: a multirun's jobs share their keys."""
    out = []
    for o, item in zip(parsed, items):
        if o.is_sweep_override():
            first = next(iter(o.sweep_string_iterator()), None)
            if first is None:
                continue
            out.append(f"{item.partition('=')[0]}={first}")
        else:
            out.append(item)
    return out


def writable_folder(key: str, value: str) -> None:
    """hydra.run.dir / hydra.sweep.dir: Hydra creates it before Pufferfish runs, with a traceback if it cannot."""
    if "${" in value:  # Hydra's own interpolation (the default, under outputs/): checked by the run itself
        return
    existing = Path(value).absolute()
    while not existing.exists():
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "a file is in the way")
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as e:
        raise ConfigError(f"{key}={value} cannot be created ({e.strerror}: {existing}); choose a writable "
                          f"folder") from None  # fmt: skip


def check_command_line(argv: list[str], config_name: str = "train", module: str | None = None) -> None:
    """Raise a ConfigError for the first override Hydra would not take; return quietly otherwise. `module` is
    the command's, for the messages (default pufferfish.<config_name>)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    module = module or f"pufferfish.{config_name}"
    items, flags = split_argv(argv)
    if set(flags) & FLAGS_WITHOUT_RUN:  # help and info: nothing runs (and --info takes an optional word)
        return
    parser, parsed = OverridesParser.create(), []
    for item in items:
        try:
            parsed.append(parser.parse_overrides([item])[0])
        except OverrideParseException as e:
            raise ConfigError(f"{item!r} cannot be read as key=value ({str(e).splitlines()[0]}); quote a value "
                              f"holding ( ) [ ] {{ }} , or spaces: 'prompt=\"f(x)\"'") from None  # fmt: skip
    check_overrides(items)
    elsewhere = set(flags) & FLAGS_OTHER_CONFIG or any(o.key_or_group == "hydra.searchpath" for o in parsed)
    grouped = not elsewhere and composes_groups(CONF_DIR, config_name)
    groups = group_options(CONF_DIR) if grouped else {"hydra/launcher": []}
    for o in parsed:
        key = o.key_or_group
        if key in groups and groups[key] and not o.is_delete():
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [str(o.value())]
            for value in values:
                if value not in groups[key]:
                    raise ConfigError(f"{key}={value} is not an option of {key}; choose one of: "
                                      f"{', '.join(groups[key])}")  # fmt: skip
                need = LAUNCHERS_NEEDING.get(value) if key == "hydra/launcher" else None
                if need and not shutil.which(need):
                    raise ConfigError(f"{key}={value} needs SLURM, but `{need}` is not on this machine's PATH; "
                                      f"use hydra/launcher=submitit_local or leave the launcher out")  # fmt: skip
    if elsewhere:  # options and keys may come from the other folders
        return
    own = [(o, item) for o, item in zip(parsed, items) if not o.key_or_group.startswith("hydra")]
    plain = first_values([o for o, _ in own], [item for _, item in own])
    try:
        base = compose_config([i for (o, _), i in zip(own, plain) if o.key_or_group in groups], config_name)
    except (HydraException, OmegaConfBaseException) as e:
        hint = f"; an experiment of the measuring job runs as {MEASURE} -m experiment=..." \
            if "Key 'measure' not in" in str(e.__cause__ or e) else ""  # fmt: skip
        raise ConfigError(one_line(e) + hint) from None
    known = keys_of(base)
    for o, _ in own:  # a misspelled key: Hydra would suggest `+key=`, which adds a setting nothing reads
        key = o.key_or_group
        if key in MOVED and key not in known:  # with + too: nothing would read it
            raise ConfigError(f"{key} is not a setting of {module}: {MOVED[key]}")
        if o.is_add() or key in groups or key in known:
            continue
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else f"`python -m {module} --cfg job` lists them"
        raise ConfigError(f"{key} is not a setting of {module}; {hint}")
    try:
        cfg = compose_config(plain, config_name)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(one_line(e)) from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(", ".join(f"{k}= is required ({REQUIRED.get(k, 'no default')})" for k in missing)
                          + f": python -m {module} " + " ".join(f"{k}=..." for k in missing))  # fmt: skip
    for o in parsed:
        if o.key_or_group in ("hydra.run.dir", "hydra.sweep.dir") and not o.is_sweep_override():
            writable_folder(o.key_or_group, str(o.value()))
