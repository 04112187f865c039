"""Where segldm's Hydra config tree is: the one answer every entry point and config reader uses.

The tree lives at the repository's top level (``conf/``); ``segldm/conf`` is a symlink to it in a
checkout (and so in an editable install), and the real folder inside an installed wheel
(``package-data`` in pyproject.toml follows the symlink when the wheel is built). Users add their own
groups on top with Hydra's ``--config-dir <dir>`` or ``hydra.searchpath=[file://<dir>]`` (docs/install.md).
"""

from __future__ import annotations

from pathlib import Path

PACKAGED_CONF = Path(__file__).resolve().parents[1] / "conf"  # segldm/conf
PRIMARY_CONFIG = "train.yaml"  # present in every complete tree


def config_dir() -> Path:
    """The directory holding ``train.yaml``, ``eval.yaml`` and the config groups, resolved."""
    found = PACKAGED_CONF.resolve()
    if not (found / PRIMARY_CONFIG).is_file():
        raise FileNotFoundError(
            f"segldm's config tree is missing: no {found / PRIMARY_CONFIG}. In a checkout, "
            "segldm/conf must be the symlink to ../conf (git restores it; on Windows enable "
            "core.symlinks); an installed wheel must contain segldm/conf (reinstall segldm)."
        )
    return found


def hydra_config_path() -> str:
    """``config_path`` for ``@hydra.main``: absolute, so it holds under ``python -m`` and console scripts."""
    return str(config_dir())
