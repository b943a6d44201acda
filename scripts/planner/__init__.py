"""The VRAM planner: vLLM / service settings computed from the card's memory and the model's shapes."""
from .models import ModelSpec, UnknownModelError, resolve_model
from .plan import plan_for
from .schema import BudgetRow, Plan

__all__ = ["BudgetRow", "ModelSpec", "Plan", "UnknownModelError", "plan_for", "resolve_model"]
