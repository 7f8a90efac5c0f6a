"""Bad arguments: each has one defined behaviour, and this file is its documentation.

Constructor arguments are checked when the Checkpointer is made; steps, metrics and
leaves when a save is made, before anything is written. Programming errors raise
``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, impossible value),
naming the step, metric or tree path at fault; nothing reaches the disk.
"""

from __future__ import annotations

import decimal
import fractions
import math
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import is_lock_file, small_state, tree_listing


def disk(ckpt) -> list:
    """Everything under the run's checkpoint directory except its lock file."""
    return [e for e in tree_listing(ckpt.checkpoint_dir) if not is_lock_file(e[0])]


@pytest.fixture
def run_with_history(make_checkpointer):
    """A run with latest, best and one numbered checkpoint, saving every step."""
    ckpt = make_checkpointer(save_every=1, checkpoint_every=1, keep_best=True)
    assert set(ckpt.maybe_save_checkpoints(small_state(1), 1, {"val/loss": 0.5})) == {
        "latest",
        "numbered",
        "best",
    }
    return ckpt


def assert_untouched(ckpt, before) -> None:
    assert disk(ckpt) == before
    assert ckpt.load_latest()["step"] == 1
    assert ckpt.best_metric_value == 0.5


# --- intervals ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["save_every", "checkpoint_every"])
@pytest.mark.parametrize("value", [-1, -1000, np.int64(-3)], ids=["-1", "-1000", "np.int64(-3)"])
def test_negative_interval_raises_value_error_naming_the_argument(make_checkpointer, name, value):
    with pytest.raises(ValueError, match=name):
        make_checkpointer(**{name: value})


@pytest.mark.parametrize("name", ["save_every", "checkpoint_every"])
@pytest.mark.parametrize("value", [0, None])
def test_interval_zero_or_none_means_never(make_checkpointer, name, value):
    ckpt = make_checkpointer(**{"save_every": 1, "checkpoint_every": 1, name: value})
    assert getattr(ckpt, name) is None
    check = ckpt.should_save_latest if name == "save_every" else ckpt.should_save_numbered
    assert not any(check(step) for step in range(0, 50))
    saved = ckpt.maybe_save_checkpoints(small_state(), 10)
    assert ("latest" if name == "save_every" else "numbered") not in saved


@pytest.mark.parametrize("name", ["save_every", "checkpoint_every"])
@pytest.mark.parametrize(
    "value",
    [2.0, 0.5, math.inf, math.nan, "10", True, False, np.float32(5)],
    ids=["2.0", "0.5", "inf", "nan", "str", "True", "False", "np.float32"],
)
def test_non_integer_interval_raises_type_error(make_checkpointer, name, value):
    with pytest.raises(TypeError, match=name):
        make_checkpointer(**{name: value})


@pytest.mark.parametrize("name", ["save_every", "checkpoint_every"])
def test_numpy_integer_interval_is_accepted_as_an_int(make_checkpointer, name):
    ckpt = make_checkpointer(**{name: np.int32(7)})
    assert getattr(ckpt, name) == 7
    assert type(getattr(ckpt, name)) is int


# --- max_to_keep ----------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1, np.int64(0)], ids=["0", "-1", "np.int64(0)"])
def test_max_to_keep_zero_or_negative_raises_value_error_pointing_to_checkpoint_every(
    make_checkpointer, value
):
    with pytest.raises(ValueError, match="checkpoint_every=None"):
        make_checkpointer(max_to_keep=value)


@pytest.mark.parametrize(
    "value",
    [2.0, 1.5, math.nan, -math.inf, True, "3"],
    ids=["2.0", "1.5", "nan", "-inf", "True", "str"],
)
def test_max_to_keep_that_is_not_an_int_none_or_inf_raises_type_error(make_checkpointer, value):
    with pytest.raises(TypeError, match="max_to_keep"):
        make_checkpointer(max_to_keep=value)


@pytest.mark.parametrize(
    "value", [None, math.inf, np.float64(np.inf)], ids=["None", "inf", "np.inf"]
)
def test_max_to_keep_none_or_inf_keeps_all(make_checkpointer, value):
    ckpt = make_checkpointer(max_to_keep=value)
    assert ckpt.max_to_keep is None


# --- steps ----------------------------------------------------------------------------

SAVES = {
    "save_checkpoint": lambda c, s, step: c.save_checkpoint(s, step=step),
    "save_latest": lambda c, s, step: c.save_latest(s, step=step),
    "update_best_checkpoint": lambda c, s, step: c.update_best_checkpoint(s, 0.1, step=step),
    "maybe_save_checkpoints": lambda c, s, step: c.maybe_save_checkpoints(
        s, step, {"val/loss": 0.1}
    ),
}


@pytest.mark.parametrize("save", list(SAVES.values()), ids=list(SAVES))
@pytest.mark.parametrize(
    "step", [-1, -5, np.int64(-2), jnp.array(-3)], ids=["-1", "-5", "np", "jax"]
)
def test_negative_step_raises_value_error_and_writes_nothing(run_with_history, save, step):
    before = disk(run_with_history)
    with pytest.raises(ValueError, match="step"):
        save(run_with_history, small_state(2), step)
    assert_untouched(run_with_history, before)


NOT_INTEGERS = {
    "float": 2.0,
    "float-nan": math.nan,
    "bool": True,
    "str": "2",
    "numpy-float": np.float64(2),
    "numpy-bool": np.bool_(True),
    "jax-float-scalar": jnp.array(2.0),
    "jax-int-vector": jnp.array([2]),
    "numpy-int-vector": np.array([2]),
    "complex": 2j,
}


@pytest.mark.parametrize("save", list(SAVES.values()), ids=list(SAVES))
@pytest.mark.parametrize("step", list(NOT_INTEGERS.values()), ids=list(NOT_INTEGERS))
def test_non_integer_step_raises_type_error_and_writes_nothing(run_with_history, save, step):
    before = disk(run_with_history)
    with pytest.raises(TypeError, match="step"):
        save(run_with_history, small_state(2), step)
    assert_untouched(run_with_history, before)


@pytest.mark.parametrize(
    "step", [np.int64(2), np.uint64(2), jnp.array(2), jnp.array(2, jnp.uint8)], ids=str
)
def test_integer_scalars_of_numpy_and_jax_are_accepted_as_steps(make_checkpointer, step):
    ckpt = make_checkpointer()
    assert ckpt.save_checkpoint(small_state(), step=step).endswith("state_2")
    loaded = ckpt.load_checkpoint(2)
    assert loaded["step"] == 2
    assert type(loaded["step"]) is int


class _NoStep:
    params = np.ones(2)


class _StepNone:
    step = None
    params = np.ones(2)


@pytest.mark.parametrize(
    "state",
    [_NoStep(), _StepNone(), {"params": np.ones(2)}, {"step": None}],
    ids=["object-without-step", "step-attribute-none", "dict-without-step", "dict-step-none"],
)
def test_step_none_without_a_step_on_the_state_raises_value_error(run_with_history, state):
    before = disk(run_with_history)
    with pytest.raises(ValueError, match="step"):
        run_with_history.save_checkpoint(state)
    assert_untouched(run_with_history, before)


def test_step_none_takes_a_dict_states_step_entry(make_checkpointer):
    """Besides ``train_state.step``, a dict state's ``"step"`` entry is used."""
    ckpt = make_checkpointer()
    assert ckpt.save_checkpoint({"step": 4, "w": np.ones(2)}).endswith("state_4")


def test_step_none_with_a_float_step_on_the_state_raises_type_error(make_checkpointer):
    ckpt = make_checkpointer()
    with pytest.raises(TypeError, match="step"):
        ckpt.save_checkpoint({"step": jnp.array(3.0), "w": np.ones(2)})
    assert disk(ckpt) == []


@pytest.mark.parametrize("method", ["should_save_latest", "should_save_numbered"])
def test_should_save_with_a_negative_step_raises_value_error_like_the_saves(
    make_checkpointer, method
):
    """maybe_save_checkpoints refuses a negative step; asking whether it is due must not
    answer yes (-5 % 5 == 0) for a step that cannot be saved."""
    ckpt = make_checkpointer(save_every=5, checkpoint_every=5)
    with pytest.raises(ValueError):
        getattr(ckpt, method)(-5)


@pytest.mark.parametrize("method", ["should_save_latest", "should_save_numbered"])
def test_should_save_with_a_non_integer_step_raises_type_error(make_checkpointer, method):
    ckpt = make_checkpointer(save_every=5, checkpoint_every=5)
    with pytest.raises(TypeError):
        getattr(ckpt, method)(5.0)


# --- metrics --------------------------------------------------------------------------


def test_nan_metric_is_stored_with_the_checkpoint(make_checkpointer):
    ckpt = make_checkpointer(save_every=1, checkpoint_every=1)
    ckpt.maybe_save_checkpoints(small_state(), 1, {"val/loss": math.nan, "acc": np.float32("nan")})
    for name in ("latest", 1):
        metrics = ckpt.load_checkpoint(name)["metrics"]
        assert math.isnan(metrics["val/loss"]) and math.isnan(metrics["acc"])


@pytest.mark.parametrize("minimize", [True, False])
def test_nan_metric_in_maybe_save_checkpoints_never_becomes_best(make_checkpointer, minimize):
    ckpt = make_checkpointer(
        save_every=1, checkpoint_every=None, keep_best=True, minimize_metric=minimize
    )
    assert set(ckpt.maybe_save_checkpoints(small_state(1), 1, {"val/loss": math.nan})) == {"latest"}
    assert ckpt.load_best() is None
    assert "best" in ckpt.maybe_save_checkpoints(small_state(2), 2, {"val/loss": 1.0})
    assert "best" not in ckpt.maybe_save_checkpoints(small_state(3), 3, {"val/loss": np.nan})
    assert ckpt.best_metric_value == 1.0
    assert ckpt.load_best()["step"] == 2


def test_inf_metric_is_stored_and_loads_back_as_inf(make_checkpointer):
    ckpt = make_checkpointer()
    ckpt.save_checkpoint(small_state(), step=1, metrics={"up": math.inf, "down": -math.inf})
    assert ckpt.load_checkpoint(1)["metrics"] == {"up": math.inf, "down": -math.inf}


def test_plus_inf_when_minimizing_is_not_better_than_the_initial_best(make_checkpointer):
    """best_metric_value starts at inf and the comparison is strict: inf never saves."""
    ckpt = make_checkpointer(keep_best=True)
    assert ckpt.update_best_checkpoint(small_state(), math.inf, step=1) is False
    assert ckpt.load_best() is None
    assert ckpt.best_metric_value == math.inf


def test_minus_inf_when_maximizing_is_not_better_than_the_initial_best(make_checkpointer):
    ckpt = make_checkpointer(keep_best=True, minimize_metric=False)
    assert ckpt.update_best_checkpoint(small_state(), -math.inf, step=1) is False
    assert ckpt.load_best() is None


def test_minus_inf_when_minimizing_becomes_best_for_good_also_after_a_restart(make_checkpointer):
    ckpt = make_checkpointer(keep_best=True)
    assert ckpt.update_best_checkpoint(small_state(1), -math.inf, step=1) is True
    assert ckpt.best_metric_value == -math.inf
    assert ckpt.update_best_checkpoint(small_state(2), -1e308, step=2) is False
    restarted = make_checkpointer(keep_best=True)
    assert restarted.best_metric_value == -math.inf
    assert restarted.update_best_checkpoint(small_state(3), -math.inf, step=3) is False
    assert restarted.load_best()["step"] == 1


NON_SCALAR_METRICS = {
    "numpy-vector": np.ones(3),
    "jax-vector": jnp.ones(3),
    "numpy-1-element": np.array([0.5]),
    "list": [0.5],
    "str": "0.5",
    "None": None,
    "complex": 0.5j,
    "numpy-complex": np.complex64(0.5),
    "dict": {"x": 0.5},
}


@pytest.mark.parametrize("value", list(NON_SCALAR_METRICS.values()), ids=list(NON_SCALAR_METRICS))
@pytest.mark.parametrize(
    "save",
    [
        pytest.param(lambda c, m: c.save_checkpoint(small_state(2), 2, {"val/loss": m}), id="save"),
        pytest.param(
            lambda c, m: c.maybe_save_checkpoints(small_state(2), 2, {"val/loss": m}), id="maybe"
        ),
        pytest.param(
            lambda c, m: c.update_best_checkpoint(small_state(2), m, step=2), id="update_best"
        ),
    ],
)
def test_metric_that_is_not_a_real_scalar_raises_type_error_naming_it_and_writes_nothing(
    run_with_history, value, save
):
    before = disk(run_with_history)
    with pytest.raises(TypeError, match="val/loss"):
        save(run_with_history, value)
    assert_untouched(run_with_history, before)


@pytest.mark.parametrize(
    "value, message",
    [
        ("0.5", "Metric 'val/loss' is a str: metrics must be scalar numbers."),
        (
            np.ones(3),
            "Metric 'val/loss' is a ndarray of shape (3,): metrics must be scalar numbers.",
        ),
        (None, "Metric 'val/loss' is a NoneType: metrics must be scalar numbers."),
        (
            10**5000,
            "Metric 'val/loss' is an int too large to store (16610 bits): metrics must be "
            "scalar numbers.",
        ),
    ],
    ids=["str", "vector", "None", "huge-int"],
)
def test_metric_that_cannot_be_stored_says_what_it_is_in_one_plain_sentence(
    run_with_history, value, message
):
    with pytest.raises(TypeError) as raised:
        run_with_history.save_checkpoint(small_state(2), 2, {"val/loss": value})
    assert str(raised.value) == message


def test_bool_metric_is_stored_but_cannot_decide_the_best(run_with_history):
    """A bool is kept as a metric (e.g. a flag) but is no number to compare: using it
    as ``metric_name`` raises TypeError."""
    path = run_with_history.save_checkpoint(small_state(2), step=2, metrics={"diverged": True})
    assert run_with_history.load_checkpoint(path)["metrics"] == {"diverged": True}
    before = disk(run_with_history)
    with pytest.raises(TypeError, match="val/loss"):
        run_with_history.maybe_save_checkpoints(small_state(3), 3, {"val/loss": True})
    assert disk(run_with_history) == before


@pytest.mark.parametrize("key", [1, None, ("val", "loss"), b"val/loss"], ids=repr)
def test_metric_key_that_is_not_a_str_raises_type_error_and_writes_nothing(run_with_history, key):
    before = disk(run_with_history)
    with pytest.raises(TypeError, match="str"):
        run_with_history.maybe_save_checkpoints(small_state(2), 2, {key: 0.5})
    assert_untouched(run_with_history, before)


@pytest.mark.parametrize(
    "metrics", [[("val/loss", 0.5)], 0.5, "val/loss"], ids=["list", "float", "str"]
)
def test_metrics_that_are_not_a_dict_raise_type_error(run_with_history, metrics):
    before = disk(run_with_history)
    with pytest.raises(TypeError):
        run_with_history.save_checkpoint(small_state(2), step=2, metrics=metrics)
    assert_untouched(run_with_history, before)


def test_metric_name_missing_from_metrics_saves_no_best_and_raises_nothing(make_checkpointer):
    ckpt = make_checkpointer(save_every=1, checkpoint_every=1, keep_best=True)
    saved = ckpt.maybe_save_checkpoints(small_state(), 1, {"train/loss": 0.1})
    assert set(saved) == {"latest", "numbered"}
    assert ckpt.best_metric_value == math.inf
    assert ckpt.load_best() is None
    assert ckpt.load_checkpoint(1)["metrics"] == {"train/loss": 0.1}


def test_metrics_are_not_looked_at_on_a_step_with_nothing_due(make_checkpointer):
    """The per-step fast path: with nothing due (and metric_name absent) the call
    returns at once, whatever the metrics hold; they are checked when a save happens."""
    ckpt = make_checkpointer(save_every=10, checkpoint_every=10, keep_best=True)
    assert ckpt.maybe_save_checkpoints(small_state(), 3, {"other": np.ones(3)}) == {}
    with pytest.raises(TypeError, match="other"):
        ckpt.maybe_save_checkpoints(small_state(), 10, {"other": np.ones(3)})


# --- unsupported leaves ---------------------------------------------------------------


def _generator():
    yield 1


UNSUPPORTED_LEAVES = {
    "set": {1, 2},
    "frozenset": frozenset({1}),
    "bytes": b"raw",
    "bytearray": bytearray(b"raw"),
    "memoryview": memoryview(b"raw"),
    "object": object(),
    "generator": _generator(),
    "module": types,
    "class": dict,
    "range": range(3),
    "ellipsis": ...,
    "decimal": decimal.Decimal("1.5"),
    "fraction": fractions.Fraction(1, 3),
    "numpy-str-array": np.array(["a", "b"]),
    "numpy-bytes-array": np.array([b"a", b"b"]),
    "numpy-structured-array": np.zeros(2, dtype=[("x", np.float32), ("y", np.int32)]),
    "numpy-datetime64": np.datetime64("2024-01-01"),
    "numpy-timedelta-array": np.array([1, 2], dtype="timedelta64[s]"),
    "numpy-bytes-scalar": np.bytes_(b"x"),
    "shape-dtype-struct": jax.ShapeDtypeStruct((2,), jnp.float32),
}


@pytest.mark.parametrize("leaf", list(UNSUPPORTED_LEAVES.values()), ids=list(UNSUPPORTED_LEAVES))
def test_unsupported_leaf_raises_type_error_naming_its_path_and_writes_nothing(
    run_with_history, leaf
):
    state = {"params": {"encoder": [np.ones(2), {"odd_leaf": leaf}]}}
    before = disk(run_with_history)
    with pytest.raises(TypeError) as excinfo:
        run_with_history.maybe_save_checkpoints(state, 2, {"val/loss": 0.1})
    message = str(excinfo.value)
    assert "params" in message and "encoder" in message and "odd_leaf" in message
    assert_untouched(run_with_history, before)


@pytest.mark.parametrize(
    "key",
    [(1, 2), 1.5, None, frozenset(), b"k"],
    ids=["tuple", "float", "None", "frozenset", "bytes"],
)
def test_dict_key_of_an_unsupported_type_raises_type_error_naming_the_dict(run_with_history, key):
    state = {"params": {"layer": {key: np.ones(2)}}}
    before = disk(run_with_history)
    with pytest.raises(TypeError) as excinfo:
        run_with_history.save_checkpoint(state, step=2)
    assert "params" in str(excinfo.value) and "layer" in str(excinfo.value)
    assert_untouched(run_with_history, before)


def test_self_referencing_state_raises_value_error_not_recursion_error(run_with_history):
    loop: list = [np.ones(2)]
    loop.append(loop)
    before = disk(run_with_history)
    with pytest.raises(ValueError, match="deeper"):
        run_with_history.save_checkpoint({"params": loop}, step=2)
    assert_untouched(run_with_history, before)


def test_state_nested_deeper_than_200_levels_raises_value_error(run_with_history):
    deep: object = np.ones(1)
    for _ in range(250):
        deep = [deep]
    before = disk(run_with_history)
    with pytest.raises(ValueError, match="deeper"):
        run_with_history.save_checkpoint({"params": deep}, step=2)
    assert_untouched(run_with_history, before)


def test_int_leaf_too_large_to_store_raises_at_the_call_naming_its_path(run_with_history):
    """JSON (and Python's int/str conversion) caps integers at 4,300 digits; a larger
    int leaf is a programming error like any unsupported leaf: refused up front,
    naming the leaf, never a half-written save."""
    before = disk(run_with_history)
    with pytest.raises((TypeError, ValueError)) as excinfo:
        run_with_history.save_checkpoint({"params": {"huge_counter": 10**5000}}, step=2)
    assert "huge_counter" in str(excinfo.value)
    assert_untouched(run_with_history, before)


def test_prng_key_of_an_implementation_not_built_into_jax_raises_naming_its_path(
    run_with_history,
):
    xr = pytest.importorskip("jax.extend.random")
    if not hasattr(xr, "define_prng_impl"):
        pytest.skip("this jax cannot define a PRNG implementation")
    base = xr.threefry_prng_impl
    impl = xr.define_prng_impl(
        key_shape=base.key_shape,
        seed=base.seed,
        split=base.split,
        random_bits=base.random_bits,
        fold_in=base.fold_in,
        name="my_threefry",
    )
    state = {"params": small_state()["params"], "rng": jax.random.key(0, impl=impl)}
    before = disk(run_with_history)
    with pytest.raises(TypeError, match=r"\['rng'\].*key_data"):
        run_with_history.maybe_save_checkpoints(state, 2, {"val/loss": 0.1})
    assert_untouched(run_with_history, before)


def test_int_leaf_of_4000_digits_round_trips_and_one_of_4001_is_refused(make_checkpointer):
    ckpt = make_checkpointer()
    largest = 10**4000 - 1  # 4,000 digits: the most the message promises to store
    ckpt.save_checkpoint({"n": largest, "m": -largest}, step=1)
    assert ckpt.load_checkpoint(1)["state"] == {"n": largest, "m": -largest}
    for too_large in (10**4000, -(10**4000)):
        with pytest.raises(ValueError, match="more than 4,000 digits"):
            ckpt.save_checkpoint({"n": too_large}, step=2)
    assert ckpt.load_latest()["step"] == 1


def test_int_metric_too_large_to_store_raises_type_error_naming_it(run_with_history):
    before = disk(run_with_history)
    with pytest.raises(TypeError, match="val/loss"):
        run_with_history.maybe_save_checkpoints(small_state(2), 2, {"val/loss": 10**5000})
    assert_untouched(run_with_history, before)


# --- other arguments --------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [5, ("latest",), b"latest"], ids=["int", "tuple", "bytes"])
def test_suffix_that_is_not_a_str_raises_value_error(run_with_history, suffix):
    before = disk(run_with_history)
    with pytest.raises(ValueError, match="not safe"):
        run_with_history.save_checkpoint(small_state(2), step=2, suffix=suffix)
    assert_untouched(run_with_history, before)


@pytest.mark.parametrize(
    "what, error",
    [
        (True, TypeError),
        (1.0, TypeError),
        (None, TypeError),
        (b"latest", TypeError),
        (-2, ValueError),
        (np.int64(-7), ValueError),
    ],
    ids=["bool", "float", "None", "bytes", "-2", "np.int64(-7)"],
)
def test_load_checkpoint_with_a_bad_argument_raises(run_with_history, what, error):
    with pytest.raises(error):
        run_with_history.load_checkpoint(what)


def test_update_best_without_keep_best_saves_nothing_and_returns_false(make_checkpointer):
    ckpt = make_checkpointer(keep_best=False)
    assert ckpt.update_best_checkpoint(small_state(), 0.1, step=1) is False
    assert disk(ckpt) == []
    assert ckpt.best_metric_value == math.inf


# --- storage and multi-host arguments ----------------------------------------------------


def test_storage_options_with_a_local_path_raise_value_error(make_checkpointer):
    with pytest.raises(ValueError, match="storage_options"):
        make_checkpointer(storage_options={"anon": True})


def test_an_unknown_url_protocol_raises_before_anything_is_written(tmp_path):
    from learnax.checkpoint import Checkpointer

    with pytest.raises(ValueError, match="nosuchfs"):
        Checkpointer("nosuchfs://bucket/runs", "run")
    assert list(tmp_path.iterdir()) == []


def test_a_registry_path_that_is_a_file_raises_saying_it_must_be_a_directory(tmp_path):
    from learnax.checkpoint import Checkpointer

    registry = tmp_path / "runs"
    registry.write_text("not a directory")
    with pytest.raises(NotADirectoryError) as raised:
        Checkpointer(registry, "run")
    assert str(raised.value) == (
        f"registry_path {str(registry)!r} is a file: it must be a directory (or not exist "
        "yet). Pass the directory that holds your runs."
    )
    assert registry.read_text() == "not a directory"


def test_a_run_path_that_is_a_file_raises_naming_the_file(tmp_path):
    from learnax.checkpoint import Checkpointer

    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "run").write_text("")
    with pytest.raises(NotADirectoryError, match=f"{tmp_path / 'runs' / 'run'} is a file"):
        Checkpointer(tmp_path / "runs", "run")


# Run in a fresh interpreter in which importing the named module fails, as it does
# where the package is not installed.
_WITHOUT_MODULE = """
import sys
class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == {module!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Missing())
from learnax.checkpoint import Checkpointer
try:
    Checkpointer({url!r}, "run")
except ImportError as e:
    print(e)
"""


def _error_without(module: str, url: str) -> str:
    code = _WITHOUT_MODULE.format(module=module, url=url)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_memory_url_without_fsspec_says_to_install_fsspec_not_an_extra():
    assert _error_without("fsspec", "memory://runs") == (
        "Checkpoints at 'memory://runs' need fsspec, which is not installed: pip install fsspec"
    )


@pytest.mark.parametrize(
    "url, extra, package",
    [("s3://bucket/runs", "s3", "s3fs"), ("gs://bucket/runs", "gcs", "gcsfs")],
)
@pytest.mark.parametrize("module", ["fsspec", "filesystem"])
def test_an_object_store_url_without_its_packages_names_its_extra(url, extra, package, module):
    message = _error_without("fsspec" if module == "fsspec" else package, url)
    assert message.startswith(
        f"Checkpoints at {url!r} need fsspec and {package}: pip install 'learnax[{extra}]'"
    )


@pytest.mark.parametrize("value", [0, -1.0, math.inf, math.nan])
def test_multihost_timeout_must_be_positive_and_finite(make_checkpointer, value):
    with pytest.raises(ValueError, match="multihost_timeout"):
        make_checkpointer(multihost_timeout=value)


@pytest.mark.parametrize("value", [True, "60", None])
def test_multihost_timeout_of_another_kind_raises_type_error(make_checkpointer, value):
    with pytest.raises(TypeError, match="multihost_timeout"):
        make_checkpointer(multihost_timeout=value)


# --- functions in the tree --------------------------------------------------------------


def test_functions_in_the_tree_are_not_stored_and_come_back_from_the_target(make_checkpointer):
    """An equinox module's activation, a lambda: recorded by name only (storing code would
    mean pickling it); None without a target, the target's own function with one."""
    ckpt = make_checkpointer()
    state = {"w": np.ones(3, np.float32), "act": jax.nn.relu, "f": lambda x: x, "g": len}
    ckpt.save_checkpoint(state, step=1)

    plain = ckpt.load_checkpoint(1)["state"]
    assert (plain["act"], plain["f"], plain["g"]) == (None, None, None)
    np.testing.assert_array_equal(plain["w"], state["w"])
    restored = ckpt.load_checkpoint(1, target=state)["state"]
    assert restored["act"] is jax.nn.relu and restored["f"] is state["f"] and restored["g"] is len
