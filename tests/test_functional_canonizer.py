"""The ``functional`` (torch.fx) and ``attention`` canonizers: what they route, what they report, that the model
computes the same and is left as it was."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrpcli
from lrpcli.engine.composites import get
from lrpcli.engine.hooks import sessions_of

DT = torch.float64

pytestmark = pytest.mark.usefixtures('one_thread')


class Block(nn.Module):
    """Every functional operation the canonizer routes, once."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 12)
        self.gate_fc = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.full((4,), 0.5))
        self.pos = nn.Parameter(torch.randn(3, 4))
        self.norm_w = nn.Parameter(torch.ones(4))
        self.norm_b = nn.Parameter(torch.zeros(4))

    def forward(self, x):  # x: (N, 3, 4)
        x = F.max_pool1d(x, 1) + self.pos                      # max pool, embedding sum
        q, k, v = self.fc(x).chunk(3, dim=-1)                  # routing
        attn = (q @ k.transpose(-2, -1) / 2.0).softmax(-1)     # matmul, scaled (div), softmax
        h = torch.matmul(F.dropout(attn, 0.0, False), v)       # attention product
        h = F.gelu(h) * torch.sigmoid(self.gate_fc(x))         # gelu, sigmoid, gate
        h = h * self.scale + x                                 # scaled (layer scale), sum
        h = F.layer_norm(h, (4,), self.norm_w, self.norm_b, 1e-5)  # layer_norm
        return (h * h).mean(1)                                 # product, reduce


def _notes(model, canonizers, x):
    comp = get('attn_lrp')
    with comp.context(model, canonizers=canonizers) as m:
        out = m(x)
        notes = list(sessions_of(m)[0].notes)
        names = {type(mod).__name__ for mod in m.modules()}
    return out, notes, names


EMBEDDINGS = ("functional: parameters that are terms of the signal take relevance as the input does (the "
              "embeddings' share, not a loss): ")


def test_block_is_routed_and_computes_the_same():
    torch.manual_seed(0)
    model = Block().to(DT).eval()
    x = torch.randn(2, 3, 4, dtype=DT)
    want = model(x)
    forward_before = model.forward
    out, notes, names = _notes(model, ['functional'], x)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    assert notes == ['functional: routed through modules: scaled x2, max_pool x1, embedding x1, matmul x1, '
                     'softmax x1, attention_product x1, gelu x1, sigmoid x1, gate x1, sum x1, layer_norm x1, '
                     'product x1, reduce x1', EMBEDDINGS + 'pos']
    assert {'EmbeddingSum', 'MatMul', 'AttentionProduct', 'Softmax', 'GELU', 'Gate', 'Scaled', 'LayerNormFn',
            'Product', 'Reduce', 'Sum', 'MaxPool1d'} <= names
    assert model.forward == forward_before and not any(n.startswith('lrpcli') for n, _ in model.named_modules())


def test_block_has_a_rule_for_everything():
    """attn_lrp with the functional canonizer: no module is left without a rule, relevance is finite."""
    torch.manual_seed(0)
    model = Block().to(DT).eval()
    x = torch.randn(2, 3, 4, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        rel = lrpcli.attribute(model, x, target=1, composite='attn_lrp', canonizers=['functional'])
    assert rel.shape == x.shape and torch.isfinite(rel).all() and rel.abs().sum() > 0


def test_operations_without_a_module_are_named():
    class Odd(nn.Module):
        def forward(self, x):
            return torch.exp(x) + x.cumsum(1)

    _, notes, _ = _notes(Odd(), ['functional'], torch.randn(2, 3, dtype=DT))
    assert notes == ['functional: routed through modules: sum x1',
                     'functional: left on the plain gradient: exp x1, cumsum x1']


class Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace it; its child can be."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = Block()

    def forward(self, x):
        if x.sum() > 0:
            return self.inner(x)
        return self.inner(-x)


def test_untraceable_model_is_canonized_child_by_child_and_named():
    torch.manual_seed(0)
    model = Untraceable().to(DT).eval()
    inner = model.inner
    x = torch.randn(2, 3, 4, dtype=DT)
    want = model(x)
    out, notes, names = _notes(model, ['functional'], x)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    assert 'Gate' in names and 'AttentionProduct' in names
    assert notes[-2].startswith('functional: torch.fx cannot trace Untraceable at <model> (')
    assert notes[-2].endswith('): the functional operations in their forward are not seen and pass the plain '
                              'gradient')
    assert model.inner is inner  # put back on exit


def test_layernorm2d_stays_a_module_and_inlined_modules_are_named():
    from torchvision.models.convnext import CNBlock

    torch.manual_seed(0)
    block = CNBlock(8, layer_scale=0.5, stochastic_depth_prob=0.0).to(DT).eval()
    x = torch.randn(1, 8, 4, 4, dtype=DT)
    out, notes, names = _notes(block, ['functional'], x)
    torch.testing.assert_close(out, block(x), atol=0, rtol=0)
    assert notes == ['functional: routed through modules: scaled x1, sum x1',
                     'functional: inlined by torch.fx (their operations are routed above): Permute x2']
    assert 'LayerNorm' in names and 'StochasticDepth' in names


def test_multihead_attention_is_decomposed_and_restored():
    torch.manual_seed(0)

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.mha(x, x, x, need_weights=False)[0].mean(1))

    model = Attn().to(DT).eval()
    mha = model.mha
    keys = list(model.state_dict())
    x = torch.randn(2, 5, 8, dtype=DT)
    out, notes, names = _notes(model, ['attention'], x)
    torch.testing.assert_close(out, model(x), atol=1e-14, rtol=0)
    assert notes == ["attention: MultiheadAttention x1 run as explicit q/k/v projections, score product, "
                     'softmax and weights-times-values product']
    assert {'ExplicitMultiheadAttention', '_Projection', 'MatMul', 'AttentionProduct', 'Softmax'} <= names
    assert model.mha is mha and list(model.state_dict()) == keys
    # the projections use the original parameters: relevance and its gradient reach them
    rel = lrpcli.attribute(model, x.requires_grad_(), target=0, composite='cp_lrp', canonizers=['transformer'],
                           create_graph=True)
    (grad,) = torch.autograd.grad(rel.sum(), mha.in_proj_weight)
    assert grad.abs().sum() > 0


def test_multihead_attention_with_bias_kv_is_reported():
    model = nn.Sequential()
    model.add_module('mha', nn.MultiheadAttention(4, 1, add_bias_kv=True))
    session = get('cp_lrp').context(model, canonizers=['attention'])
    with session:
        assert isinstance(model.mha, nn.MultiheadAttention)
    assert session.notes == ['attention: mha not decomposed (add_bias_kv is not supported); its attention runs on '
                             'the plain gradient']


def test_untraceable_model_names_the_operations_it_could_not_see():
    """The operations the untraceable forward computes itself (not in a module) are counted in the first forward:
    Untraceable negates its input (``neg``) when the sum is not positive, and compares the sum (``gt``)."""
    torch.manual_seed(0)
    model = Untraceable().to(DT).eval()
    x = -torch.ones(2, 3, 4, dtype=DT, requires_grad=True)
    comp = get('attn_lrp')
    session = comp.context(model, canonizers=['functional'])
    with session as m:
        m(x)
        m(x)  # counted once
    assert session.notes[-1] == 'functional: Untraceable at <model> (not traced) computes outside its modules: ' \
                                'sum x1, gt x1, neg x1'


@pytest.mark.parametrize('mask', ['none', 'bool', 'float', 'causal'])
def test_scaled_dot_product_attention_is_explicit(mask):
    """F.scaled_dot_product_attention becomes DotProductAttention: the same output, and cp_lrp conserves
    (bias-free projections; all relevance through the values)."""
    torch.manual_seed(0)

    class Sdpa(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 24, bias=False)
            self.out = nn.Linear(8, 3, bias=False)

        def forward(self, x):
            q, k, v = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 2, 4).permute(2, 0, 3, 1, 4)
            if mask == 'bool':
                h = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(5, 5, dtype=torch.bool).triu())
            elif mask == 'float':
                h = F.scaled_dot_product_attention(q, k, v, torch.linspace(-1, 1, 25, dtype=DT).view(5, 5))
            else:
                h = F.scaled_dot_product_attention(q, k, v, is_causal=mask == 'causal', scale=0.3)
            return self.out(h.transpose(1, 2).reshape(x.shape[0], x.shape[1], 8).mean(1))

    model = Sdpa().to(DT).eval()
    x = torch.randn(2, 5, 8, dtype=DT)
    out, notes, names = _notes(model, ['functional'], x)
    torch.testing.assert_close(out, model(x), atol=1e-14, rtol=0)
    assert 'DotProductAttention' in names and notes[0].endswith('attention x1, reduce x1')
    rel = lrpcli.attribute(model, x, target=1, composite='cp_lrp', canonizers=['functional'], epsilon=1e-12,
                           stabilizer=1e-12)
    torch.testing.assert_close(rel.flatten(1).sum(1), model(x)[:, 1], atol=0, rtol=1e-8)


def test_position_bias_on_attention_logits_is_a_constant():
    """scores + bias (a parameter) that goes into a softmax becomes an AttentionBias (the bias absorbs its share),
    while activation + parameter elsewhere becomes an EmbeddingSum; swapaxes is routing."""

    class BiasedAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.randn(3, 4))
            self.bias = nn.Parameter(torch.randn(3, 3))

        def forward(self, x):
            x = x + self.pos
            scores = torch.matmul(x, x.swapaxes(-2, -1)) + self.bias
            return torch.matmul(scores.softmax(-1), x)

    _, notes, names = _notes(BiasedAttention().to(DT), ['functional'], torch.randn(2, 3, 4, dtype=DT))
    assert notes == ['functional: routed through modules: embedding x1, matmul x1, softmax x1, attention_product x1',
                     'functional: position biases of attention logits as AttentionBias (the bias absorbs its share '
                     "of relevance, as a layer's bias does): x1", EMBEDDINGS + 'pos']


def test_functional_inplace_relu_after_merged_batchnorm():
    """googlenet/inception_v3 write ``F.relu(bn(conv(x)), inplace=True)``: with the BatchNorm merged, the relu
    overwrote the convolution's output that Gamma reads. As an nn.ReLU module it no longer does."""

    class Basic(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, bias=False)
            self.bn = nn.BatchNorm2d(4, eps=0.001)
            self.head = nn.Conv2d(4, 2, 3)

        def forward(self, x):
            return self.head(F.relu(self.bn(self.conv(x)), inplace=True)).mean((2, 3))

    torch.manual_seed(0)
    model = Basic().eval()
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(RuntimeError, match="'conv' .* was modified in place"):
        lrpcli.attribute(model, x, 0, composite='epsilon_gamma_box', canonizers=['merge_batchnorm'])
    rel = lrpcli.attribute(model, x, 0, composite='epsilon_gamma_box', canonizers=['merge_batchnorm', 'functional'])
    assert rel.shape == x.shape and torch.isfinite(rel).all()


@pytest.mark.parametrize('builder,chosen', [
    ('resnet18', 'merge_batchnorm, functional'),
    ('vit', 'attention, functional'),
    ('convnext', 'functional'),
])
def test_auto_canonizer_chooses_what_the_model_needs(builder, chosen):
    """``auto`` looks at the model: BatchNorms -> merge_batchnorm, attention modules -> attention, then
    functional; the note names the choice, nothing is left without a rule, the output is unchanged."""
    import torchvision
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = {
        'resnet18': lambda: torchvision.models.resnet18(num_classes=4),
        'vit': lambda: VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=8,
                                         mlp_dim=16, num_classes=4),
        'convnext': lambda: ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=4),
    }[builder]().to(DT).eval()
    x = torch.randn(1, 3, 32, 32, dtype=DT)
    want = model(x)
    comp = get('attn_lrp')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        session = comp.context(model, canonizers=['auto'])
        with session as m:
            torch.testing.assert_close(m(x), want, atol=1e-12, rtol=0)
    assert session.notes[0] == f'auto: canonizers {chosen}'
    assert any(n.startswith('functional: routed through modules: ') for n in session.notes)
