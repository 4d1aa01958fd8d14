"""Where a run's values come from: code defaults → recipe (TOML) → the method's preset → command line.

Every option is also a recipe key, and all but a few rarely changed ones (the timestep range,
AdamW's decay and betas) a `dmd distill` option of the same name (dashes for underscores), so a
recipe is a saved set of command-line choices. A recipe may extend another and keep a set of
values per step count; the family of a teacher chooses its recipe when none is given.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from dmdcli.errors import UsageError
from dmdcli.train.config import RECIPE_ONLY_KEYS, DistillConfig
from dmdcli.train.validation import check_keys, check_method_options, validate

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
# A recipe's `extends = "NAME"`: a built-in recipe, or a file relative to this one, whose values
# this recipe's keys update (a variant states only what differs).
EXTENDS = "extends"
# A recipe's [per_steps.N] table: its values for an N-step student (--steps N) replace the
# recipe's own, as the reference keeps a set of hyperparameters per step count.
PER_STEPS = "per_steps"

# DMD v1 (arXiv 2311.18828): the fake score is updated once per generator update, and the
# regression loss (λ = 0.25) replaces DMD2's two time-scale rule and GAN as the stabilizer.
METHOD_PRESETS = {"dmd": {"fake_updates_per_gen": 1, "regression_weight": 0.25}}


def recipe_path(name_or_path: str) -> Path:
    """A recipe by name (recipes/NAME.toml) or by path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise UsageError(f"recipe file not found: {path}")
        return path
    candidate = RECIPES_DIR / f"{name_or_path}.toml"
    if not candidate.is_file():
        raise UsageError(f"unknown recipe {name_or_path!r}; built-in recipes: {', '.join(list_recipes())}")
    return candidate


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def _read_recipe(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe file's keys over those of the recipe it extends, and so on down the chain
    (`chain`: the files that led here, to catch a cycle)."""
    values = _recipe_file(path)
    base = values.pop(EXTENDS, None)
    if base is None:
        return values
    chain = (*chain, path)
    try:
        base_path = _base_path(base, path)
    except UsageError as e:
        raise UsageError(f"recipe {path}, {EXTENDS} = {base!r}: {e}") from None
    if base_path.resolve() in {p.resolve() for p in chain}:
        raise UsageError(f"recipes extend each other in a cycle: {' → '.join(map(str, (*chain, base_path)))}")
    return _extend(_read_recipe(base_path, chain), values)


def _recipe_file(path: Path) -> dict[str, Any]:
    """One recipe file's own keys, checked: known keys of the right type, [per_steps.N] tables."""
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"recipe {path} is not valid TOML: {e}") from e
    if not isinstance(values.get(EXTENDS, ""), str):
        raise UsageError(f"recipe {path}: {EXTENDS} = {values[EXTENDS]!r} is not a recipe name or path")
    per_steps = values.get(PER_STEPS, {})
    check_keys({k: v for k, v in values.items() if k not in (PER_STEPS, EXTENDS)}, f"recipe {path}")
    if not isinstance(per_steps, dict) or not all(k.isdigit() and isinstance(v, dict) for k, v in per_steps.items()):
        raise UsageError(f"recipe {path}: [{PER_STEPS}] holds tables named by a step count, e.g. [{PER_STEPS}.1]")
    for steps, table in per_steps.items():
        check_keys(table, f"recipe {path}, [{PER_STEPS}.{steps}]")
    return values


def _base_path(name: str, recipe: Path) -> Path:
    """The recipe an `extends` names: a file relative to the recipe's own folder, else a built-in recipe."""
    beside = recipe.parent / name
    return recipe_path(str(beside) if beside.suffix == ".toml" or beside.exists() else name)


def _extend(base: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """`base` updated by `own`, their [per_steps.N] tables too, key by key."""
    values = {**base, **own}
    per_steps = {n: dict(table) for n, table in base.get(PER_STEPS, {}).items()}
    for n, table in own.get(PER_STEPS, {}).items():
        per_steps.setdefault(n, {}).update(table)
    if per_steps:
        values[PER_STEPS] = per_steps
    return values


def recipe_continues(name_or_path: str) -> str | None:
    """The recipe whose run this recipe's run continues (--init-from), if it is a second stage."""
    return _read_recipe(recipe_path(name_or_path)).get("continues")


def second_stage_note(recipe: str | None, config: DistillConfig) -> str | None:
    """What a run of a second-stage recipe is told when it has no --init-from: it starts from the teacher."""
    first = recipe_continues(recipe) if recipe and config.init_from is None else None
    if first is None:
        return None
    return (
        f"note: recipe {recipe} is the second stage of {first}; without --init-from RUN (a {first} run) "
        "it starts from the teacher"
    )


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """A recipe's values (those it extends included), its [per_steps.N] tables keyed by N."""
    values = _read_recipe(recipe_path(name_or_path))
    per_steps = values.pop(PER_STEPS, {})
    values = {k: v for k, v in values.items() if k not in RECIPE_ONLY_KEYS}
    return {**values, PER_STEPS: {int(k): v for k, v in per_steps.items()}} if per_steps else values


# Local paths a run reads again on --resume or that its student records: kept absolute, so a run
# folder works from any working directory. (The teacher too when it is an existing folder, as
# resolve_teacher makes it; the teacher families' data set names and `--prompts -` are names, not paths.)
PATH_KEYS = ("prompts", "data", "pairs_dir", "init_from")


def absolute_paths(values: dict[str, Any]) -> dict[str, Any]:
    from dmdcli.data.prompts import is_stream
    from dmdcli.models.families import data_names
    from dmdcli.models.teacher import local_teacher_folder

    not_paths = {"data": data_names(), "prompts": ["-"]}
    values = dict(values)
    if isinstance(values.get("teacher"), str):
        values["teacher"] = local_teacher_folder(values["teacher"]) or values["teacher"]
    for key in PATH_KEYS:
        value = values.get(key)
        if isinstance(value, str) and value not in not_paths.get(key, ()):
            path = Path(value).expanduser()
            # A stream's name (/dev/fd/63) resolves to "pipe:[…]", which names nothing: kept absolute as given.
            values[key] = str(path.absolute() if is_stream(path) else path.resolve())
    return values


def resolve_config(recipe: str | None, overrides: dict[str, Any], base: dict[str, Any] | None = None) -> DistillConfig:
    """Defaults, then the recipe's keys (or `base`, a resumed run's values), then the command
    line's explicitly given options."""
    values: dict[str, Any] = dict(base) if base else (load_recipe(recipe) if recipe else {})
    check_keys(overrides, "command line")
    given = {k: v for k, v in overrides.items() if v is not None}
    steps = given.get("steps", values.get("steps", DistillConfig.steps))
    values.update(values.pop(PER_STEPS, {}).get(steps, {}))
    method = given.get("method", values.get("method", "dmd2"))
    check_method_options(method, given)
    preset = METHOD_PRESETS.get(method, {})
    if values.get("method", "dmd2") == method:
        preset = {k: v for k, v in preset.items() if k not in values}  # a recipe written for this method wins
    # Layers: code defaults → recipe → the method's preset (over a recipe written for another method) → command line.
    values.update(preset)
    # The batch of an update is said one way: said on the command line, it replaces the recipe's other way.
    ways = ("global_batch", "gradient_accumulation_steps")
    for key, other in (ways, ways[::-1]):
        if key in given and other not in given:
            values.pop(other, None)
    values.update(given)
    config = DistillConfig(**absolute_paths(values))
    validate(config)
    return config


def choose_recipe(
    recipe: str | None, teacher: str | None, steps: int | None, lora_rank: int | None, has_data: bool, resume: bool
) -> tuple[str | None, str | None]:
    """The recipe a run starts from, and the line that says so when it was chosen for the teacher's
    family: the family's recipe default (dmdcli.models.families); `dmd distill` alone gets the
    default family's, a built-in teacher's recipe (its whole run, not announced)."""
    if recipe is not None or resume:
        return recipe, None
    from dmdcli.models.families import default_family, teacher_aliases
    from dmdcli.models.teacher import teacher_family

    family = default_family() if teacher is None else teacher_family(teacher)
    chosen = family.recipe(steps or DistillConfig.steps, lora_rank)
    if teacher is None and has_data:  # most likely a forgotten --teacher
        raise UsageError(
            "--prompts/--data without --teacher: pass --teacher (a diffusers folder, hub id, or "
            f"{', '.join(teacher_aliases())}), or --recipe {chosen} to use them with {family.title}"
        )
    if chosen is None or family.builtin_teacher:
        return chosen, None
    return (
        chosen,
        f"recipe {chosen}: chosen for {family.title or f'a {family.name} teacher'} (--recipe to choose another)",
    )
