import math

import pytest

from lightning_imex.optim import TABLEAUX, IMEXTableau, get_tableau

TRAPEZOIDAL = dict(a_explicit=[[0, 0], [1, 0]], b_explicit=[0.5, 0.5],
                   a_implicit=[[0, 0], [0.5, 0.5]], b_implicit=[0.5, 0.5], order=2)


def test_builtins_match_algorithms_md():
    assert list(TABLEAUX) == ["euler", "trapezoidal", "trapezoidal_pc", "ars222", "ars343", "ssp3_433"]
    g = 1 - 1 / math.sqrt(2)
    d = 1 - 1 / (2 * g)
    ars222 = TABLEAUX["ars222"]
    assert ars222.a_explicit[2] == pytest.approx((d, 1 - d, 0)) and d == pytest.approx(-0.7071067811865)
    assert ars222.a_implicit[2] == pytest.approx((0, 1 - g, g))
    ars343 = TABLEAUX["ars343"]
    assert ars343.b_explicit == pytest.approx((0, 1.2084966492, -0.6443631707, 0.4358665215))
    assert ars343.a_explicit[3] == pytest.approx((-0.1058582958, 0.5529291479, 0.5529291479, 0))
    assert ars343.a_explicit[2] == pytest.approx((0.3212788862, 0.3966543745, 0, 0))
    ssp = TABLEAUX["ssp3_433"]
    alpha, beta, eta = 0.24169426078821, 0.06042356519705, 0.12915286960590
    assert ssp.a_implicit[3] == pytest.approx((beta, eta, 0.5 - beta - eta - alpha, alpha))
    assert ssp.a_implicit[1] == pytest.approx((-alpha, alpha, 0, 0))
    assert ssp.b_explicit == ssp.b_implicit == pytest.approx((0, 1 / 6, 1 / 6, 2 / 3))
    pc = TABLEAUX["trapezoidal_pc"]
    assert pc.a_implicit == ((0, 0, 0), (0, 1, 0), (0.5, 0, 0.5))


@pytest.mark.parametrize("name,grads,order,positive,reuse", [
    ("euler", 1, 1, True, False),
    ("trapezoidal", 2, 2, True, True),
    ("trapezoidal_pc", 2, 2, True, False),
    ("ars222", 2, 2, False, False),
    ("ars343", 4, 3, False, True),  # its last gradient stage also sits at theta_{n+1}
    ("ssp3_433", 3, 3, True, False),
])
def test_derived_properties(name, grads, order, positive, reuse):
    t = TABLEAUX[name]
    assert (t.num_gradients, t.order, t.positivity_preserving, t.allows_gradient_reuse) == (
        grads, order, positive, reuse)
    assert t.first_gradient_at_start


def test_ssp3_first_stage_needs_no_gradient():
    assert TABLEAUX["ssp3_433"].gradient_stages == (1, 2, 3)


def test_accepts_any_sequences_and_is_hashable():
    np = pytest.importorskip("numpy")
    t = IMEXTableau(np.array(TRAPEZOIDAL["a_explicit"]), (0.5, 0.5), TRAPEZOIDAL["a_implicit"],
                    np.array([0.5, 0.5]), order=2, name="mine")
    assert t.a_explicit == ((0.0, 0.0), (1.0, 0.0)) and hash(t) == hash(IMEXTableau(**TRAPEZOIDAL, name="mine"))


@pytest.mark.parametrize("change,field,message", [
    (dict(a_explicit=[[0, 0, 0], [1, 0, 0]]), "a_explicit", "square"),
    (dict(a_implicit=[[0, 0, 0], [0, 0, 0], [0, 0, 0]]), "a_implicit", "same number of stages"),
    (dict(a_explicit=[[0, 1], [1, 0]]), "a_explicit", "strictly lower triangular"),
    (dict(a_explicit=[[0.1, 0], [1, 0]]), "a_explicit", "strictly lower triangular"),
    (dict(a_implicit=[[0, 0.5], [0.5, 0.5]]), "a_implicit", "lower triangular"),
    (dict(b_explicit=[0.5, 0.6]), "b_explicit", "sum to 1"),
    (dict(b_implicit=[1.0]), "b_implicit", "one per stage"),
    (dict(order=0), "order", "order must be an integer >= 1, got 0"),
    (dict(a_explicit=[[0, 0], [float("nan"), 0]]), "", "finite"),
])
def test_malformed_tableau_raises_naming_the_field(change, field, message):
    with pytest.raises(ValueError, match=message) as err:
        IMEXTableau(**{**TRAPEZOIDAL, **change})
    assert field in str(err.value)


def test_non_numeric_tableau_is_a_type_error():
    with pytest.raises(TypeError, match="a_explicit"):
        IMEXTableau(**{**TRAPEZOIDAL, "a_explicit": 3})


def test_get_tableau_lists_known_names():
    assert get_tableau("euler") is TABLEAUX["euler"]
    with pytest.raises(ValueError, match="euler, trapezoidal, trapezoidal_pc, ars222, ars343, ssp3_433"):
        get_tableau("rk4")
    with pytest.raises(TypeError, match="IMEXTableau"):
        get_tableau(3)
