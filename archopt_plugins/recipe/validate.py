"""``archopt validate``: read a recipe, apply ``--set`` edits, check every field and cross-field rule.

Everything is checked before anything starts, and every problem is reported at once as a
``RecipeError`` whose issues name the key path, the value and the fix:

1. YAML syntax (the line and column), a document that is not a mapping;
2. ``--set key.path=value`` edits (a path through a non-mapping);
3. the schema (``schema.py``): unknown keys, types, ranges, choices;
4. cross-field rules: model shapes (heads divide the width, GQA groups, MoE sizes, GPT-2 without
   GQA), sequence length within the model's positions, batch sizes dividing over processes and
   micro-batches, data source ↔ tokenizer, files present, the backend available with its extra
   installed and its own rules (TP divides heads …), OOD sets present, and the optimizer and
   baseline planned on the model's architecture (meta tensors: no memory, no time) so a bad
   hyperparameter or an override that matches nothing fails here, not after data loading.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .backends import backend_issues, module_available
from .errors import Issue, RecipeError
from .schema import Recipe


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``; people write ``1e-3``)."""


_FLOAT = re.compile(r"^[-+]?(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)[eE][-+]?\d+$")
_RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def parse_yaml(text: str, source: str = "recipe") -> Any:
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "unknown position"
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError([Issue("(top level)", f"YAML syntax error at {where}: {problem}",
                                 "fix the YAML syntax there (indentation, quotes, ':' after keys)")], source) from None


# -- --set edits --------------------------------------------------------------------------------------

def apply_sets(data: Any, sets: list[str] | tuple[str, ...]) -> Any:
    """Apply ``key.path=value`` edits (values parsed as YAML) to a copy of ``data``."""
    if not sets:
        return data
    if not isinstance(data, dict):
        raise RecipeError([Issue("(top level)", "cannot apply --set to a recipe that is not a mapping",
                                 "make the recipe a mapping of sections (model:, data:, ...)")])
    import copy

    data = copy.deepcopy(data)
    issues = []
    for item in sets:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            issues.append(Issue(key.strip() or "(top level)", f"--set {item!r} is not of the form key.path=value",
                                "write --set section.key=value, e.g. --set schedule.steps=100"))
            continue
        try:
            value = yaml.load(raw, Loader=_RecipeLoader) if raw.strip() else ""  # noqa: S506
        except yaml.YAMLError:
            value = raw
        node, walked = data, []
        for part in parts[:-1]:
            walked.append(part)
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                issues.append(Issue(".".join(walked), f"--set {key} goes through a value that is not a mapping",
                                    f"set {'.'.join(walked)} itself, or fix the key path", child))
                break
            node = child
        else:
            node[parts[-1]] = value
    if issues:
        raise RecipeError(issues, "--set")
    return data


# -- schema errors → issues ---------------------------------------------------------------------------

def _path(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _section_fields(loc: tuple) -> list[str] | None:
    """Valid keys of the schema section at ``loc`` (None where the location is free-form)."""
    model: type[BaseModel] = Recipe
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return sorted(model.model_fields)


_FIXES = {
    "missing": "add the key",
    "model_type": "write this section as a mapping of keys (key: value lines indented under it)",
    "dict_type": "write it as a mapping (key: value)",
    "list_type": "write it as a list ([a, b] or '- a' lines)",
    "int_type": "give a whole number (no quotes, no decimal point)",
    "int_from_float": "give a whole number",
    "float_type": "give a number (e.g. 0.02 or 1e-3)",
    "bool_type": "write true or false",
    "string_type": "give a text value",
    "finite_number": "give a finite number",
}


def _issue_from_pydantic(err: dict[str, Any]) -> Issue:
    loc, kind, msg = tuple(err["loc"]), err["type"], err["msg"]
    path = _path(loc)
    if kind == "extra_forbidden":
        valid = _section_fields(loc[:-1])
        return Issue(path, "unknown key", f"remove it or fix its spelling; valid keys here: {valid}", err["input"])
    if kind == "missing":
        return Issue(path, "required key is missing", _FIXES["missing"])
    if kind in ("literal_error", "string_pattern_mismatch") or kind.startswith(("greater", "less", "too_")):
        fix = msg[0].lower() + msg[1:] if msg else "use a valid value"
        return Issue(path, "invalid value", fix.replace("input should", "use a value that is").replace(
            "string should", "use text that should"), err.get("input"))
    fix = _FIXES.get(kind, msg[0].lower() + msg[1:] if msg else "give a valid value")
    return Issue(path, msg, fix, err.get("input"))


# -- cross-field rules ------------------------------------------------------------------------------------

def _model_issues(r: Recipe) -> list[Issue]:
    m, issues = r.model, []
    if m.hidden_size % m.num_heads:
        issues.append(Issue("model.num_heads", f"does not divide model.hidden_size = {m.hidden_size}",
                            "choose num_heads so that hidden_size / num_heads is a whole head size", m.num_heads))
    elif m.family != "gpt2" and (m.hidden_size // m.num_heads) % 2:
        issues.append(Issue("model.num_heads", f"gives an odd head size {m.hidden_size // m.num_heads}; rotary "
                            "embeddings rotate pairs of dimensions", "choose num_heads for an even head size",
                            m.num_heads))
    if m.num_kv_heads is not None:
        if m.family == "gpt2" and m.num_kv_heads != m.num_heads:
            issues.append(Issue("model.num_kv_heads", "GPT-2 has no grouped-query attention",
                                "remove model.num_kv_heads (or set it to model.num_heads)", m.num_kv_heads))
        elif m.num_heads % m.num_kv_heads:
            issues.append(Issue("model.num_kv_heads", f"does not divide model.num_heads = {m.num_heads}",
                                "use a divisor of num_heads (each key/value head serves a group of query heads)",
                                m.num_kv_heads))
    moe_keys = (("num_experts", m.num_experts), ("experts_per_token", m.experts_per_token))
    if m.family == "mixtral":
        for key, value in moe_keys:
            if value is None:
                issues.append(Issue(f"model.{key}", "mixtral (MoE) needs it", f"set model.{key}"))
        if m.num_experts and m.experts_per_token and m.experts_per_token > m.num_experts:
            issues.append(Issue("model.experts_per_token", f"exceeds model.num_experts = {m.num_experts}",
                                "route each token to at most num_experts experts", m.experts_per_token))
    else:
        for key, value in moe_keys:
            if value is not None:
                issues.append(Issue(f"model.{key}", f"only mixtral (MoE) models have experts, not {m.family!r}",
                                    f"remove model.{key} or set model.family: mixtral", value))
    if m.dropout and m.family != "gpt2":
        issues.append(Issue("model.dropout", f"{m.family!r} models have no dropout", "remove model.dropout",
                            m.dropout))
    if not module_available("transformers"):
        issues.append(Issue("model.family", "recipe models are built with transformers, which is not installed",
                            "pip install 'archopt-plugins[hf]'", m.family))
    return issues


def _batch_issues(r: Recipe) -> list[Issue]:
    b, issues = r.batch, []
    if b.seq_len > r.model.max_seq_len:
        issues.append(Issue("batch.seq_len", f"exceeds model.max_seq_len = {r.model.max_seq_len}",
                            "lower batch.seq_len or raise model.max_seq_len", b.seq_len))
    tp = r.backend.tensor_parallel
    if r.world_size % tp == 0:
        per_step = b.micro_batch_size * r.data_parallel_size
        if b.global_batch_size % per_step:
            issues.append(Issue("batch.global_batch_size",
                                f"is not a multiple of micro_batch_size × data-parallel processes = "
                                f"{b.micro_batch_size} × {r.data_parallel_size} = {per_step}",
                                f"use a multiple of {per_step} (gradient accumulation = global / {per_step})",
                                b.global_batch_size))
    s = r.schedule
    if s.warmup_steps > s.steps:
        issues.append(Issue("schedule.warmup_steps", f"exceeds schedule.steps = {s.steps}",
                            "use a warmup no longer than the run", s.warmup_steps))
    return issues


def _data_issues(r: Recipe) -> list[Issue]:
    from .corpora import OOD_SETS, expand_paths, ood_files

    d, t, issues = r.data, r.tokenizer, []
    if d.source == "stdlib" and d.paths:
        issues.append(Issue("data.paths", "the stdlib source reads this interpreter's library, not paths",
                            "remove data.paths or set data.source: text / jsonl / megatron", d.paths))
    if d.source != "stdlib":
        if not d.paths:
            issues.append(Issue("data.paths", f"data.source {d.source!r} needs files", "list files or globs"))
        for i, pattern in enumerate(d.paths):
            if d.source == "megatron":
                missing = [s for s in (".bin", ".idx") if not Path(pattern + s).is_file()]
                if missing:
                    issues.append(Issue(f"data.paths[{i}]", f"{pattern}{missing[0]} does not exist",
                                        "give the Megatron dataset prefix (the path without .bin/.idx)", pattern))
            elif not expand_paths([pattern]):
                issues.append(Issue(f"data.paths[{i}]", "matches no file", "fix the path or glob", pattern))
    if d.source == "megatron" and t.kind != "pretokenized":
        issues.append(Issue("tokenizer.kind", "Megatron .bin/.idx data is already tokenized",
                            "set tokenizer.kind: pretokenized and tokenizer.vocab_size", t.kind))
    if d.source != "megatron" and t.kind == "pretokenized":
        issues.append(Issue("tokenizer.kind", f"data.source {d.source!r} is text, not token ids",
                            "use tokenizer.kind: byte or bpe", t.kind))
    if t.kind == "byte" and t.vocab_size not in (None, 256):
        issues.append(Issue("tokenizer.vocab_size", "the byte tokenizer has exactly 256 ids",
                            "remove tokenizer.vocab_size (or use tokenizer.kind: bpe)", t.vocab_size))
    if t.kind == "bpe":
        if t.vocab_size is None or t.vocab_size < 300:
            issues.append(Issue("tokenizer.vocab_size", "a byte-level BPE needs 256 byte ids, its separator and merges",
                                "set tokenizer.vocab_size to at least 300 (e.g. 8192)", t.vocab_size))
        if not module_available("tokenizers"):
            issues.append(Issue("tokenizer.kind", "'bpe' needs the tokenizers library, which is not installed",
                                "pip install 'archopt-plugins[recipes]'", t.kind))
    if t.kind == "pretokenized" and t.vocab_size is None:
        issues.append(Issue("tokenizer.vocab_size", "pre-tokenized data needs its vocabulary size",
                            "set tokenizer.vocab_size to the vocabulary the data was tokenized with"))
    for i, name in enumerate(r.evaluation.ood):
        if name not in OOD_SETS:
            issues.append(Issue(f"evaluation.ood[{i}]", "unknown out-of-distribution set",
                                f"use one of {sorted(OOD_SETS)}", name))
        elif not ood_files(name):
            issues.append(Issue(f"evaluation.ood[{i}]", f"{OOD_SETS[name][1]} is not on this machine",
                                "remove it from evaluation.ood", name))
    if r.evaluation.ood and d.source == "megatron":
        issues.append(Issue("evaluation.ood", "OOD text cannot be scored with pre-tokenized data (unknown tokenizer)",
                            "remove evaluation.ood", r.evaluation.ood))
    if len(set(r.evaluation.ood)) != len(r.evaluation.ood):
        issues.append(Issue("evaluation.ood", "lists a set twice", "list each set once", r.evaluation.ood))
    if r.logging.tensorboard and not module_available("tensorboard"):
        issues.append(Issue("logging.tensorboard", "TensorBoard logging needs the tensorboard package",
                            "pip install 'archopt-plugins[recipes]' or set logging.tensorboard: false", True))
    return issues


def _plan_issue(prefix: str, message: str, hparams: dict[str, Any]) -> Issue:
    """Attribute a planner error to the key it is about (an override, a hyperparameter, the name)."""
    if message.startswith("override") or "claimed twice" in message:
        return Issue(f"{prefix}.overrides", message, "fix the override's key (a role name or FQN glob) or values")
    for key in hparams:  # the planner quotes the hyperparameter it refuses (AdamW's without the adamw_ prefix)
        if re.search(rf"(unknown )?hyperparameter '({re.escape(key)}|{re.escape(key.removeprefix('adamw_'))})(\[\d\])?'",
                     message):
            return Issue(f"{prefix}.hparams.{key}", message, "use a valid name and value (see the message)",
                         hparams[key])
    return Issue(f"{prefix}.hparams", message, "fix the hyperparameters (see the message)")


def _optimizer_issues(r: Recipe) -> list[Issue]:
    from .. import available_optimizers, plan
    from .models import build_meta_model

    names, issues = available_optimizers(), []
    runs = [("optimizer", r.optimizer.name, dict(r.optimizer.hparams), dict(r.optimizer.overrides))]
    if r.baseline.enabled:
        if "lr" in r.baseline.hparams:
            issues.append(Issue("baseline.hparams.lr", "the baseline's learning rates come from baseline.lr_grid",
                                "remove baseline.hparams.lr and list the rates in baseline.lr_grid",
                                r.baseline.hparams["lr"]))
        for i, lr in enumerate(r.baseline.lr_grid):
            if not lr > 0 or lr != lr or lr == float("inf"):
                issues.append(Issue(f"baseline.lr_grid[{i}]", "a learning rate must be a positive finite number",
                                    "use e.g. 1e-3", lr))
        runs.append(("baseline", r.baseline.name, {**r.baseline.hparams, "lr": r.baseline.lr_grid[0]}, {}))
    for prefix, name, hparams, overrides in runs:
        if name not in names:
            issues.append(Issue(f"{prefix}.name", "unknown optimizer", f"use one of {names}", name))
            continue
        if issues or not module_available("transformers"):
            continue  # planning needs a model: only once the rest is sound
        try:
            model = build_meta_model(r.model, max(r.vocab_size, 2))
            plan(model, name, **hparams, **({"overrides": overrides} if overrides else {}))
        except (ValueError, TypeError) as err:
            issues.append(_plan_issue(prefix, str(err), hparams))
    return issues


def check_recipe(recipe: Recipe) -> list[Issue]:
    """Cross-field rules (the schema's own rules have passed)."""
    issues = _model_issues(recipe) + _batch_issues(recipe) + _data_issues(recipe) + backend_issues(recipe)
    if not issues:  # planning builds the model: only on a recipe whose shapes are sound
        issues += _optimizer_issues(recipe)
    return issues


def validate_data(data: Any, source: str = "recipe") -> Recipe:
    """A parsed recipe document → Recipe, or RecipeError listing every problem."""
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError([_issue_from_pydantic(e) for e in err.errors()], source) from None
    issues = check_recipe(recipe)
    if issues:
        raise RecipeError(issues, source)
    return recipe


def load_recipe(path: str | Path, sets: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, edit (``--set``) and validate the recipe file at ``path``."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError([Issue("(top level)", f"recipe file {str(path)!r} does not exist",
                                 "give the path of a .yaml recipe (see recipes/)")], str(path))
    data = parse_yaml(path.read_text(), str(path))
    if data is None:
        data = {}
    return validate_data(apply_sets(data, sets), str(path))


def recipe_to_yaml(recipe: Recipe) -> str:
    """The fully resolved recipe (every default written out), as the workers of a launch read it."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
