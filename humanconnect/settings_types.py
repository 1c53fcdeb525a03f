"""How a variable's text becomes a setting's value, for every settings class."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AliasChoices, BeforeValidator
from pydantic_settings import NoDecode


def env(name: str) -> AliasChoices:
    """The one variable a field is read from."""
    return AliasChoices(name)


def _items(value: Any) -> Any:
    """A comma-separated variable as its items, stripped, blanks dropped."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _seconds(value: Any) -> Any:
    """A comma-separated variable as floats, every item required."""
    if isinstance(value, str):
        try:
            return [float(w) for w in value.split(",")]
        except ValueError:
            raise ValueError("must be comma-separated seconds, like 0,5,300") from None
    return value


# NoDecode: pydantic-settings would read a list variable as JSON; these are comma-separated.
CommaList = Annotated[list[str], NoDecode, BeforeValidator(_items)]
CommaSeconds = Annotated[tuple[float, ...], NoDecode, BeforeValidator(_seconds)]
