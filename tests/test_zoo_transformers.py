"""Tiny torchvision transformers and ConvNeXt in float64 with biases zeroed: conservation at the input.

With CP-LRP every rule on the path is conservative (Epsilon and the LayerNorm rule without bias, Pass, Norm on
sums, constant attention weights), so the relevance at the input plus the relevance that reaches the class
token and the position embedding equals the output relevance. AttnLRP's softmax rule is not conservative; the
test measures that the whole deficit is the one its softmaxes make.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lrpcli.engine.composites import get

DT = torch.float64
TINY = 1e-12

pytestmark = pytest.mark.usefixtures('one_thread')


def _prepare(model: nn.Module, seed: int) -> nn.Module:
    """float64, eval, biases zero, weights of unit gain (so the activations stay far above the stabilizer)."""
    torch.manual_seed(seed)
    model = model.to(DT).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('bias'):
                p.zero_()
            elif 'layer_scale' in name:
                p.fill_(0.5)
            elif p.dim() == 2 and 'embedding' not in name:
                p.normal_(0, p.shape[1] ** -0.5)
    return model


def tiny_vit(seed: int = 0) -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                              num_classes=4)
    model = _prepare(model, seed)
    with torch.no_grad():
        model.class_token.normal_()
        model.encoder.pos_embedding.normal_(0, 0.5)
    return model


def tiny_convnext(seed: int = 0) -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(seed)
    return _prepare(ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=4), seed)


def _explain(model, x, composite, canonizers, params=()):
    """Relevance at x and at the parameters ``params`` (names), the output relevance, and the session notes."""
    comp = get(composite, epsilon=TINY, stabilizer=TINY, low=-6.0, high=6.0)
    tensors = [dict(model.named_parameters())[p] for p in params]
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # a module without a rule fails the test
        session = comp.context(model, canonizers=canonizers)
        with session as m:
            xi = x.clone().requires_grad_()
            out = m(xi)
            seed = torch.zeros_like(out)
            seed[:, 1] = out[:, 1].abs()
            grads = torch.autograd.grad(out, [xi] + tensors, seed)
    return grads[0], dict(zip(params, grads[1:])), seed.sum().item(), session.notes


def test_vit_cp_lrp_conserves_with_embedding_share():
    """Measured: (input + class token + position embedding) / output = 1 - 8.7e-12. In this random model the
    class token takes most of the relevance (0.95, the input 0.08, the position embedding -0.04): it must be
    counted, not lost."""
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32, dtype=DT, generator=torch.Generator().manual_seed(1))
    rx, rp, total, notes = _explain(model, x, 'cp_lrp', ['transformer'],
                                    ['class_token', 'encoder.pos_embedding'])
    embedding = rp['class_token'].sum().item() + rp['encoder.pos_embedding'].sum().item()
    assert abs((rx.sum().item() + embedding) / total - 1) < 1e-6
    assert abs(embedding) > 0.1 * total  # a real share: leaving it out would break conservation
    assert not any('left on the plain gradient' in n for n in notes)
    assert 'functional: routed through modules: sum x4, embedding x1' in notes
    assert ("functional: parameters that are terms of the signal take relevance as the input does (the embeddings' "
            "share, not a loss): class_token, encoder.pos_embedding") in notes


def test_vit_attn_lrp_deficit_is_the_softmax_rule(monkeypatch):
    """AttnLRP: everything but the softmax rule conserves; the total deficit (measured: -1.2 % of the output
    relevance) equals the softmaxes' own."""
    from lrpcli.engine.rules import softmax

    made: list[float] = []
    original = softmax.SoftmaxRule.relevance

    def counting(self, call, relevance):
        result = original(self, call, relevance)
        made.append(result[0].sum().item() - relevance.sum().item())
        return result

    monkeypatch.setattr(softmax.SoftmaxRule, 'relevance', counting)
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32, dtype=DT, generator=torch.Generator().manual_seed(1))
    rx, rp, total, _ = _explain(model, x, 'attn_lrp', ['transformer'], ['class_token', 'encoder.pos_embedding'])
    assert len(made) == 2  # one softmax per encoder layer
    at_input = rx.sum().item() + sum(r.sum().item() for r in rp.values())
    assert abs(at_input - total - sum(made)) < 1e-6 * total
    assert abs(sum(made)) > 1e-3 * total  # it is not conservative


def test_convnext_conserves():
    """Stem and downsampling LayerNorm2d, depthwise convolutions, layer scale, stochastic depth, residual sums:
    measured 1 - 1.4e-10 with cp_lrp and attn_lrp alike (no attention)."""
    model = tiny_convnext()
    x = torch.randn(2, 3, 32, 32, dtype=DT, generator=torch.Generator().manual_seed(1))
    for composite in ('cp_lrp', 'attn_lrp'):
        rx, _, total, notes = _explain(model, x, composite, ['functional'])
        assert abs(rx.sum().item() / total - 1) < 1e-6, composite
        assert notes == ['functional: routed through modules: scaled x2, sum x2',
                         'functional: inlined by torch.fx (their operations are routed above): Permute x4']


def test_vit_first_layer_rule_is_configurable():
    """ZBox on the patch embedding by default; an override (here Flat) replaces it."""
    import lrpcli
    from lrpcli.engine.rules import Flat, ZBox

    model = tiny_vit()
    x = torch.randn(1, 3, 32, 32, dtype=DT)
    for overrides, want in ((None, ZBox), ([('conv_proj', Flat())], Flat)):
        comp = get('attn_lrp', overrides=overrides)
        with comp.context(model, canonizers=['transformer']) as m:
            m(x)
            rule = lrpcli.hooks.sessions_of(m)[0].assignments[model.conv_proj].rule
        assert isinstance(rule, want)


def tiny_swin(v2: bool, seed: int = 0) -> nn.Module:
    """Two stages of two blocks: the second block of each stage shifts its windows (window 2 on 8x8 and 4x4)."""
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

    torch.manual_seed(seed)
    extra = {'block': SwinTransformerBlockV2, 'downsample_layer': PatchMergingV2} if v2 else {}
    model = SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[2, 2], num_heads=[2, 2], window_size=[2, 2],
                            num_classes=4, **extra)
    return _prepare(model, seed)


@pytest.mark.parametrize('v2', [False, True], ids=['swin', 'swin_v2'])
def test_swin_window_attention_is_explicit_and_conserves(v2):
    """The explicit window attention computes what torchvision's fused function does (shifted windows included);
    cp_lrp conserves (measured: 1 - 1.7e-10 for V1, 1 - 4e-10 for V2)."""
    model = tiny_swin(v2)
    x = torch.randn(2, 3, 32, 32, dtype=DT, generator=torch.Generator().manual_seed(1))
    want = model(x)
    with get('cp_lrp').context(model, canonizers=['transformer']) as m:
        torch.testing.assert_close(m(x), want, atol=1e-14, rtol=0)
    rx, _, total, notes = _explain(model, x, 'cp_lrp', ['transformer'])
    assert abs(rx.sum().item() / total - 1) < 1e-6
    name = 'ShiftedWindowAttentionV2' if v2 else 'ShiftedWindowAttention'
    assert notes == [f'attention: {name} x4 run as explicit q/k/v projections, score product, softmax and '
                     'weights-times-values product', 'functional: routed through modules: sum x8',
                     'functional: inlined by torch.fx (their operations are routed above): Permute x2']


def test_config_overrides_name_the_new_rules(tmp_path):
    """Config `rules` reach the transformer rules by name; composite-level zero_params reach LayerNormRule."""
    from lrpcli.engine.functional_modules import AttentionProduct
    from lrpcli.engine.rules import ConstantOperand, Flat, LayerNormRule, SoftmaxRule
    from lrpcli.explainer.build import composite_kwargs, load_config

    path = tmp_path / 'vit.yaml'
    path.write_text(
        'model: {name: vit_b_16}\ncanonizers: [transformer]\ncomposite:\n  name: attn_lrp\n  zero_params: [bias]\n'
        '  rules:\n    - {match: conv_proj, rule: flat}\n    - {type: LayerNorm, rule: layernorm}\n'
        '    - {type: Softmax, rule: softmax}\n'
        '    - {type: lrpcli.engine.functional_modules.AttentionProduct,'
        ' rule: {name: constant_operand, constant: 0}}\n')
    kwargs = composite_kwargs(load_config(path))
    assert kwargs['canonizers'] == ['transformer']
    assert kwargs['overrides'] == [('conv_proj', Flat(zero_params=['bias'])),
                                   (nn.LayerNorm, LayerNormRule(zero_params=['bias'])), (nn.Softmax, SoftmaxRule()),
                                   (AttentionProduct, ConstantOperand(0))]
    get('attn_lrp', **kwargs)  # builds


def test_swin_recorder_sees_samples_not_windows():
    """The explicit window attention keeps the batch first in every hooked module, so the per-sample table works
    (torchvision folds the windows into the batch dimension)."""
    from lrpcli.engine.recorder import Recorder

    model = tiny_swin(False)
    x = torch.randn(3, 3, 32, 32, dtype=DT)
    recorder = Recorder()
    with get('cp_lrp').context(model, canonizers=['transformer'], recorder=recorder) as m:
        xi = x.clone().requires_grad_()
        out = m(xi)
        torch.autograd.grad(out, xi, out)
    layers, _, r_in, r_out = recorder.table()
    assert r_in.shape == r_out.shape == (3, len(layers))
    assert 'features.1.1.attn.values' in layers and torch.isfinite(r_out).all()


def test_maxvit_conserves():
    """MaxViT: BatchNorms merged, squeeze-excitation gates, window and grid attention with relative position
    biases on the logits (constants), all through ``transformer``; cp_lrp measured 1 - 1.5e-8."""
    from torchvision.models.maxvit import MaxVit

    torch.manual_seed(0)
    model = _prepare(MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[8, 16],
                            block_layers=[1, 1], head_dim=4, stochastic_depth_prob=0.0, num_classes=4), 0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_var.uniform_(0.5, 2.0)  # mean 0: the merged layers keep a zero bias
    x = torch.randn(1, 3, 32, 32, dtype=DT, generator=torch.Generator().manual_seed(1))
    rx, _, total, notes = _explain(model, x, 'cp_lrp', ['transformer'])
    assert abs(rx.sum().item() / total - 1) < 1e-6
    assert notes[:2] == ['functional: routed through modules: sum x10, scaled x4, matmul x4, softmax x4, '
                         'attention_product x4, gate x2', 'functional: position biases of attention logits as '
                         "AttentionBias (the bias absorbs its share of relevance, as a layer's bias does): x4"]
    assert not any('left on the plain gradient' in n for n in notes)


def test_attention_bias_absorbs_its_share_by_hand():
    """AttentionBias (scores + position bias) is a Sum under Norm: R_scores = scores R / s(scores + bias); the
    detached bias keeps its share."""
    from lrpcli.engine.composites import LayerMap
    from lrpcli.engine.functional_modules import AttentionBias
    from lrpcli.engine.rules import Norm, Stabilizer

    eps = 1e-3
    scores = torch.tensor([[1.0, -2.0]], dtype=DT)
    bias = torch.tensor([[3.0, 1.0]], dtype=DT)
    r = torch.tensor([[0.4, 0.5]], dtype=DT)
    module = AttentionBias()
    with LayerMap([(AttentionBias, Norm(Stabilizer(eps)))]).context(module) as m:
        xi = scores.clone().requires_grad_()
        (got,) = torch.autograd.grad(m(xi, bias), xi, r)
    want = torch.tensor([[1.0 * 0.4 / (4.0 + eps), -2.0 * 0.5 / (-1.0 - eps)]], dtype=DT)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)


def test_swin_v2_attn_lrp_is_stable():
    """Swin V2's continuous position-bias MLP makes biases that dominate the cosine scores: handing their share of
    relevance to the scores multiplied it (measured on this tiny model: input / output relevance 12.4, and
    1e11 on a random swin_v2_t at 224 pixels); as AttentionBias they absorb it (measured 0.733; attn_lrp is not
    conservative) and the MLP gets no relevance (it is not in the relevance graph at all)."""
    model = tiny_swin(True)
    x = torch.randn(2, 3, 32, 32, dtype=DT, generator=torch.Generator().manual_seed(1))
    mlp = [p for n, p in model.named_parameters() if 'cpb_mlp' in n]
    with get('attn_lrp', epsilon=TINY, stabilizer=TINY).context(model, canonizers=['transformer']) as m:
        xi = x.clone().requires_grad_()
        out = m(xi)
        seed = torch.zeros_like(out)
        seed[:, 1] = out[:, 1].abs()
        rx, *rest = torch.autograd.grad(out, [xi] + mlp, seed, allow_unused=True)
    assert len(rest) == 12  # 4 blocks x (2 weights, 1 bias)
    assert torch.isfinite(rx).all() and all(g is None for g in rest)
    assert abs(rx.sum().item() / seed.sum().item() - 0.733) < 0.01
