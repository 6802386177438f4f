"""The transformer rules (LayerNorm, softmax, products) against slow dense references, and by hand.

Each reference builds the map a rule linearises as an explicit dense matrix or tensor per sample, in float64,
with loops over groups and terms; nothing is shared with lrpcli's implementation. The engine runs the rule
through ``lrpcli.attribute`` on a one-module model.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

DT = torch.float64
ATOL = 1e-8
SEEDS = (0, 1, 2)

pytestmark = pytest.mark.usefixtures('one_thread')


def s_eps(den: torch.Tensor, eps: float) -> torch.Tensor:
    return den + eps * torch.where(den >= 0, 1.0, -1.0).to(den.dtype)


def attribute(model: nn.Module, x: torch.Tensor, upper: torch.Tensor, composite) -> torch.Tensor:
    import lrpcli

    return lrpcli.attribute(model, x.clone(), target=upper.clone(), composite=composite)


def layer_map(types, rule):
    from lrpcli.engine.composites import LayerMap

    return LayerMap([(types, rule)])


# ----------------------------------------------------------------------------------------------------------
# LayerNorm family: reference


def _labels(kind: str, shape: tuple[int, ...], module: nn.Module) -> tuple[list[int], list[int]]:
    """For each element of one sample (flattened): its normalisation group and its affine-parameter index."""
    numel = math.prod(shape)
    groups, params = [], []
    for e in range(numel):
        idx = []
        rest = e
        for size in reversed(shape):
            idx.append(rest % size)
            rest //= size
        idx = idx[::-1]
        if kind in ('layernorm', 'rmsnorm'):
            k = len(module.normalized_shape)
            lead, tail = idx[:-k], idx[-k:]
            groups.append(sum(i * math.prod(shape[j + 1:-k]) for j, i in enumerate(lead)) if lead else 0)
            params.append(sum(i * math.prod(shape[len(lead) + j + 1:]) for j, i in enumerate(tail)))
        elif kind == 'layernorm2d':  # over channels: one group per spatial position
            groups.append(e % math.prod(shape[1:]))
            params.append(idx[0])
        else:  # groupnorm
            groups.append(idx[0] // (shape[0] // module.num_groups))
            params.append(idx[0])
    return groups, params


def reference_layernorm(kind: str, module: nn.Module, x: torch.Tensor, upper: torch.Tensor, eps: float,
                        zero_bias: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """R = x * J^T (R / s(z)), J = diag(w / sigma) (I - G): G averages over the element's group (none for RMS)."""
    shape = tuple(x.shape[1:])
    groups, params = _labels(kind, shape, module)
    n = len(groups)
    w = module.weight.detach().reshape(-1) if module.weight is not None else torch.ones(n, dtype=DT)
    bias = getattr(module, 'bias', None)
    b = bias.detach().reshape(-1) if bias is not None else torch.zeros(n, dtype=DT)
    norm_eps = module.eps if module.eps is not None else torch.finfo(DT).eps
    rows, dens = [], []
    for s in range(x.shape[0]):
        xv = x[s].reshape(-1)
        members = {g: [e for e in range(n) if groups[e] == g] for g in set(groups)}
        sigma = torch.zeros(n, dtype=DT)
        G = torch.zeros(n, n, dtype=DT)
        for els in members.values():
            vals = xv[els]
            if kind == 'rmsnorm':
                var = (vals * vals).mean()
            else:
                var = ((vals - vals.mean()) ** 2).mean()
                for i in els:
                    for j in els:
                        G[i, j] = 1.0 / len(els)
            sigma[els] = torch.sqrt(var + norm_eps)
        wv = torch.stack([w[params[e]] for e in range(n)])
        bv = torch.stack([b[params[e]] for e in range(n)])
        J = torch.diag(wv / sigma) @ (torch.eye(n, dtype=DT) - G)
        z = J @ xv + (0 if zero_bias else bv)
        r = xv * (J.T @ (upper[s].reshape(-1) / s_eps(z, eps)))
        rows.append(r.reshape(shape))
        dens.append(z)
    return torch.stack(rows), dens


def _layernorm2d(c: int) -> nn.Module:
    from torchvision.models.convnext import LayerNorm2d

    return LayerNorm2d(c)


NORM_CASES = [  # (id, kind, factory, per-sample input shape)
    ('layernorm', 'layernorm', lambda: nn.LayerNorm(5), (3, 5)),
    ('layernorm_2d_shape', 'layernorm', lambda: nn.LayerNorm((2, 3)), (2, 2, 3)),
    ('layernorm_noaffine', 'layernorm', lambda: nn.LayerNorm(4, elementwise_affine=False), (3, 4)),
    ('layernorm_nobias', 'layernorm', lambda: nn.LayerNorm(4, bias=False), (2, 4)),
    ('layernorm2d', 'layernorm2d', lambda: _layernorm2d(3), (3, 2, 2)),
    ('groupnorm', 'groupnorm', lambda: nn.GroupNorm(2, 4), (4, 2, 2)),
    ('groupnorm_1group', 'groupnorm', lambda: nn.GroupNorm(1, 3), (3, 3)),
    ('rmsnorm', 'rmsnorm', lambda: nn.RMSNorm(4), (3, 4)),
    ('rmsnorm_eps', 'rmsnorm', lambda: nn.RMSNorm(4, eps=0.1), (2, 4)),
]


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(100 + seed)
    module = module.to(DT)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT) * 0.8 + (1.0 if p.dim() else 0.0))
    return module


def _data(fn, ref_fn, in_shape, seed, positive_upper=False):
    g = torch.Generator().manual_seed(seed)
    for _ in range(30):
        x = torch.randn((2, *in_shape), generator=g, dtype=DT)
        with torch.no_grad():
            out = fn(x)
        upper = torch.randn(out.shape, generator=g, dtype=DT)
        if positive_upper:
            upper = upper.abs()
        ref, dens = ref_fn(x, upper)
        if min(d.abs().min().item() for d in dens) > 1e-3:
            return x, upper, ref
    raise AssertionError('could not draw well-conditioned data')


@pytest.mark.parametrize('zero_bias', [False, True], ids=['bias', 'zb'])
@pytest.mark.parametrize('eps', [1e-6, 0.25])
@pytest.mark.parametrize('case_id,kind,factory,in_shape', NORM_CASES, ids=[c[0] for c in NORM_CASES])
def test_layernorm_rule_matches_reference(case_id, kind, factory, in_shape, eps, zero_bias):
    from lrpcli.engine.rules import LayerNormRule, Stabilizer

    for seed in SEEDS:
        module = _randomise(factory(), seed)
        rule = LayerNormRule(Stabilizer(eps), zero_params=['bias'] if zero_bias else [])
        x, upper, ref = _data(module, lambda x_, r_, m=module: reference_layernorm(kind, m, x_, r_, eps, zero_bias),
                              in_shape, seed)
        got = attribute(nn.Sequential(module), x, upper, layer_map(type(module), rule))
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0, msg=lambda m, s=seed: f'seed {s}: {m}')


def test_layernorm_reference_matches_layer_output():
    """Self-check: the reference's linearised map plus bias reproduces every layer's output."""
    for case_id, kind, factory, in_shape in NORM_CASES:
        module = _randomise(factory(), 0)
        x = torch.randn((2, *in_shape), dtype=DT, generator=torch.Generator().manual_seed(9))
        _, dens = reference_layernorm(kind, module, x, torch.ones_like(x), 0.0, zero_bias=False)
        torch.testing.assert_close(torch.stack(dens).reshape(x.shape), module(x).detach(), atol=1e-12, rtol=0,
                                   msg=lambda m, c=case_id: f'{c}: {m}')


class _FunctionalLayerNorm(nn.Module):
    def __init__(self, ln: nn.LayerNorm) -> None:
        super().__init__()
        from lrpcli.engine.functional_modules import LayerNormFn

        self.ln = ln
        self.fn = LayerNormFn(ln.normalized_shape, ln.eps)

    def forward(self, x):
        return self.fn(x, self.ln.weight, self.ln.bias)


def test_layernorm_fn_module_matches_reference():
    """``LayerNormFn`` (what the functional canonizer makes of F.layer_norm) takes weight and bias as inputs."""
    from lrpcli.engine.functional_modules import LayerNormFn
    from lrpcli.engine.rules import LayerNormRule

    for seed in SEEDS:
        ln = _randomise(nn.LayerNorm(4), seed)
        model = _FunctionalLayerNorm(ln)
        x, upper, ref = _data(model, lambda x_, r_, ln=ln: reference_layernorm('layernorm', ln, x_, r_, 1e-6, False),
                              (3, 4), seed)
        got = attribute(model, x, upper, layer_map(LayerNormFn, LayerNormRule()))
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_layernorm_hand_computed():
    """x = (0, 0, 3): mean 1, centred (-1, -1, 2), variance 2, sigma sqrt(2); y = (-1, -1, 2) / sqrt(2).
    R_out = (1, 0, 1): R / y = (-sqrt(2), 0, sqrt(2)/2); divided by sigma: a = (-1, 0, 1/2); mean(a) = -1/6;
    a - mean(a) = (-5/6, 1/6, 2/3); times x: R_in = (0, 0, 2), which sums to sum(R_out) = 2.
    A weight w scales y and the ratio inversely: the same R_in for w = (2, 2, 2)."""
    from lrpcli.engine.rules import LayerNormRule

    x = torch.tensor([[0.0, 0.0, 3.0]], dtype=DT)
    upper = torch.tensor([[1.0, 0.0, 1.0]], dtype=DT)
    for w in (1.0, 2.0):
        ln = nn.LayerNorm(3, eps=0.0).to(DT)
        with torch.no_grad():
            ln.weight.fill_(w)
        got = attribute(nn.Sequential(ln), x, upper, layer_map(nn.LayerNorm, LayerNormRule(1e-12)))
        torch.testing.assert_close(got, torch.tensor([[0.0, 0.0, 2.0]], dtype=DT), atol=1e-10, rtol=0)


def test_layernorm_rule_refuses_other_modules():
    from lrpcli.engine.rules import LayerNormRule

    with pytest.raises(ValueError, match="LayerNormRule applies to LayerNorm.*'0' is Linear"):
        attribute(nn.Sequential(nn.Linear(2, 2).to(DT)), torch.ones(1, 2, dtype=DT), torch.ones(1, 2, dtype=DT),
                  layer_map(nn.Linear, LayerNormRule()))


# ----------------------------------------------------------------------------------------------------------
# softmax


def reference_softmax(x: torch.Tensor, upper: torch.Tensor, dim: int, eps: float):
    """Per sample, per softmax row: the dense Jacobian J (from autograd) and R = x * J^T (R / s(s))."""
    out = torch.zeros_like(x)
    dens = []
    xm, um = x.movedim(dim, -1), upper.movedim(dim, -1)
    om = out.movedim(dim, -1)
    for idx in itertools.product(*(range(k) for k in xm.shape[:-1])):
        row = xm[idx]
        J = torch.autograd.functional.jacobian(lambda v: torch.softmax(v, 0), row)  # J[j, i] = ds_j / dx_i
        s = torch.softmax(row, 0)
        v = um[idx] / s_eps(s, eps)
        grad = J.T @ v
        om[idx] = torch.where(torch.isfinite(row), row * grad, torch.zeros_like(row))
        dens.append(s)
    return out, dens


@pytest.mark.parametrize('eps', [1e-6, 0.25])
@pytest.mark.parametrize('dim,in_shape', [(-1, (3, 4)), (1, (4, 2)), (2, (2, 3, 2))], ids=['last', 'dim1', 'dim2'])
def test_softmax_rule_matches_reference(dim, in_shape, eps):
    from lrpcli.engine.rules import SoftmaxRule

    for seed in SEEDS:
        module = nn.Softmax(dim=dim)
        x, upper, ref = _data(module, lambda x_, r_: reference_softmax(x_, r_, dim, eps), in_shape, seed)
        got = attribute(nn.Sequential(module), x, upper, layer_map(nn.Softmax, SoftmaxRule(eps)))
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_softmax_hand_computed():
    """x = (2, 2 + ln 3): s = (1/4, 3/4). With eps -> 0, R_i = x_i (R_i - s_i sum_j R_j).
    R_out = (1, 1): R_i - s_i * 2 = (1/2, -1/2), R_in = (1, -(2 + ln 3)/2) = (1, -1.5493061443);
    R_out = (4, 0): R_i - s_i * 4 = (3, -3), R_in = (6, -3 (2 + ln 3)) = (6, -9.2958368660).
    Not conservative: the softmax's Taylor "bias" is absorbed."""
    from lrpcli.engine.rules import SoftmaxRule

    x = torch.tensor([[2.0, 2.0 + math.log(3.0)]], dtype=DT)
    for upper, want in (([1.0, 1.0], [1.0, -1.5493061443340549]), ([4.0, 0.0], [6.0, -9.295836866004329])):
        got = attribute(nn.Sequential(nn.Softmax(-1)), x, torch.tensor([upper], dtype=DT),
                        layer_map(nn.Softmax, SoftmaxRule(1e-12)))
        torch.testing.assert_close(got, torch.tensor([want], dtype=DT), atol=1e-10, rtol=0)


def test_softmax_masked_scores_get_no_relevance():
    """A score of -inf (a masked position) has s = 0 and gets 0, not NaN; the others as without it."""
    from lrpcli.engine.rules import SoftmaxRule

    x = torch.tensor([[1.0, float('-inf'), 0.5]], dtype=DT)
    upper = torch.tensor([[1.0, 0.0, 2.0]], dtype=DT)
    got = attribute(nn.Sequential(nn.Softmax(-1)), x, upper, layer_map(nn.Softmax, SoftmaxRule(1e-12)))
    ref, _ = reference_softmax(x[:, [0, 2]], upper[:, [0, 2]], -1, 1e-12)
    assert got[0, 1].item() == 0.0
    torch.testing.assert_close(got[:, [0, 2]], ref, atol=1e-10, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# products of two activations


def reference_bilinear(fn, a: torch.Tensor, b: torch.Tensor, upper: torch.Tensor, eps: float, constant: int | None):
    """out_o = sum_pq C[o, p, q] a_p b_q with C[o, p, q] = fn(e_p, e_q)_o (per sample, dense). Each term
    T = C a_p b_q carries T R_o / s(out_o); the uniform rule gives each factor half of its terms' relevance,
    ``constant`` = 0 or 1 gives all of it to the other factor."""
    ra, rb, dens = torch.zeros_like(a), torch.zeros_like(b), []
    P, Q = a[0].numel(), b[0].numel()
    for s in range(a.shape[0]):
        ea = torch.eye(P, dtype=DT).reshape(P, *a.shape[1:])
        eb = torch.eye(Q, dtype=DT).reshape(Q, *b.shape[1:])
        C = torch.stack([torch.stack([fn(ea[p:p + 1], eb[q:q + 1]).reshape(-1) for q in range(Q)], -1)
                         for p in range(P)], -2)  # (O, P, Q)
        av, bv = a[s].reshape(-1), b[s].reshape(-1)
        T = C * av[None, :, None] * bv[None, None, :]
        out = T.sum((1, 2))
        q = upper[s].reshape(-1) / s_eps(out, eps)
        share_a = {None: 0.5, 0: 0.0, 1: 1.0}[constant]
        ra[s] = (share_a * (T * q[:, None, None]).sum((0, 2))).reshape(a.shape[1:])
        rb[s] = ((1 - share_a) * (T * q[:, None, None]).sum((0, 1))).reshape(b.shape[1:])
        dens.append(out)
    return ra, rb, dens


class _Split(nn.Module):
    """Feeds the two halves of a flat input (reshaped) to a two-operand module."""

    def __init__(self, module: nn.Module, shape_a, shape_b) -> None:
        super().__init__()
        self.module, self.shape_a, self.shape_b = module, shape_a, shape_b

    def forward(self, x):
        p = math.prod(self.shape_a)
        return self.module(x[:, :p].reshape(-1, *self.shape_a), x[:, p:].reshape(-1, *self.shape_b))


def _product_cases():
    from lrpcli.engine.functional_modules import AttentionProduct, MatMul, Product

    return [  # (id, module, fn for the reference, shape a, shape b)
        ('mul', Product(), lambda a, b: a * b, (2, 3), (2, 3)),
        ('mul_broadcast', Product(), lambda a, b: a * b, (2, 3), (2, 1)),
        ('matmul', MatMul(), torch.matmul, (2, 2, 3), (2, 3, 2)),
        ('matmul_scaled', MatMul(scale=0.5), lambda a, b: 0.5 * torch.matmul(a, b), (2, 3), (3, 2)),
        ('bmm', MatMul(torch.bmm), torch.bmm, (2, 3), (3, 2)),
        ('einsum', MatMul(torch.einsum, 'hqd,hkd->hqk'), lambda a, b: torch.einsum('nhqd,nhkd->nhqk', a, b),
         (2, 2, 3), (2, 2, 3)),
        ('attention', AttentionProduct(torch.matmul, constant_index=0), torch.matmul, (2, 3), (3, 2)),
    ]


@pytest.mark.parametrize('eps', [1e-6, 0.25])
@pytest.mark.parametrize('rule_id', ['product', 'constant_0', 'constant_1', 'constant_own'])
@pytest.mark.parametrize('case', range(7), ids=['mul', 'mul_broadcast', 'matmul', 'matmul_scaled', 'bmm', 'einsum',
                                                 'attention'])
def test_product_rules_match_reference(case, rule_id, eps):
    from lrpcli.engine.rules import ConstantOperand, Product

    case_id, module, fn, shape_a, shape_b = _product_cases()[case]
    if rule_id == 'constant_own' and case_id != 'attention':
        pytest.skip('only an AttentionProduct names its constant operand')
    if case_id == 'einsum':
        module.equation = 'nhqd,nhkd->nhqk'
    rule = {'product': lambda: Product(eps), 'constant_0': lambda: ConstantOperand(0, eps),
            'constant_1': lambda: ConstantOperand(1, eps), 'constant_own': lambda: ConstantOperand(-1, eps)}[rule_id]()
    constant = {'product': None, 'constant_0': 0, 'constant_1': 1, 'constant_own': 0}[rule_id]
    model = _Split(module, shape_a, shape_b)
    p = math.prod(shape_a)

    def ref_fn(x_, r_):
        a, b = x_[:, :p].reshape(-1, *shape_a), x_[:, p:].reshape(-1, *shape_b)
        ra, rb, dens = reference_bilinear(fn, a, b, r_, eps, constant)
        return torch.cat([ra.flatten(1), rb.flatten(1)], 1), dens

    for seed in SEEDS:
        x, upper, ref = _data(model, ref_fn, (p + math.prod(shape_b),), seed)
        got = attribute(model, x, upper, layer_map(type(module), rule))
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0, msg=lambda m, s=seed: f'seed {s}: {m}')


def test_product_hand_computed():
    """a = (2, -3), b = (4, 0.5): a * b = (8, -1.5). R_out = (1, 1): each factor gets half of each output's
    relevance, a b R / (a b) / 2 = (0.5, 0.5) for a and for b. A = [[1, 2]], B = [[3], [4]]: A B = 11 with the
    terms 1*3 = 3 and 2*4 = 8; R_out = 11: R_A = (3, 8) * 11 / 11 / 2 = (1.5, 4) and R_B = (1.5, 4)."""
    from lrpcli.engine.functional_modules import MatMul, Product
    from lrpcli.engine.rules import Product as ProductRule

    model = _Split(Product(), (2,), (2,))
    got = attribute(model, torch.tensor([[2.0, -3.0, 4.0, 0.5]], dtype=DT), torch.tensor([[1.0, 1.0]], dtype=DT),
                    layer_map(Product, ProductRule(1e-12)))
    torch.testing.assert_close(got, torch.tensor([[0.5, 0.5, 0.5, 0.5]], dtype=DT), atol=1e-10, rtol=0)
    model = _Split(MatMul(), (1, 2), (2, 1))
    got = attribute(model, torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=DT), torch.tensor([[[11.0]]], dtype=DT),
                    layer_map(MatMul, ProductRule(1e-12)))
    torch.testing.assert_close(got, torch.tensor([[1.5, 4.0, 1.5, 4.0]], dtype=DT), atol=1e-10, rtol=0)


def test_gate_passes_all_relevance_to_the_gated_signal():
    """x * sigmoid(g) through ``Gate``: Pass gives x all of R (the gate is a constant); ConstantOperand(1) is
    the same up to its stabilizer, by the Epsilon rule on x -> x * gate."""
    import lrpcli
    from lrpcli.engine.rules import ConstantOperand, Pass

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = lrpcli.Gate()

        def forward(self, x):
            return self.gate(x[:, :3], torch.sigmoid(x[:, 3:]))

    x = torch.tensor([[1.0, -2.0, 0.5, 0.3, -1.0, 2.0]], dtype=DT)
    upper = torch.tensor([[0.2, -0.7, 1.5]], dtype=DT)
    want = torch.cat([upper, torch.zeros(1, 3, dtype=DT)], 1)
    for rule in (Pass(), ConstantOperand(1, 1e-12)):
        got = attribute(Gated(), x, upper, layer_map(lrpcli.Gate, rule))
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def test_rules_by_name():
    from lrpcli.engine.rules import ConstantOperand, LayerNormRule, Product, SoftmaxRule, make

    assert make('layernorm') == LayerNormRule()
    assert make('layer_norm', zero_params=['bias']) == LayerNormRule(zero_params=['bias'])
    assert make('softmax') == SoftmaxRule()
    assert make('product', stabilizer=0.5) == Product(0.5)
    assert make('constant_operand', constant=1) == ConstantOperand(1)
    with pytest.raises(ValueError, match="ConstantOperand: constant must be >= -1, got -2"):
        make('constant_operand', constant=-2)


def test_layernorm_fn_is_not_sliced_over_the_batch(monkeypatch):
    """Large relevance is processed in batch slices; LayerNormFn's weight and bias inputs have no batch dimension
    (here as long as the batch), so it is not sliced: the result equals the unsliced one."""
    import lrpcli.engine.layercall
    from lrpcli.engine.functional_modules import LayerNormFn
    from lrpcli.engine.rules import LayerNormRule

    ln = _randomise(nn.LayerNorm(4), 0)
    model = _FunctionalLayerNorm(ln)
    x = torch.randn(4, 3, 4, dtype=DT)
    upper = torch.randn(4, 3, 4, dtype=DT)
    want = attribute(model, x, upper, layer_map(LayerNormFn, LayerNormRule()))
    monkeypatch.setattr(lrpcli.engine.layercall, 'CHUNK_BYTES', 64)
    got = attribute(model, x, upper, layer_map(LayerNormFn, LayerNormRule()))
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
