"""The experiments config: the default file, clear errors on bad input, and fuzzing of the loader
(any dict or YAML text gives a config or an ExperimentConfigError, never another exception)."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from abtest.experiments import (
    ExperimentsConfig,
    experiments_from_dict,
    load_experiments,
    parse_experiments,
)
from core.errors import ConfigError, ExperimentConfigError
from core.settings import EXPERIMENTS_FILE
from hymirec.cli import main
from model.zoo import MODEL_NAMES

VALID: dict[str, Any] = {
    "default_model": "sasrec",
    "holdout": {"salt": "h", "percent": 2.5},
    "layers": [{"name": "ranking", "salt": "l1"}, {"name": "ui", "salt": "l2"}],
    "experiments": [
        {
            "name": "exp-a",
            "layer": "ranking",
            "salt": "a",
            "range": [0, 0.5],
            "start": "2025-01-01T00:00:00Z",
            "stop": "2025-02-01T00:00:00+02:00",
            "targeting": {"user_id_min": 10, "exclude_user_ids": [12]},
            "variants": [
                {"name": "control", "weight": 1, "model": "sasrec"},
                {"name": "treatment", "weight": 1, "model": "hymirec"},
            ],
        },
        {
            "name": "exp_b",
            "layer": "ui",
            "salt": "b",
            "range": [0.25, 1],
            "variants": [
                {"name": "small", "weight": 1, "params": {"page_size": 10}},
                {"name": "big", "weight": 3, "params": {"page_size": 20}},
            ],
        },
    ],
}


def _with(path: str, value: Any) -> dict[str, Any]:
    """VALID with one field replaced (``experiments.0.variants.1.model``); ``...`` deletes it."""
    data = copy.deepcopy(VALID)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node: Any = data
    for part in parents:
        node = node[part]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return data


def test_default_file_is_valid() -> None:
    config = load_experiments(EXPERIMENTS_FILE)
    assert config.default_model == "sasrec"
    assert config.models() == {"sasrec", "hymirec"}
    assert config.model_layer == "ranking"
    assert config.holdout is not None and config.holdout.percent == 0
    experiment = config.experiment("hymirec-vs-sasrec")
    assert experiment.range == (0.0, 1.0)
    assert experiment.variant_shares() == {"control": 0.5, "treatment": 0.5}
    assert {v.name: v.model for v in experiment.variants} == {
        "control": "sasrec",
        "treatment": "hymirec",
    }


def test_valid_example_parses_with_derived_values() -> None:
    config = experiments_from_dict(VALID)
    a = config.experiment("exp-a")
    assert a.start_ms == 1_735_689_600_000 and a.stop_ms == 1_738_360_800_000
    assert a.running(a.start_ms) and not a.running(a.stop_ms) and not a.running(a.start_ms - 1)
    assert a.bucket_range == (0, 5000)
    assert config.experiment("exp_b").variant_bounds == (2500, 10_000)
    assert config.holdout is not None and config.holdout.buckets == 250
    assert config.models() == {"sasrec", "hymirec"}
    assert "exp_b: range [0.25, 1)" in config.summary()


def test_round_trip_through_yaml_text() -> None:
    text = yaml.safe_dump(VALID)
    assert parse_experiments(text) == experiments_from_dict(VALID)


INJECTION = "x'; DROP TABLE events; --"


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("default_model", "gpt", r"default_model: unknown model 'gpt'; choose one of popular"),
        ("experiments.0.variants.1.model", "x", r"experiments\[0\]\.variants\[1\]\.model: unknown"),
        (
            "experiments.0.name",
            INJECTION,
            r"experiments\[0\]\.name: .* is not a safe name: use 1-64",
        ),
        ("layers.0.name", "Ranking", r"layers\[0\]\.name: 'Ranking' is not a safe name"),
        ("experiments.1.variants.0.name", "a" * 65, r"variants\[0\]\.name: .* not a safe name"),
        ("experiments.1.name", "abc\n", r"experiments\[1\]\.name: 'abc\\n' is not a safe name"),
        ("experiments.1.name", "-abc", r"not a safe name"),
        ("experiments.1.name", "", r"not a safe name"),
        ("experiments.1.name", 7, r"experiments\[1\]\.name: Input should be a valid string"),
        ("experiments.1.variants.0.params", {"Bad-Key": 1}, r"param key 'Bad-Key' is not allowed"),
        ("experiments.1.variants.0.params", {"k": [1]}, r"params\.k"),
        (
            "experiments.1.layer",
            "search",
            r"experiments\[1\]\.layer: unknown layer 'search'; declare",
        ),
        (
            "experiments.1.layer",
            "ranking",
            r"experiments: the ranges of 'exp-a' \[0\.0, 0\.5\] and 'exp_b' \[0\.25, 1\.0\] "
            r"overlap in layer 'ranking'; make them disjoint",
        ),
        ("experiments.1.range", [0.6, 0.6], r"range: start 0\.6 must be below end 0\.6"),
        ("experiments.1.range", [0, 0.33333], r"range end 0\.33333 is not a multiple of 0\.0001"),
        ("experiments.1.range", [0, 1.5], r"range\[1\]: Input should be less than or equal to 1"),
        ("experiments.1.range", [0], r"experiments\[1\]\.range\[1\]: Field required; add it"),
        ("experiments.1.salt", "a", r"experiments\[1\]\.salt: 'a' is also experiments\[0\]\.salt"),
        ("layers.1.salt", "h", r"layers\[1\]\.salt: 'h' is also holdout\.salt; every salt"),
        ("experiments.1.salt", ..., r"experiments\[1\]\.salt: Field required; add it"),
        ("experiments.1.salt", "", r"experiments\[1\]\.salt: String should have at least 1"),
        ("experiments.1.name", "exp-a", r"experiment names must be unique; \['exp-a'\]"),
        ("layers.1.name", "ranking", r"layer names must be unique"),
        ("experiments.1.name", "holdout", r"'holdout' is reserved for held-out users; rename it"),
        ("experiments.1.variants.1.name", "small", r"variants: names must be unique"),
        ("experiments.1.variants", [{"name": "a", "weight": 1}], r"at least 2 items"),
        ("experiments.1.variants.0.weight", 0, r"variants\[0\]\.weight: Input should be greater"),
        ("experiments.1.variants.0.weight", -1, r"weight: Input should be greater than 0"),
        ("experiments.1.variants.0.weight", "50", r"weight: Input should be a valid number"),
        ("experiments.1.variants.0.weight", True, r"weight: Input should be a valid number"),
        ("experiments.1.variants.0.weight", float("nan"), r"weight: Input should be a finite"),
        ("experiments.1.variants.0.weight", 1e-9, r"'small' gets no traffic.*raise its weight"),
        ("experiments.1.variants.0.weight", 1.7e308, r"'big' gets no traffic"),
        (
            "experiments.1.variants",
            [{"name": "a", "weight": 1.7e308}, {"name": "b", "weight": 1.7e308}],
            r"variants: the weights are too large to add up; scale them down",
        ),
        ("experiments.1.variants.0.wieght", 1, r"variants\[0\]\.wieght: Extra inputs are not"),
        ("experiments.1.variants.0.model", "sasrec", r"set model on every variant or on none"),
        (
            "experiments.1.variants",
            [
                {"name": "a", "weight": 1, "model": "hstu"},
                {"name": "b", "weight": 1, "model": "hstu"},
            ],
            r"variants in layers \['ranking', 'ui'\] all set a model.*move those",
        ),
        ("experiments.0.variants.0.params", {"page_size": 5}, r"param 'page_size' is set in"),
        ("experiments.0.start", "2025-01-01T00:00:00", r"start: Input should have timezone info"),
        ("experiments.0.start", "2025-03-01T00:00:00Z", r"start \(2025-03-01.*must be before stop"),
        ("experiments.0.stop", "soon", r"experiments\[0\]\.stop: Input should be a valid datetime"),
        (
            "experiments.0.targeting.user_id_max",
            5,
            r"user_id_min \(10\) is above user_id_max \(5\)",
        ),
        ("experiments.0.targeting.exclude_user_ids", [-1], r"exclude_user_ids\[0\]: Input should"),
        ("experiments.0.targeting.include_user_ids", [2**63], r"include_user_ids\[0\]: Input"),
        ("holdout.percent", 100, r"holdout\.percent: Input should be less than 100"),
        ("holdout.percent", 0.005, r"percent 0\.005 is not a multiple of 0\.01; round it"),
        ("experiments", {"a": 1}, r"experiments: Input should be a valid list"),
        ("default_model", ..., r"default_model: Field required; add it"),
    ],
)
def test_bad_config_names_the_field_and_the_fix(path: str, value: Any, expected: str) -> None:
    with pytest.raises(ExperimentConfigError, match=expected) as caught:
        experiments_from_dict(_with(path, value), source="exp.yaml")
    assert str(caught.value).startswith("exp.yaml: invalid experiments config")
    assert isinstance(caught.value, ConfigError)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", r"top level must be a mapping.*\(got NoneType\)"),
        ("- a\n- b\n", r"top level must be a mapping.*\(got list\)"),
        ("default_model: [", r"not valid YAML"),
        ("default_model: sasrec\nstart: 2025-13-45\n", r"not valid YAML"),
        ("[" * 5000, r"not valid YAML"),
        ("a: &x [*x]\n", r"a: Extra inputs are not permitted"),
        ("default_model: sasrec\n? [a]\n: 1\n", r"not valid YAML"),
        ("default_model: sasrec\n1: 2\n", r"Keys should be strings"),
        ("x" * (1 << 20 + 1), r"larger than"),
    ],
)
def test_bad_yaml_text_is_refused(text: str, expected: str) -> None:
    with pytest.raises(ExperimentConfigError, match=expected):
        parse_experiments(text)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ExperimentConfigError, match=r"no such experiments file; set HYMIREC_"):
        load_experiments(tmp_path / "missing.yaml")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"default_model: \xff\xfe")
    with pytest.raises(ExperimentConfigError, match="cannot read the experiments file"):
        load_experiments(binary)


def test_unknown_experiment_lists_the_known_ones() -> None:
    with pytest.raises(ExperimentConfigError, match=r"unknown experiment 'x'.*exp-a, exp_b"):
        experiments_from_dict(VALID).experiment("x")


# --- fuzzing: a config or ExperimentConfigError, nothing else ------------------------------------

_KEYS = st.sampled_from(
    [
        "default_model", "holdout", "layers", "experiments", "name", "salt", "percent", "layer",
        "range", "variants", "weight", "model", "params", "start", "stop", "targeting",
        "user_id_min", "user_id_max", "include_user_ids", "exclude_user_ids", "description",
    ]
) | st.text(max_size=8)  # fmt: skip
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from([*MODEL_NAMES, "2025-01-01T00:00:00Z", "2025-01-01", "ranking", 0.5, 1])
    | st.datetimes()
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=5),
    max_leaves=30,
)


def _accepts_or_refuses(data: Any) -> ExperimentsConfig | None:
    try:
        return experiments_from_dict(data)
    except ExperimentConfigError as exc:
        assert str(exc)
        return None


@settings(max_examples=300, deadline=None)
@given(data=st.dictionaries(_KEYS, _VALUES, max_size=6))
def test_fuzz_arbitrary_dicts(data: dict[Any, Any]) -> None:
    _accepts_or_refuses(data)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        children: Any = node.items()
    elif isinstance(node, list):
        children = enumerate(node)
    else:
        children = []
    for key, child in children:
        found += _paths(child, (*prefix, key))
    return found


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_mutations_of_a_valid_config(data: st.DataObject) -> None:
    config = copy.deepcopy(VALID)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = _paths(config)
        if not paths:
            break
        *parents, last = data.draw(st.sampled_from(paths))
        node: Any = config
        for part in parents:
            node = node[part]
        if data.draw(st.booleans()):
            del node[last]
        else:
            node[last] = data.draw(_VALUES)
    accepted = _accepts_or_refuses(config)
    if accepted is not None:
        assert accepted.models() <= set(MODEL_NAMES)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("abc: -[]{},&*!?'\"#\n\t01.~|>")), max_size=80))
def test_fuzz_yaml_text(text: str) -> None:
    with contextlib.suppress(ExperimentConfigError):
        parse_experiments(text)


@settings(max_examples=100, deadline=None)
@given(data=st.dictionaries(_KEYS, _VALUES, max_size=6))
def test_fuzz_dumped_yaml(data: dict[Any, Any]) -> None:
    try:
        text = yaml.safe_dump(data)
    except yaml.YAMLError:
        return
    with contextlib.suppress(ExperimentConfigError):
        parse_experiments(text)


# --- the CLI --------------------------------------------------------------------------------------


def test_cli_validate_and_assign(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "experiments.yaml"
    path.write_text(yaml.safe_dump(VALID))
    assert main(["experiments", "validate", "--file", str(path)]) == 0
    assert "exp-a: range [0, 0.5)" in capsys.readouterr().out
    assert main(["experiments", "assign", "5", "--file", str(path), "--now-ms", "0"]) == 0
    assert capsys.readouterr().out.startswith("model sasrec")

    path.write_text(yaml.safe_dump(_with("experiments.0.name", INJECTION)))
    assert main(["experiments", "validate", "--file", str(path)]) == 2
    assert "is not a safe name" in capsys.readouterr().err
