"""The planner's verdict for each profile on this GPU: which one fits, with what context."""
from __future__ import annotations

from scripts.doctor.model import Check, fail, ok, warn
from scripts.usage import command


def plan_checks(facts, profile: str) -> list[Check]:
    if not facts.gpu.gpus:  # each profile's row shows the card it is named after
        return [warn(f"plan-{p}", "not planned: no GPU", "plan for a card by its size: "
                     f"`{command('plan', profile=p, model=facts.model_given, gpu_memory=p.replace('gb', 'GiB'))}`")
                for p in ("8gb", "16gb")]
    from scripts.doctor.facts import ModelProblem

    problems = {str(plan) for plan in facts.plans.values() if isinstance(plan, ModelProblem)}
    if problems:  # the same model for both profiles: one row, blocking, as `vlkit up` refuses it
        model = next(iter(facts.models.values()), "?")
        return [fail("model", f"cannot plan for {model}: {'; '.join(sorted(problems))}",
                     "give MODEL= a Qwen3-VL checkpoint: a Hugging Face id such as Qwen/Qwen3-VL-2B-Instruct, "
                     "or a local folder with its config.json and weights")]
    out = []
    fitting = []
    for p in ("8gb", "16gb"):
        plan = facts.plans.get(p)
        model = facts.models.get(p, "?")
        if plan is None or isinstance(plan, str):
            out.append(warn(f"plan-{p}", f"{model}: {plan or 'not planned'}", None))
            continue
        if plan.fits:
            fitting.append(p)
            out.append(ok(f"plan-{p}", f"{plan.model} fits, context {plan.context} tokens"))
        else:
            chosen = profile == p
            row = fail if chosen else warn
            kwargs = {"blocking": True} if chosen else {}
            out.append(row(f"plan-{p}", f"{plan.model} does not fit: {plan.refusal or 'over budget'}",
                           f"`{command('plan', profile=p, model=facts.model_given)}` shows the budget", **kwargs))
    if profile == "auto" and not fitting and all(not isinstance(facts.plans.get(p), str) and facts.plans.get(p)
                                                 for p in ("8gb", "16gb")):
        out.append(fail("plan", "no profile fits this GPU", f"`{command('plan', model=facts.model_given)}` shows the next step"))
    return out
