"""Fuzzing recipe validation: malformed recipes never crash it, and every error names its key.

Each generated recipe is the tiny valid recipe broken in one or more ways that are each invalid by
construction (an unknown key, a required value removed, a value of the wrong type, a number out of
range, a choice that does not exist, a section replaced by a scalar, a cross-field violation, or
a document that is not a mapping). Validation must raise RecipeError — never any other exception —
and every issue must carry a key path that exists in the recipe (or "(top level)").
"""

import math

from hypothesis import HealthCheck, given, settings
from pydantic import BaseModel
from hypothesis import strategies as st

from archopt_plugins.recipe.errors import RecipeError
from archopt_plugins.recipe.schema import Recipe
from archopt_plugins.recipe.validate import apply_sets, parse_yaml, validate_data
from recipe_fixtures import tiny

INT_FIELDS = ["model.hidden_size", "model.num_layers", "model.num_heads", "model.intermediate_size",
              "model.max_seq_len", "schedule.steps", "batch.micro_batch_size", "batch.global_batch_size",
              "batch.seq_len", "evaluation.every_steps", "evaluation.batches", "launch.nproc_per_node",
              "launch.nodes", "checkpoint.keep_last", "logging.log_every", "seed"]
CHOICE_FIELDS = ["model.family", "data.source", "tokenizer.kind", "schedule.decay", "backend.kind",
                 "backend.device", "backend.dist_backend"]
SECTIONS = [name for name, f in Recipe.model_fields.items() if isinstance(f.default_factory, type) or
            f.default_factory is not None]

# values each hyperparameter refuses (a name no optimizer has makes any value invalid)
BAD_HPARAMS = {"lr": [-1.0, "fast", [1, 2], None, math.inf], "momentum": [-0.1, 1.0, 2, "x"],
               "ns_steps": [0, -3, 2.5, "five", None], "adamw_betas": [2.0, [0.9], [0.9, 1.0], "a,b", None],
               "bogus": [0, 1.0, "x"], "weight_decay": [-1e-3, math.nan, "none"]}

not_int = st.one_of(st.text(min_size=1, alphabet="abcxyz-_ "), st.floats(allow_nan=True).filter(
    lambda x: not (isinstance(x, float) and x.is_integer())), st.booleans(), st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.none())


def _set(data, path, value):
    """Set a dotted path; a path through a section an earlier breakage replaced is left alone."""
    node = data
    *parents, last = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            return
    node[last] = value


@st.composite
def breakage(draw):
    """(description, function that breaks a recipe dict in place) — each breakage alone is invalid."""
    kind = draw(st.sampled_from(["unknown_key", "wrong_type", "out_of_range", "bad_choice", "scalar_section",
                                 "cross_field", "bad_optimizer"]))
    if kind == "unknown_key":
        section = draw(st.sampled_from(SECTIONS + [""]))
        key = "x_" + draw(st.text(min_size=1, max_size=8, alphabet="abcdefghijklmnop_"))
        value = draw(st.one_of(st.integers(), st.text(max_size=5), st.none()))
        return kind, lambda d: _set(d, f"{section}.{key}" if section else key, value)
    if kind == "wrong_type":
        path, value = draw(st.sampled_from(INT_FIELDS)), draw(not_int)
        return kind, lambda d: _set(d, path, value)
    if kind == "out_of_range":
        path = draw(st.sampled_from(INT_FIELDS))
        value = draw(st.integers(max_value=-1 if path == "seed" else 0))
        return kind, lambda d: _set(d, path, value)
    if kind == "bad_choice":
        path = draw(st.sampled_from(CHOICE_FIELDS))
        value = "zz" + draw(st.text(max_size=6))
        return kind, lambda d: _set(d, path, value)
    if kind == "scalar_section":
        section, value = draw(st.sampled_from(SECTIONS)), draw(st.one_of(st.integers(), st.text(), st.lists(
            st.integers(), max_size=2)))
        return kind, lambda d: d.__setitem__(section, value)
    if kind == "cross_field":
        edit = draw(st.sampled_from([
            {"model.num_heads": 3}, {"model.num_kv_heads": 2, "model.num_heads": 3, "model.hidden_size": 24},
            {"batch.seq_len": 64}, {"batch.global_batch_size": 6}, {"backend.kind": "fsdp2"},
            {"backend.kind": "megatron", "backend.tensor_parallel": 3}, {"backend.zero_stage": 2},
            {"data.source": "jsonl"}, {"tokenizer.kind": "pretokenized"}, {"evaluation.ood": ["nope"]},
            {"schedule.warmup_steps": 100}, {"model.num_experts": 4}, {"launch.nproc_per_node": 2},
        ]))
        return kind, lambda d: [_set(d, k, v) for k, v in edit.items()]
    name = draw(st.one_of(st.just("muon"), st.text(min_size=1, max_size=6, alphabet="qwrtz")))
    hp_key = draw(st.sampled_from(sorted(BAD_HPARAMS)))
    hp_value = draw(st.sampled_from(BAD_HPARAMS[hp_key]))
    return kind, lambda d: _set(d, "optimizer", {"name": name, "hparams": {hp_key: hp_value}})


def _known_path(recipe: dict, path: str) -> bool:
    """The path is a key of the schema (free-form below hparams/overrides) or one the recipe wrote."""
    if path == "(top level)":
        return True
    parts = [p.split("[")[0] for p in path.split(".")]
    node = recipe
    in_data = True
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            in_data = False
            break
        node = node[part]
    model = Recipe
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return in_data
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
            continue
        return i == len(parts) - 1 or part in ("hparams", "overrides") or in_data
    return True


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(breakage(), min_size=1, max_size=3))
def test_malformed_recipes_raise_recipe_errors_naming_the_key(breakages):
    data = tiny()
    for _, brk in breakages:
        brk(data)
    try:
        validate_data(data)
    except RecipeError as err:
        assert err.issues
        for issue in err.issues:
            assert _known_path(data, issue.path), (issue.path, str(issue))
            assert str(issue).startswith(issue.path + ": ") and "fix: " in str(issue)
    else:
        raise AssertionError(f"accepted a malformed recipe: {[k for k, _ in breakages]} {data}")


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.integers(), st.text(), st.lists(st.integers()), st.floats(allow_nan=True), st.booleans()))
def test_documents_that_are_not_mappings_are_refused(document):
    try:
        validate_data(document)
    except RecipeError as err:
        assert all(i.path == "(top level)" for i in err.issues)
    else:
        raise AssertionError(f"accepted {document!r}")


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="ab:{}[]-\n '\"#&*!|>%@`\t,", max_size=40))
def test_arbitrary_yaml_text_never_crashes(text):
    try:
        data = parse_yaml(text)
        validate_data(data if data is not None else {})
    except RecipeError as err:
        assert all(str(i).startswith(i.path) for i in err.issues)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(alphabet="ab.=c1[] ", max_size=12), min_size=1, max_size=3))
def test_arbitrary_set_edits_never_crash(sets):
    try:
        validate_data(apply_sets(tiny(), sets))
    except RecipeError as err:
        assert all(str(i).startswith(i.path) for i in err.issues)
