"""Where Pufferfish's own files live; imports nothing heavy, so any module or script may use it."""

from pathlib import Path

# The Hydra config groups ship inside the package, so an installed (non-editable) Pufferfish has them too;
# the repository's top-level conf/ is a link to this folder.
CONF_DIR = Path(__file__).resolve().parent / "conf"
