"""The checks of ``_validation.py``, and that every transform makes those of its calls.

The helpers are tested directly (what they accept, what they refuse, the message);
the last tests check that each transform runs the checks of how it is called, so that
a misuse fails at once with the leaf it concerns, not deep inside ``update``.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_logdamp import (
    alrc,
    alrc_per_example,
    log_dampen,
    logadam,
    spike_guard,
)
from optax_logdamp._validation import (
    HALF_PRECISION_HINT,
    as_float,
    check_decay_rate,
    check_inexact_leaves,
    check_not_half_precision,
    check_open_unit_interval,
    check_params_match,
    check_positive,
    check_scalar,
    check_state_type,
    check_trees_match,
    is_concrete,
    loss_array,
    missing_value_error,
)


def passes_under_jit(check, value):
    """Runs ``check`` on ``value`` traced: a value check must let a tracer through."""
    jax.jit(lambda x: (check(x), x)[1])(value)


# ----------------------------------------------------------------- hyperparameter values


def test_is_concrete_and_as_float():
    assert is_concrete(1.0) and is_concrete(jnp.ones(2)) and is_concrete(np.float32(2))
    assert as_float(jnp.float32(0.5)) == 0.5 and as_float(3) == 3.0
    assert as_float(jnp.ones(2)) is None  # not a scalar

    def traced(x):
        assert not is_concrete(x) and as_float(x) is None
        return x

    jax.jit(traced)(1.0)


@pytest.mark.parametrize(
    "value", [1.0, 3, np.float32(2.0), np.int64(4), jnp.float32(0.5), jnp.ones(())]
)
def test_check_scalar_accepts_real_scalars(value):
    check_scalar("x", value)


@pytest.mark.parametrize(
    "value", [jnp.ones(2), np.ones((1,)), 1.0 + 2j, np.bool_(True), "1", [1.0]]
)
def test_check_scalar_refuses_what_is_not_a_real_scalar(value):
    with pytest.raises(ValueError, match=r"^x must be a real scalar, got "):
        check_scalar("x", value)


@pytest.mark.parametrize("value", [0.0, -1.0, np.nan, np.inf, -np.inf])
def test_check_positive_refuses_what_is_not_a_finite_positive_number(value):
    with pytest.raises(ValueError, match=r"^num_stddev must be a finite number > 0, got "):
        check_positive("num_stddev", value)


def test_check_positive_accepts_positive_numbers_and_tracers():
    for value in (1e-30, 2, jnp.float32(3e38)):
        check_positive("x", value)
    passes_under_jit(lambda x: check_positive("x", x), -1.0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_check_not_half_precision_refuses_a_half_dtype_even_traced(dtype):
    value = jnp.asarray(0.999, dtype)
    with pytest.raises(
        ValueError, match=rf"^decay must be float32 or wider, got dtype {dtype.__name__}"
    ):
        check_not_half_precision("decay", value)
    with pytest.raises(ValueError, match=r"hyperparam_dtype=jnp\.float32"):
        jax.jit(lambda x: check_not_half_precision("decay", x))(value)
    assert "hyperparam_dtype=jnp.float32" in HALF_PRECISION_HINT


def test_check_not_half_precision_accepts_float32_and_wider_and_numbers():
    for value in (0.999, jnp.float32(0.999), np.float64(0.999), 1):
        check_not_half_precision("decay", value)


def test_check_decay_rate_is_the_half_open_unit_interval():
    for value in (0.0, 0.5, 0.999, np.float32(0.9)):
        check_decay_rate("b1", value)
    for value in (1.0, -0.1, 1.5, np.nan):
        with pytest.raises(ValueError, match=r"^b1 must lie in \[0, 1\), got "):
            check_decay_rate("b1", value)
    with pytest.raises(ValueError, match=r"^b2 must be float32 or wider"):
        check_decay_rate("b2", jnp.bfloat16(0.9))
    passes_under_jit(lambda x: check_decay_rate("b1", x), 1.0)


def test_check_open_unit_interval_adds_its_hint():
    check_open_unit_interval("decay", 0.5)
    for value in (0.0, 1.0, np.nan):
        with pytest.raises(
            ValueError, match=r"^decay must lie strictly between 0 and 1, got .*\.$"
        ):
            check_open_unit_interval("decay", value)
    with pytest.raises(ValueError, match=r"got 1\.0\. Use a float32\.$"):
        check_open_unit_interval("decay", 1.0, hint="Use a float32.")
    passes_under_jit(lambda x: check_open_unit_interval("decay", x), 1.0)


# ----------------------------------------------------------------- trees


def test_check_trees_match_shows_both_structures_and_what_only_one_has():
    check_trees_match("t", "a", {"w": 1}, "b", {"w": 2}, problem="P", fix="F")
    many = {"w": 1, "x": {"a": 1, "b": 2, "c": 3, "d": 4}}
    with pytest.raises(ValueError) as error:
        check_trees_match("t", "a", many, "b", [1], problem="they differ", fix="do this")
    message = str(error.value)
    assert message.startswith("t: they differ (do this). a has structure PyTreeDef({'w': *, ")
    assert "b has PyTreeDef([*])." in message
    assert "Only in a: ['w'], ['x']['a'], ['x']['b'] and 2 more." in message
    assert "Only in b: [0]." in message


def test_check_trees_match_cuts_a_long_structure():
    big = {f"layer_{i}": 0 for i in range(40)}
    with pytest.raises(ValueError) as error:
        check_trees_match("t", "a", big, "b", {}, problem="P", fix="F")
    shown = str(error.value).split("a has structure ")[1].split(", b has")[0]
    assert len(shown) == 120 and shown.endswith("...")


def test_check_params_match_names_the_leaf_whose_shape_differs():
    updates = {"layer": {"w": jnp.ones((5, 3)), "b": jnp.ones(3)}}
    check_params_match("t", updates, None)  # params are optional in optax
    check_params_match("t", updates, jax.tree.map(jnp.zeros_like, updates))
    params = {"layer": {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}}
    with pytest.raises(
        ValueError,
        match=r"^t: params must have the shapes of updates; updates\['layer'\]\['w'\] has shape "
        r"\(5, 3\), params\['layer'\]\['w'\] has shape \(4, 3\)\.$",
    ):
        check_params_match("t", updates, params)
    with pytest.raises(ValueError, match=r"^t: params must have the tree structure of updates"):
        check_params_match("t", updates, {"layer": {"w": jnp.ones((5, 3))}})


def test_check_inexact_leaves_names_the_leaf_that_is_not():
    check_inexact_leaves("t", {"w": jnp.ones(2), "z": jnp.ones(2, jnp.complex64), "h": 1.0})
    for dtype in (jnp.int32, jnp.bool_, jnp.uint8):
        updates = {"w": jnp.ones(2), "buffers": {"count": jnp.ones(2, dtype)}}
        with pytest.raises(
            TypeError,
            match=r"^t expects floating-point or complex updates; the leaf "
            rf"updates\['buffers'\]\['count'\] has dtype {jnp.dtype(dtype).name}\. .*optax\.masked",
        ):
            check_inexact_leaves("t", updates)


# ----------------------------------------------------------------- states


class Expected(tuple):
    """A stand-in for a state type."""


class Subclass(Expected):
    pass


@pytest.mark.parametrize(
    ("state", "got", "hint"),
    [
        (None, "None", None),
        (optax.EmptyState(), "EmptyState", None),
        ({"count": 0}, "dict", r"restored without a target comes back as dicts.*a template\)\.$"),
        ((1, 2), "tuple", r"A tuple is the state of an optax\.chain: call update on the chain"),
        ([1, 2], "list", r"A tuple is the state of an optax\.chain"),
        (Subclass(), "Subclass", None),  # the exact type init returns, not a subclass
    ],
    ids=["None", "EmptyState", "dict", "tuple", "list", "subclass"],
)
def test_check_state_type_names_the_expected_type_and_a_hint(state, got, hint):
    check_state_type("t", Expected(), Expected)
    with pytest.raises(TypeError) as error:
        check_state_type("t", state, Expected)
    message = str(error.value)
    assert message.startswith(
        f"t: state must be the Expected that this transform's init returns, got {got}. "
        "Create it with opt_state = tx.init(params), and pass on the state that each "
        "tx.update returns."
    )
    if hint is None:
        assert message.endswith("tx.update returns.")
    else:
        assert re.search(hint, message), message


# ----------------------------------------------------------------- the loss (value)


def test_missing_value_error_names_the_transform_and_the_fixes():
    error = missing_value_error('alrc(signal="both")')
    assert isinstance(error, TypeError)
    message = str(error)
    assert message.startswith('alrc(signal="both") needs the loss of this step.')
    assert "tx.update(grads, opt_state, params, value=loss)" in message
    assert "use `optax_logdamp.flax.TrainState`" in message  # Flax Linen drops `value`
    assert "optimizer.update(model, grads, value=loss)" in message  # Flax NNX
    with pytest.raises(TypeError) as raised:
        loss_array('alrc(signal="both")', None)
    assert str(raised.value) == message


@pytest.mark.parametrize(
    "value", [1.0, 3, np.float32(2.0), jnp.ones(()), jnp.ones(4, jnp.bfloat16), [1.0, 2.0]]
)
def test_loss_array_takes_real_numbers_and_arrays(value):
    loss = loss_array("t", value)
    assert isinstance(loss, jax.Array)
    np.testing.assert_array_equal(np.asarray(loss, np.float32), np.asarray(value, np.float32))


@pytest.mark.parametrize(
    ("value", "got"),
    [
        ("1.0", "str '1.0'"),
        (b"1.0", "bytes b'1.0'"),
        (object(), "object <object"),
        (True, "dtype bool"),
        (1.0 + 1j, "dtype complex"),
        (jnp.ones(2, jnp.complex64), "dtype complex64"),
    ],
    ids=["str", "bytes", "object", "bool", "complex", "complex_array"],
)
def test_loss_array_refuses_what_is_not_a_real_loss(value, got):
    with pytest.raises(
        TypeError,
        match=r"^t: value must be a real loss, a number or an array of them \(the loss that "
        rf"jax\.value_and_grad returns: tx\.update\(grads, opt_state, params, value=loss\)\), "
        rf"got {got}",
    ):
        loss_array("t", value)


# ----------------------------------------------------------------- the transforms check

TRANSFORMS = {
    "alrc": (alrc, "alrc"),
    "alrc_grad_norm": (lambda: alrc(signal="grad_norm"), r'alrc\(signal="grad_norm"\)'),
    "alrc_per_example": (alrc_per_example, "alrc_per_example"),
    "spike_guard": (spike_guard, "spike_guard"),
    "log_dampen": (log_dampen, "log_dampen"),
    "log_dampen_auto": (lambda: log_dampen("auto"), r'log_dampen\("auto"\)'),
    "logadam": (lambda: logadam(1e-3), "log_dampen"),  # the chain's first transform
}


def update_once(name, updates, params):
    tx = optax.with_extra_args_support(TRANSFORMS[name][0]())
    value = jnp.ones(3) if name == "alrc_per_example" else 1.0
    return tx.update(updates, tx.init(updates if params is None else params), params, value=value)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_updates_of_another_shape_than_params_are_refused_naming_the_leaf(name):
    params = {"layer": {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}}
    updates = {"layer": {"w": jnp.ones((5, 3)), "b": jnp.ones(3)}}
    with pytest.raises(
        ValueError,
        match=rf"^{TRANSFORMS[name][1]}: params must have the shapes of updates; "
        r"updates\['layer'\]\['w'\] has shape \(5, 3\), params\['layer'\]\['w'\] has shape "
        r"\(4, 3\)\.$",
    ):
        update_once(name, updates, params)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_a_params_tree_unlike_the_updates_is_refused_showing_both(name):
    params = [jnp.zeros(3), jnp.zeros(2)]
    updates = {"w": jnp.zeros(3)}
    tx = optax.with_extra_args_support(TRANSFORMS[name][0]())
    value = jnp.ones(3) if name == "alrc_per_example" else 1.0
    with pytest.raises(
        ValueError,
        match=rf"^{TRANSFORMS[name][1]}: params must have the tree structure of updates.*"
        r"updates has structure PyTreeDef\(\{'w': \*\}\), params has PyTreeDef\(\[\*, \*\]\)\."
        r" Only in updates: \['w'\]\. Only in params: \[0\], \[1\]\.",
    ):
        tx.update(updates, tx.init(updates), params, value=value)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_an_update_leaf_that_is_not_floating_point_is_named(name):
    updates = {"w": jnp.ones(3), "buffers": {"count": jnp.ones(2, jnp.int32)}}
    with pytest.raises(TypeError, match=r"updates\['buffers'\]\['count'\] has dtype int32"):
        jax.jit(lambda u: update_once(name, u, None))(updates)
