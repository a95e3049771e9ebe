"""python -m pufferfish.config_editor: choose gpu, mode and the other groups, set fields, watch the plan.

After every change the plan is made again (memory against VRAM, tokens, time), without training and
without preparing data; `save NAME` writes ./experiment/NAME.yaml (or `save PATH.yaml` there) with only
the changes, for `python -m pufferfish.train hydra.searchpath=[file://$PWD] experiment=NAME`; the package's
own conf/ is never written. Commands come from the terminal, a pipe or --script FILE:

    printf 'gpu=gtx1060\\nmode=quick_dev\\nmode.target_hours=0.2\\nsave my_run\\n' | python -m pufferfish.config_editor
"""

from __future__ import annotations

import math
import re
import sys
from collections import Counter
from pathlib import Path

from omegaconf import OmegaConf

from .config import GROUPS, compose_config
from .errors import ConfigError, OneLineArgumentParser, PufferfishError, exit_on_user_error
from .overrides import check_command_line
from .paths import CONF_DIR
from .resolver import detect_hardware, format_plan, make_plan

HELP = """Commands:
  GROUP               list a group's options and pick one by number or name  (e.g. `gpu`)
  GROUP=OPTION        choose an option                                       (e.g. `gpu=gtx1060`)
  KEY=VALUE           set any field, as on the train command line             (e.g. `mode.target_hours=2`)
  unset KEY           drop a change (a field, or a group back to its default)
  show                the plan with the reason for each decision
  changes             what differs from the defaults
  config [KEY]        the composed config, or one part of it                  (e.g. `config mode`)
  save NAME|PATH      write the changes as an experiment (./experiment/NAME.yaml, or PATH.yaml)
  help                this list           quit      leave (unsaved changes are lost)"""


def _sentences(path: Path) -> list[str]:
    """The sentences of a YAML file's opening comment (a line without a full stop ends one all the same)."""
    text = ""
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        line = line[1:].strip()
        if line.startswith("@package"):
            continue
        if text and not text.endswith((".", ",", ";", ":")) and line[:1].isupper():
            text += "."
        text += " " + line
    return [s.strip() for s in re.split(r"(?<=\.)\s+(?=[A-Z])", text.strip()) if s.strip()]


def group_options(group: str) -> list[tuple[str, str]]:
    """(option, what it is) for conf/GROUP/*.yaml: the first sentence of its opening comment that is not the
    group's preamble ("Speed and memory only."), without a leading "OPTION:"."""
    paths = sorted((CONF_DIR / group).glob("*.yaml"))
    sentences = {path.stem: _sentences(path) for path in paths}
    counts = Counter(s for said in sentences.values() for s in set(said))
    shared = {s for s, n in counts.items() if n > 1}  # said by more than one option: the group's preamble
    options = []
    for name, said in sentences.items():
        own = [s for s in said if s not in shared] or said or [""]
        options.append((name, own[0].removeprefix(f"{name}:").strip()))  # gpu profiles open with their own name
    return options


def _bytes_per_token(vocab_size: int) -> float:
    # measured here: ~1.9 bytes/token at 512 pieces (Shakespeare), ~3.6 at 8192; about +0.43 per doubling
    return 1.9 + 0.425 * (math.log2(max(vocab_size, 256)) - 9)


def corpus_tokens(data_cfg) -> tuple[int, int, str]:
    """(train tokens, vocab size, where they come from), from a prepared cache entry or else an estimate."""
    from .data import cache_folder
    from .data.tokenizer import auto_vocab_size

    try:
        meta_path = cache_folder(data_cfg)[0] / "meta.json"
    except (PufferfishError, KeyError, OSError) as e:
        return 10_000_000, data_cfg.vocab_size or 8192, f"assumed 10M tokens ({e})"
    if meta_path.is_file():
        meta = OmegaConf.load(meta_path)
        return int(meta.train.tokens), int(meta.vocab_size), f"prepared: {meta_path.parent}"
    size = _source_bytes(data_cfg)
    if size is None:
        return 100_000_000, data_cfg.vocab_size or 8192, "assumed 100M tokens: a hub corpus's size is known once prepared"
    vocab = data_cfg.vocab_size or auto_vocab_size(int(size * (1 - data_cfg.val_fraction)))
    bpt = _bytes_per_token(vocab)
    tokens = int(size * (1 - data_cfg.val_fraction) / bpt)
    return tokens, vocab, f"estimated from {size / 1e6:.1f} MB of text at ~{bpt:.1f} bytes/token"


def _source_bytes(data_cfg) -> int | None:
    if data_cfg.source == "pystdlib":
        import sysconfig

        root = Path(sysconfig.get_paths()["stdlib"])
        return sum(p.stat().st_size for p in root.rglob("*.py") if "site-packages" not in p.parts)
    if data_cfg.source == "text":
        files = []
        for given in data_cfg.paths:
            path = Path(str(given)).expanduser()
            files += [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        return sum(p.stat().st_size for p in files)
    return None


class Editor:
    def __init__(self, experiment_dir: Path, out=sys.stdout):
        self.experiment_dir = experiment_dir
        self.out = out
        self.choices: dict[str, str] = {}  # group -> option, as chosen here
        self.fields: dict[str, str] = {}  # key -> value, as typed (Hydra override syntax)
        self.defaults = {g: self._option_name(compose_config([]), g) for g in GROUPS}
        self.cfg = compose_config([])
        self._hardware: dict[str, object] = {}
        self._corpus: dict[str, tuple] = {}

    @staticmethod
    def _option_name(cfg, group: str) -> str:
        return str(OmegaConf.select(cfg, f"{group}.name", default="default"))

    def say(self, text: str = "") -> None:
        print(text, file=self.out)

    def overrides(self) -> list[str]:
        return [f"{g}={o}" for g, o in self.choices.items()] + [f"{k}={v}" for k, v in self.fields.items()]

    def apply(self, change: dict[str, str], target: dict[str, str]) -> bool:
        """Compose with one more change; keep it only if the train command line would take it."""
        before = dict(target)
        target.update(change)
        try:  # the train command line's own checks: the options of a group, the closest key to a misspelled one
            check_command_line(self.overrides())
            self.cfg = compose_config(self.overrides())
        except PufferfishError as e:
            target.clear()
            target.update(before)
            self.say(f"not changed: {e}")
            return False
        return True

    def plan_text(self) -> str:
        cfg = self.cfg
        hw_key = OmegaConf.to_yaml(cfg.gpu) + str(cfg.optimizations.precision) + str(cfg.train.device)
        if hw_key not in self._hardware:  # the cpu profile measures the matmul rate: once is enough
            self._hardware[hw_key] = detect_hardware(cfg.gpu, cfg.optimizations, cfg.train.device)
        data_key = OmegaConf.to_yaml(cfg.data)
        if data_key not in self._corpus:
            self._corpus[data_key] = corpus_tokens(cfg.data)
        tokens, vocab, source = self._corpus[data_key]
        plan = make_plan(cfg, self._hardware[hw_key], vocab, tokens)
        return f"{format_plan(plan)}\n  note: corpus {tokens / 1e6:.2f}M tokens, {source}"

    def show(self, reasons: bool = False) -> None:
        self.say(f"\n== {' '.join(self.overrides()) or '(the defaults)'}")
        try:
            text = self.plan_text()
        except PufferfishError as e:
            self.say(f"no plan: {e}")
            return
        if not reasons:  # after a change: the table and the corpus note; `show` adds the reason for each
            table, _, why = text.partition("\n\nWhy\n")
            text = "\n".join([table] + [line for line in why.splitlines() if line.startswith("  note:")])
        self.say(text)

    def pick(self, group: str, read) -> None:
        options = group_options(group)
        current = self._option_name(self.cfg, group)
        for i, (name, about) in enumerate(options, 1):
            self.say(f"  {i:2d}. {name:<14} {'*' if name == current else ' '} {about}")
        answer = read(f"{group} (number or name, empty keeps {current}): ").strip()
        if not answer:
            return
        name = options[int(answer) - 1][0] if answer.isdigit() and 0 < int(answer) <= len(options) else answer
        if self.apply({group: name}, self.choices):
            self.show()

    def experiment_yaml(self, name: str) -> str:
        lines = ["# @package _global_",
                 f"# python -m pufferfish.train experiment={name}   (written by python -m pufferfish.config_editor)"]  # fmt: skip
        changed = {g: o for g, o in self.choices.items() if o != self.defaults.get(g)}
        if changed:
            lines += ["defaults:"] + [f"  - override /{g}: {o}" for g, o in changed.items()]
        body = OmegaConf.create()
        for key in self.fields:
            OmegaConf.update(body, key, OmegaConf.select(self.cfg, key), force_add=True)  # typed by the schema
        if self.fields:
            lines += ["", OmegaConf.to_yaml(body).rstrip()]
        return "\n".join(lines) + "\n"

    def save(self, given: str) -> None:
        """`save NAME`: NAME.yaml in the experiment folder; `save PATH.yaml` (or with a /): that file."""
        path = Path(given).expanduser()
        if path.suffix != ".yaml" and "/" not in given:
            path = self.experiment_dir / f"{given}.yaml"
        elif path.suffix != ".yaml":
            path = path.with_name(f"{path.name}.yaml")
        name = path.stem
        if not name.replace("_", "").replace("-", "").isalnum():
            self.say(f"not saved: experiment name {name!r} may hold only letters, digits, _ and -")
            return
        try:
            refuse_package_conf(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(self.experiment_yaml(name))
        except (ConfigError, OSError) as e:
            self.say(f"not saved: {e}")
            return
        path = path.resolve()
        search = "" if path.parent.name == "experiment" else " (after moving it into a folder named experiment)"
        self.say(f"saved {path}\ntrain it{search}: python -m pufferfish.train "
                 f"hydra.searchpath=[file://{path.parent.parent}] experiment={name}")  # fmt: skip

    def run(self, read) -> None:
        self.say("Pufferfish config editor (`help` lists the commands)")
        self.show()
        while True:
            try:
                line = read("> ").strip()
            except EOFError:
                return
            if not line or line.startswith("#"):
                continue
            word, _, rest = line.partition(" ")
            if line in ("quit", "exit", "q"):
                return
            elif line == "help":
                self.say(HELP)
            elif line == "show":
                self.show(reasons=True)
            elif line == "changes":
                self.say(" ".join(self.overrides()) or "(none)")
            elif word == "config":
                node = OmegaConf.select(self.cfg, rest.strip()) if rest.strip() else self.cfg
                self.say(OmegaConf.to_yaml(node) if OmegaConf.is_config(node) else str(node))
            elif word == "save" and rest.strip():
                self.save(rest.strip())
            elif word == "unset" and rest.strip():
                key = rest.strip()
                target = self.choices if key in self.choices else self.fields
                if target.pop(key, None) is not None:
                    self.apply({}, target)
                    self.show()
            elif line in GROUPS:
                self.pick(line, read)
            elif "=" in line:
                key, _, value = line.partition("=")
                key, value = key.strip(), value.strip()
                if self.apply({key: value}, self.choices if key in GROUPS else self.fields):
                    self.show()
            else:
                self.say(f"unknown command {line!r}; `help` lists them")


def refuse_package_conf(path: Path) -> None:
    """The package's own conf/ belongs to the installed code: an update or a reinstall would lose the file."""
    conf = CONF_DIR.resolve()
    if path.resolve() == conf or conf in path.resolve().parents:
        raise ConfigError(f"{path} is inside Pufferfish's own {conf}; save in the current folder "
                          f"(save NAME writes ./experiment/NAME.yaml) or give another path")  # fmt: skip


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(prog="python -m pufferfish.config_editor", description=__doc__.split("\n\n")[1])
    parser.add_argument("--script", type=Path, help="read commands from this file instead of the terminal")
    parser.add_argument("--experiment-dir", type=Path, default=Path("experiment"),
                        help="where `save NAME` writes NAME.yaml (default: ./experiment)")  # fmt: skip
    args = parser.parse_args(argv)
    refuse_package_conf(args.experiment_dir)
    if args.script:
        try:
            commands = iter(args.script.read_text().splitlines())
        except OSError as e:
            raise ConfigError(f"--script {args.script} cannot be read ({e.strerror})") from None

        def read(prompt: str) -> str:
            line = next(commands, None)
            if line is None:
                raise EOFError
            print(f"{prompt}{line}")  # scripted input is echoed as if typed
            return line
    elif sys.stdin.isatty():
        read = input
    else:

        def read(prompt: str) -> str:
            line = sys.stdin.readline()
            if not line:
                raise EOFError
            print(f"{prompt}{line.rstrip()}")
            return line.rstrip("\n")

    try:
        Editor(args.experiment_dir).run(read)
    except KeyboardInterrupt:
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
