"""Online recurrent layers in whole Flax models: per-layer traces, gradients across layers at the
current step, against references built without the layers (float64)."""

import functools
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from online_learning import jit

import rtrl_jax as rj
from rtrl_jax._src import layers

pytestmark = pytest.mark.x64  # float64 exactness checks

IN, H, OUT, T, B = 2, 3, 2, 5, 2


def relative_error(a, b):
    a, b = jax.flatten_util.ravel_pytree(a)[0], jax.flatten_util.ravel_pytree(b)[0]
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def step_loss(out, y):
    return 0.5 * jnp.sum((out - y) ** 2)


def data(seed, batch=B):
    kx, ky = jax.random.split(jax.random.PRNGKey(seed))
    return jax.random.normal(kx, (T, batch, IN)), jax.random.normal(ky, (T, batch, OUT))


class _VectorCell(nn.RNNCellBase):
    """A cell with a zero carry of ``features`` units."""

    features: int

    @nn.nowrap
    def initialize_carry(self, rng, input_shape):
        return jnp.zeros(self.features)

    @property
    def num_feature_axes(self):
        return 1


class NoRecurrenceCell(_VectorCell):
    """``h_t = tanh(W x_t + b)``: a cell that ignores its previous carry."""

    @nn.compact
    def __call__(self, carry, x):
        h = jnp.tanh(nn.Dense(self.features, name="i")(x))
        return h, h


class DiagonalCell(_VectorCell):
    """``h_t = tanh(λ ⊙ h_{t-1} + x_t)``: no Dense layer, so no Kronecker factor."""

    @nn.compact
    def __call__(self, carry, x):
        h = jnp.tanh(self.param("decay", nn.initializers.ones, (self.features,)) * carry + x)
        return h, h


class Stack(nn.Module):
    """Dense encoder -> online recurrent layers (optional residuals) -> optional LayerNorm -> head."""

    cells: tuple
    estimators: tuple = ()
    residual: bool = False
    norm: bool = False

    @nn.compact
    def __call__(self, x, reset=None):
        h = nn.Dense(H, name="encoder")(x)
        for i, cell in enumerate(self.cells):
            estimator = self.estimators[i] if self.estimators else "rtrl"
            y = rj.OnlineRNN(cell, estimator, name=f"rnn{i}")(h, reset)
            h = y + h if self.residual and i > 0 else y
        if self.norm:
            h = nn.LayerNorm(name="norm")(h)
        return nn.Dense(OUT, name="head")(h)


def reference_loss(model: Stack, params, xs, ys, t=None):
    """``Σ_s L_s`` of one stream, written with the cells' own ``apply`` (no online layer).

    ``t=None``: full BPTT. ``t``: only ``L_t``, in the graph where every recurrent layer's input is
    cut (``stop_gradient``) at every step but ``t``: the per-layer-trace approximation of ``L_t``.
    """
    encoder, head, norm = nn.Dense(H), nn.Dense(OUT), nn.LayerNorm()
    carries = tuple(_initial_carries(model))

    def body(carries, step):
        s, x, y = step
        live = True if t is None else s == t
        h = encoder.apply({"params": params["encoder"]}, x)
        new = []
        for i, (cell, carry) in enumerate(zip(model.cells, carries, strict=True)):
            inp = h if t is None else jax.tree.map(lambda a: jnp.where(live, a, jax.lax.stop_gradient(a)), h)
            carry, y_i = cell.apply({"params": params[f"rnn{i}"]["core"]}, carry, inp)
            new.append(carry)
            h = y_i + h if model.residual and i > 0 else y_i
        if model.norm:
            h = norm.apply({"params": params["norm"]}, h)
        loss = step_loss(head.apply({"params": params["head"]}, h), y)
        return tuple(new), loss * live

    _, losses = jax.lax.scan(body, carries, (jnp.arange(T), xs, ys))
    return losses.sum()


def _initial_carries(model):
    return [
        jax.tree.map(lambda a: a.astype(jnp.float64), cell.initialize_carry(jax.random.PRNGKey(0), (H,)))
        for cell in model.cells
    ]


def reference_grads(model, params, xs, ys, cut):
    """Gradients of the batch's ``Σ_t L_t``: full BPTT, or the cut graphs of each ``L_t`` summed."""

    def one_stream(params, xs, ys):
        if not cut:
            return reference_loss(model, params, xs, ys)
        return jax.vmap(lambda t: reference_loss(model, params, xs, ys, t))(jnp.arange(T)).sum()

    def batch_loss(params):
        return jax.vmap(one_stream, in_axes=(None, 1, 1))(params, xs, ys).sum()

    return jit(jax.grad(batch_loss))(params)


def init(model, xs):
    """Float64 variables (initialised in float32, the cells' parameter dtype, then cast)."""
    return rj.cast_floating(model.init(jax.random.PRNGKey(0), xs[0].astype(jnp.float32)), jnp.float64)


@functools.partial(jit, static_argnums=0)
def online_step_grads(model, params, state, x, y, reset):
    """One step of the user's unchanged per-step loss: ``(new online state, gradients)``."""

    def loss(params):
        out, new_state = model.apply({"params": params, **state}, x, reset, mutable=["online"])
        return step_loss(out, y), new_state

    (_, state), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return state, grads


def online_grads(model, variables, xs, ys, resets=None):
    """The per-step online gradients over the sequence (fixed parameters)."""
    params, state = variables["params"], {"online": variables["online"]}
    if resets is None:  # an all-false mask rather than None: one compilation serves both
        resets = jnp.zeros(xs.shape[:2], bool)
    per_step = []
    for t in range(T):
        state, grads = online_step_grads(model, params, state, xs[t], ys[t], resets[t])
        per_step.append(grads)
    return per_step


def total(per_step):
    return jax.tree.map(lambda *g: sum(g), *per_step)


def test_online_step_input_cotangent_is_the_immediate_input_jacobian():
    core = rj.from_linen(nn.GRUCell(H), IN)
    params, _ = core.init(jax.random.PRNGKey(0), jnp.float64)
    carry, x, y = (jax.random.normal(jax.random.PRNGKey(k), (n,)) for k, n in ((1, H), (2, IN), (3, H)))
    estimator = rj.rtrl(core)
    step = rj.online_step(core, estimator)

    def loss(trace, carry, x):  # reads the output and the new carry
        new_carry, out, _ = step(params, trace, carry, x, None)
        return step_loss(out, y) + jnp.sum(new_carry**3)

    def direct(x):  # the same loss of the bare core, previous carry held fixed
        new_carry, out = core(params, carry, x)
        return step_loss(out, y) + jnp.sum(new_carry**3)

    @jax.jit
    def both():
        trace = estimator.step(estimator.init(params, carry), params, carry, x)[2]
        return jax.grad(loss, argnums=(0, 1, 2))(trace, carry, x), jax.grad(direct)(x)

    (trace_bar, carry_bar, x_bar), expected = both()
    np.testing.assert_allclose(x_bar, expected, rtol=1e-13, atol=1e-15)
    assert not np.any(jax.flatten_util.ravel_pytree((trace_bar, carry_bar))[0])


# row_blocks=16 holds the layer's larger blocks as RowChunks in its online variables.
@pytest.mark.parametrize("options", [{}, {"row_blocks": 16}], ids=["default", "row-chunks"])
def test_one_layer_and_linear_head_equal_online_grad_on_the_bare_core(options):
    class OneLayer(nn.Module):
        @nn.compact
        def __call__(self, x, reset=None):
            rnn = rj.OnlineRNN(nn.GRUCell(H), "rtrl", options=options, name="rnn")
            return nn.Dense(OUT, name="head")(rnn(x))

    model = OneLayer()
    xs, ys = data(0)
    variables = init(model, xs)
    chunked = jax.tree.leaves(variables, is_leaf=lambda leaf: isinstance(leaf, rj.RowChunks))
    assert any(isinstance(leaf, rj.RowChunks) for leaf in chunked) == bool(options)
    online = online_grads(model, variables, xs, ys)

    core = rj.from_linen(nn.GRUCell(H), IN)
    estimator = rj.rtrl(core)
    params, head = variables["params"]["rnn"]["core"], variables["params"]["head"]
    carry = jnp.zeros((B, H))
    trace = jax.vmap(estimator.init, in_axes=(None, 0))(params, carry)

    @jax.jit
    def reference_step(trace, carry, x, y):
        carry, out, trace = jax.vmap(estimator.step, in_axes=(0, None, 0, 0))(trace, params, carry, x)
        head_loss = lambda head, out: step_loss(nn.Dense(OUT).apply({"params": head}, out), y)  # noqa: E731
        head_grad, out_bar = jax.grad(head_loss, argnums=(0, 1))(head, out)
        rnn_grad = jax.vmap(lambda tr, c, ob: rj.online_grad(core, estimator, tr, params, c, ob))(
            trace, carry, out_bar
        )
        return trace, carry, {"head": head_grad, "rnn": {"core": jax.tree.map(lambda g: g.sum(0), rnn_grad)}}

    for t in range(T):
        trace, carry, expected = reference_step(trace, carry, xs[t], ys[t])
        assert relative_error(online[t], expected) <= 1e-12


@pytest.mark.parametrize(
    "model",
    [
        Stack((nn.GRUCell(H), nn.SimpleCell(H))),
        Stack((nn.GRUCell(H), nn.LSTMCell(H), nn.SimpleCell(H)), residual=True, norm=True),
    ],
    ids=["2-layer", "3-layer-residual-norm"],
)
def test_stack_with_exact_per_layer_traces_equals_bptt_with_cross_layer_paths_cut(model):
    xs, ys = data(1)
    variables = init(model, xs)
    online = total(online_grads(model, variables, xs, ys))
    cut = reference_grads(model, variables["params"], xs, ys, cut=True)
    assert relative_error(online, cut) <= 1e-10
    bptt = reference_grads(model, variables["params"], xs, ys, cut=False)
    assert relative_error(online["rnn0"], bptt["rnn0"]) > 1e-4  # the cross-layer paths matter here


def test_stack_whose_top_layer_has_no_recurrence_equals_full_bptt():
    model = Stack((nn.GRUCell(H), NoRecurrenceCell(H)))
    xs, ys = data(2)
    variables = init(model, xs)
    online = total(online_grads(model, variables, xs, ys))
    bptt = reference_grads(model, variables["params"], xs, ys, cut=False)
    for name in ("head", "rnn1", "rnn0"):
        assert relative_error(online[name], bptt[name]) <= 1e-10, name


@pytest.fixture(scope="module")
def one_layer_with_encoder():
    """Encoder -> one GRU layer -> head, run online; shared by the tests of what the encoder gets."""
    with jax.enable_x64(True):
        model = Stack((nn.GRUCell(H),))
        xs, ys = data(3)
        variables = init(model, xs)
        return model, variables, xs, ys, online_grads(model, variables, xs, ys)


def test_one_recurrent_layer_head_and_layer_exact_encoder_current_step_only(one_layer_with_encoder):
    model, variables, xs, ys, per_step = one_layer_with_encoder
    online = total(per_step)
    bptt = reference_grads(model, variables["params"], xs, ys, cut=False)
    assert relative_error(online["head"], bptt["head"]) <= 1e-10
    assert relative_error(online["rnn0"], bptt["rnn0"]) <= 1e-10
    assert relative_error(online["encoder"], bptt["encoder"]) > 1e-3  # its path through h_{t-1} is dropped


def test_encoder_folded_into_the_core_is_exact(one_layer_with_encoder):
    model, variables, xs, ys, _ = one_layer_with_encoder

    class Folded(nn.Module):
        @nn.compact
        def __call__(self, x, reset=None):
            cell = rj.StackedCell([nn.Dense(H), nn.GRUCell(H)])
            return nn.Dense(OUT, name="head")(rj.OnlineRNN(cell, "rtrl", name="rnn")(x))

    params = variables["params"]
    folded_params = {
        "head": params["head"],
        "rnn": {"core": {"layers_0": params["encoder"], "layers_1": params["rnn0"]["core"]}},
    }
    folded = Folded()
    folded_variables = {"params": folded_params, "online": init(folded, xs)["online"]}
    online = total(online_grads(folded, folded_variables, xs, ys))
    bptt = reference_grads(model, params, xs, ys, cut=False)
    expected = {
        "head": bptt["head"],
        "rnn": {"core": {"layers_0": bptt["encoder"], "layers_1": bptt["rnn0"]["core"]}},
    }
    assert relative_error(online, expected) <= 1e-10


def test_encoder_receives_the_sum_of_the_per_step_spatial_gradients(one_layer_with_encoder):
    model, variables, xs, ys, per_step = one_layer_with_encoder
    params = variables["params"]
    encoder, cell, head = nn.Dense(H), model.cells[0], nn.Dense(OUT)

    def step_loss_of_encoder(encoder_params, carry, x, y):  # step t with h_{t-1} held fixed
        inp = encoder.apply({"params": encoder_params}, x)
        _, h = cell.apply({"params": params["rnn0"]["core"]}, carry, inp)
        return step_loss(head.apply({"params": params["head"]}, h), y)

    @jax.jit
    def spatial(carry, x, y):
        grads = jax.vmap(jax.grad(step_loss_of_encoder), in_axes=(None, 0, 0, 0))(
            params["encoder"], carry, x, y
        )
        inp = encoder.apply({"params": params["encoder"]}, x)
        carry, _ = cell.apply({"params": params["rnn0"]["core"]}, carry, inp)
        return carry, jax.tree.map(lambda g: g.sum(0), grads)

    carry, expected = jnp.zeros((B, H)), []
    for t in range(T):
        carry, grads = spatial(carry, xs[t], ys[t])
        expected.append(grads)
        assert relative_error(per_step[t]["encoder"], grads) <= 1e-12
    assert relative_error(total(per_step)["encoder"], total(expected)) <= 1e-12


def test_batch_equals_the_sum_of_single_streams_and_reset_starts_a_stream_afresh():
    model = Stack((nn.GRUCell(H), nn.SimpleCell(H)))  # compiled for the 2-layer test too
    xs, ys = data(4)
    variables = init(model, xs)
    resets = jnp.zeros((T, B), bool).at[2, 0].set(True)
    batched = online_grads(model, variables, xs, ys, resets)

    one = {"params": variables["params"], "online": init(model, xs[:, :1])["online"]}
    stream1 = online_grads(model, one, xs[:, 1:], ys[:, 1:], resets[:, 1:])
    before = online_grads(model, one, xs[:, :1], ys[:, :1], resets[:, 1:])  # no reset: one stream of T
    after = online_grads(model, one, jnp.roll(xs[:, :1], -2, 0), jnp.roll(ys[:, :1], -2, 0), resets[:, 1:])
    for t in range(T):
        stream0 = before[t] if t < 2 else after[t - 2]
        assert relative_error(batched[t], jax.tree.map(jnp.add, stream0, stream1[t])) <= 1e-12


def test_sequential_embedding_and_different_estimators_per_layer_train_under_jit_with_optax():
    vocab = 5
    model = nn.Sequential(
        [
            nn.Embed(vocab, H),
            rj.OnlineRNN(nn.GRUCell(H), "uoro"),  # stochastic: keys from the stored key
            rj.OnlineRNN(nn.GRUCell(H), "snap"),
            nn.LayerNorm(),
            rj.OnlineRNN(nn.SimpleCell(H), "rtrl"),
            nn.Dense(vocab),
        ]
    )
    tokens = jax.random.randint(jax.random.PRNGKey(5), (T + 1, 3), 0, vocab)
    variables = rj.cast_floating(model.init(jax.random.PRNGKey(0), tokens[0]), jnp.float64)
    params, state = variables["params"], {"online": variables["online"]}
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, state, x, y):
        def loss(params):
            logits, state_ = model.apply({"params": params, **state}, x, mutable=["online"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).sum(), state_

        (_, state), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, state, grads

    first, keys = params, [state["online"]["layers_1"]["key"]]
    for t in range(T):
        params, opt_state, state, grads = train_step(params, opt_state, state, tokens[t], tokens[t + 1])
        assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
        keys.append(state["online"]["layers_1"]["key"])
    assert all(np.any(g) for g in jax.tree.leaves(grads))  # the embedding and every layer train
    assert all(
        not np.allclose(a, b) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(params), strict=True)
    )
    assert len({tuple(np.asarray(k).ravel()) for k in keys}) == T + 1  # a fresh key every step
    assert train_step._cache_size() == 1


@pytest.mark.slow  # the stored-key path runs by default (the Sequential test)
def test_stochastic_layer_draws_from_the_rng_stream_when_the_call_has_one():
    model = rj.OnlineRNN(nn.SimpleCell(8), "uoro")  # 16 random signs per step: keys tell apart
    x = jnp.ones((B, IN), jnp.float32)
    variables = model.init(jax.random.PRNGKey(0), x)
    apply = lambda key: model.apply(variables, x, mutable=["online"], rngs={"online": key})[1]  # noqa: E731
    first, again, other = (
        apply(jax.random.PRNGKey(1)),
        apply(jax.random.PRNGKey(1)),
        apply(jax.random.PRNGKey(2)),
    )
    assert relative_error(first["online"]["trace"], again["online"]["trace"]) == 0
    assert relative_error(first["online"]["trace"], other["online"]["trace"]) > 1e-3
    np.testing.assert_array_equal(first["online"]["key"], variables["online"]["key"])  # stored key unused


def test_nnx_layer_gives_the_linen_gradients():
    class Linen(nn.Module):
        @nn.compact
        def __call__(self, x, reset=None):
            h = rj.OnlineRNN(nn.SimpleCell(H), "rtrl", name="rnn")(nn.Dense(H, name="encoder")(x))
            return nn.Dense(OUT, name="head")(h)

    class NNX(nnx.Module):
        def __init__(self, rngs):
            kw = {"dtype": jnp.float64, "param_dtype": jnp.float64, "rngs": rngs}
            self.encoder = nnx.Linear(IN, H, **kw)
            self.rnn = rj.NNXOnlineRNN(nnx.SimpleCell(H, H, **kw), "rtrl", batch_size=B, rngs=rngs)
            self.head = nnx.Linear(H, OUT, **kw)

        def __call__(self, x):
            return self.head(self.rnn(self.encoder(x)))

    xs, ys = data(6)
    model = Linen()
    variables = init(model, xs)
    linen = online_grads(model, variables, xs, ys)

    net = NNX(nnx.Rngs(0))
    p = variables["params"]
    cell = p["rnn"]["core"]
    nnx.update(
        net,
        nnx.State(
            {
                "encoder": p["encoder"],
                "head": p["head"],
                "rnn": {"cell": {"dense_i": cell["i"], "dense_h": cell["h"]}},
            }
        ),
    )

    @nnx.jit
    def step(net, x, y):
        return nnx.grad(lambda net: step_loss(net(x), y))(net)

    for t in range(T):
        grads = nnx.to_pure_dict(step(net, xs[t], ys[t]))
        g = grads["rnn"]["cell"]
        as_linen = {
            "encoder": grads["encoder"],
            "head": grads["head"],
            "rnn": {"core": {"i": g["dense_i"], "h": g["dense_h"]}},
        }
        assert relative_error(as_linen, linen[t]) <= 1e-12


def test_a_cell_the_estimator_cannot_serve_names_the_layer():
    x = data(7)[0][0].astype(jnp.float32)
    model = Stack((nn.GRUCell(H), DiagonalCell(H)), estimators=("rtrl", "kf"))
    with pytest.raises(ValueError, match=r"online layer 'rnn1'.*estimator 'kf' cannot serve"):
        model.init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match=r"online layer 'below'.*flax.linen"):
        rj.NNXOnlineRNN(
            nnx.SimpleCell(IN, H, rngs=nnx.Rngs(0)), "kf", batch_size=B, rngs=nnx.Rngs(0), name="below"
        )
    with pytest.raises(ValueError, match=r"online layer 'rnn0'.*unknown estimator 'nope'"):
        Stack((nn.GRUCell(H),), estimators=("nope",)).init(jax.random.PRNGKey(0), x)


@pytest.mark.slow  # KF-RTRL and SnAp-1 on 16-unit GRUs, Adam: compiling it takes a while
def test_module_example_runs():
    example = layers.__doc__.split("Example (linen; the nnx layer is :class:`NNXOnlineRNN`)::\n")[1]
    code = textwrap.dedent(example)
    assert len([line for line in code.splitlines() if line.strip()]) <= 25
    namespace: dict = {}
    with jax.enable_x64(False):
        exec(compile(code, "rtrl_jax/_src/layers.py", "exec"), namespace)  # noqa: S102
    assert np.isfinite(namespace["value"])


def _nnx_simple_cell(core):
    return {"dense_i": core["i"], "dense_h": core["h"]}


class NNXStack(nnx.Module):
    """``Stack((nn.SimpleCell(H), nn.SimpleCell(H)))`` in nnx: per-layer traces, or the encoder and
    both cells as one :class:`~rtrl_jax.NNXStackedCell` core (``whole=True``)."""

    def __init__(self, whole: bool):
        kw = {"dtype": jnp.float64, "param_dtype": jnp.float64, "rngs": nnx.Rngs(0)}
        layers = [nnx.Linear(IN, H, **kw), nnx.SimpleCell(H, H, **kw), nnx.SimpleCell(H, H, **kw)]
        online = functools.partial(rj.NNXOnlineRNN, estimator="rtrl", batch_size=B, rngs=nnx.Rngs(1))
        if whole:
            self.rnns = nnx.List([online(rj.NNXStackedCell(layers))])
        else:
            self.encoder = layers[0]
            self.rnns = nnx.List([online(cell) for cell in layers[1:]])
        self.head = nnx.Linear(H, OUT, **kw)

    def __call__(self, x):
        h = self.encoder(x) if hasattr(self, "encoder") else x
        for rnn in self.rnns:
            h = rnn(h)
        return self.head(h)

    @staticmethod
    def layout(params, whole: bool):
        """The linen ``Stack``'s parameters (or gradients) in this model's layout."""
        cells = [_nnx_simple_cell(params[f"rnn{i}"]["core"]) for i in range(2)]
        if whole:
            rnns = {0: {"cell": {"layers": {0: params["encoder"], 1: cells[0], 2: cells[1]}}}}
            return {"rnns": rnns, "head": params["head"]}
        rnns = {i: {"cell": cell} for i, cell in enumerate(cells)}
        return {"encoder": params["encoder"], "rnns": rnns, "head": params["head"]}


@pytest.fixture(scope="module")
def simple_stack_references():
    """A linen 2-layer SimpleCell ``Stack``'s parameters, data and reference gradients (cut, BPTT)."""
    with jax.enable_x64(True):
        model = Stack((nn.SimpleCell(H), nn.SimpleCell(H)))
        xs, ys = data(8)
        params = init(model, xs)["params"]
        references = {cut: reference_grads(model, params, xs, ys, cut=cut) for cut in (True, False)}
        return params, xs, ys, references


@pytest.mark.parametrize("whole", [False, True], ids=["per-layer-traces", "stacked-cell"])
def test_nnx_stack_equals_the_linen_references(simple_stack_references, whole):
    # per-layer traces: BPTT with cross-layer paths cut; one stacked core under exact RTRL: BPTT
    params, xs, ys, references = simple_stack_references
    net = NNXStack(whole)
    nnx.update(net, nnx.State(NNXStack.layout(params, whole)))

    @nnx.jit
    def step(net, x, y):
        return nnx.grad(lambda net: step_loss(net(x), y))(net)

    online = total([nnx.to_pure_dict(step(net, xs[t], ys[t])) for t in range(T)])
    assert relative_error(online, NNXStack.layout(references[not whole], whole)) <= 1e-10
    bptt_error = relative_error(online, NNXStack.layout(references[False], whole))
    assert bptt_error <= 1e-10 if whole else bptt_error > 1e-4  # the cross-layer paths matter here
