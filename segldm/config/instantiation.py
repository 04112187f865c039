"""Building objects from config so their own errors reach the user unwrapped."""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate


def instantiate_plain(config: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that raises the target's own error (missing file, wrong kind) unwrapped."""
    try:
        return instantiate(config, **kwargs)
    except InstantiationException as err:
        if err.__cause__ is not None:
            raise err.__cause__ from None
        raise


__all__ = ["instantiate_plain"]
