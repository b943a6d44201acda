"""The model the client-library tests ask for (tests/test_clients_*.py and the instructor script, which
imports it from beside itself): every field bounded, so random weights finish it in a few dozen tokens."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

QUESTION = "Describe the pet in the picture."


class Pet(BaseModel):
    """A pet."""

    name: str = Field(max_length=12)
    species: Literal["cat", "dog", "bird"]
    age: int = Field(ge=0, le=30)
