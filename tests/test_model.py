"""The network: shapes, recurrence, shared attention, gradients, and the original's key names."""
import pytest
import torch

from cc_attention import CrissCrossAttention
from libs.norm import inplace_abn_available
from networks import BACKBONES, NonLocalBlock, build_model


def output_size(size: int) -> int:
    """Output stride 8 as the original computes it: stride-2 conv, ceil-mode max-pool, stride-2 conv."""
    after_conv1 = (size - 1) // 2 + 1
    after_pool = after_conv1 // 2 + 1
    return (after_pool - 1) // 2 + 1


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(backbone="tiny", norm="bn").eval()


@pytest.fixture(scope="module")
def meta_resnet101():
    """The full network on the meta device: shapes only, no memory, no compute."""
    with torch.device("meta"):
        return build_model(norm="bn")


@pytest.mark.parametrize("size, logits_size", [((769, 769), (97, 97)), ((129, 129), (17, 17)), ((97, 131), (13, 17)),
                                               ((65, 33), (9, 5)), ((1024, 2048), (129, 257))])
def test_resnet101_output_shapes_on_meta(meta_resnet101, size, logits_size):
    main, aux = meta_resnet101(torch.empty(2, 3, *size, device="meta"))
    assert main.shape == aux.shape == (2, 19, *logits_size)


def test_output_stride_formula_covers_many_sizes():
    with torch.device("meta"):
        model = build_model(backbone="tiny", norm="bn")
        for size in range(17, 41):  # every residue modulo 8, three times
            main, _ = model(torch.empty(1, 3, size, size + 3))
            assert main.shape[-2:] == (output_size(size), output_size(size + 3)), size


@pytest.mark.parametrize("size", [(129, 129), (97, 131), (33, 50)])
def test_tiny_real_forward_shapes(tiny_model, size):
    with torch.no_grad():
        (main,) = tiny_model(torch.randn(1, 3, *size))
    assert main.shape == (1, 19, output_size(size[0]), output_size(size[1]))
    assert torch.isfinite(main).all()


def test_769_gives_97(tiny_model):
    with torch.no_grad():
        (main,) = tiny_model(torch.randn(1, 3, 769, 769))
    assert main.shape[-2:] == (97, 97)


def test_eval_mode_skips_the_dsn_head_and_keeps_the_main_logits():
    """Training mode: [main, aux]; eval mode: [main] without running the auxiliary head, same main logits."""
    torch.manual_seed(0)
    model = build_model(backbone="tiny", norm="bn")
    calls = []
    model.dsn.register_forward_hook(lambda module, args, output: calls.append(output.shape))
    x = torch.randn(2, 3, 65, 97)
    with torch.no_grad():
        outputs = model.train()(x)
        assert len(outputs) == 2 and len(calls) == 1 and outputs[1].shape == outputs[0].shape
        model.eval()
        outputs = model(x)
        c3, c4 = model.forward_features(x)
        main, aux = model.head(c4), model.dsn(c3)  # what eval mode computed before (both heads)
    assert len(calls) == 2  # the call just above, not the eval-mode forward
    assert len(outputs) == 1 and torch.equal(outputs[0], main) and aux.shape == main.shape


@pytest.mark.parametrize("name", ["nonlocal", "baseline"])
def test_comparison_heads(name):
    model = build_model(name, backbone="tiny", num_classes=5, norm="bn").train()
    with torch.no_grad():
        main, aux = model(torch.randn(2, 3, 65, 97))
    assert main.shape == aux.shape == (2, 5, 9, 13)
    assert not any(isinstance(m, CrissCrossAttention) for m in model.modules())


def test_non_local_block_starts_as_identity():
    block = NonLocalBlock(16)
    x = torch.randn(2, 16, 5, 7)
    torch.testing.assert_close(block(x), x)


def test_single_shared_attention_module_and_recurrence(tiny_model):
    attention = [m for m in tiny_model.modules() if isinstance(m, CrissCrossAttention)]
    assert attention == [tiny_model.head.cca]
    assert tiny_model.head.recurrence == 2  # the paper's R, the default

    head = tiny_model.head
    with torch.no_grad():
        head.cca.gamma.fill_(0.5)
        features = torch.randn(1, BACKBONES["tiny"].layer4_channels, 9, 11)
        outputs = {}
        for recurrence in (0, 1, 2):
            head.recurrence = recurrence
            outputs[recurrence] = head(features)
        head.recurrence = 2
        manual = head.bottleneck(torch.cat([features, head.convb(head.cca(head.cca(head.conva(features))))], 1))
        head.cca.gamma.zero_()
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-4)
    assert not torch.allclose(outputs[1], outputs[2], atol=1e-4)
    torch.testing.assert_close(outputs[2], manual)


def test_gamma_zero_makes_recurrence_irrelevant(tiny_model):
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        tiny_model.head.recurrence = 0
        without = tiny_model(x)[0]
        tiny_model.head.recurrence = 2
        with_attention = tiny_model(x)[0]
    torch.testing.assert_close(without, with_attention)


def test_gradients_reach_gamma_and_attention_convolutions():
    torch.manual_seed(0)
    model = build_model(backbone="tiny", norm="bn").train()
    x = torch.randn(2, 3, 41, 41)
    main, aux = model(x)
    (main.square().mean() + aux.square().mean()).backward()
    cca = model.head.cca
    assert cca.gamma.grad is not None and cca.gamma.grad.abs().item() > 0
    # With gamma = 0 the projections get no gradient yet; once gamma moves they do.
    model.zero_grad()
    with torch.no_grad():
        cca.gamma.fill_(0.1)
    main, aux = model(x)
    (main.square().mean() + aux.square().mean()).backward()
    for conv in (cca.query_conv, cca.key_conv, cca.value_conv):
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum().item() > 0
    assert model.conv1.weight.grad.abs().sum().item() > 0  # the whole backbone is trained


@pytest.mark.extra("inplace_abn")
def test_inplace_abn_model_matches_bn_model_in_training():
    """Same weights, train mode (same dropout masks): same logits and gradients with either norm."""
    torch.manual_seed(0)
    bn = build_model(backbone="tiny", norm="bn").train()
    iabn = build_model(backbone="tiny", norm="inplace_abn").train()
    iabn.load_state_dict(bn.state_dict())
    with torch.no_grad():
        for model in (bn, iabn):
            model.head.cca.gamma.fill_(0.3)
    x = torch.randn(2, 3, 65, 65)
    results = []
    for model in (bn, iabn):
        torch.manual_seed(1)
        main, aux = model(x)
        (main.square().mean() + 0.4 * aux.square().mean()).backward()
        results.append((main.detach(), model.conv1.weight.grad, model.head.cca.value_conv.weight.grad))
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, atol=2e-3, rtol=2e-3)


def test_state_dict_keys_do_not_depend_on_norm():
    kinds = ["bn", "syncbn"] + (["inplace_abn"] if inplace_abn_available() else [])
    keys = {kind: list(build_model(backbone="tiny", norm=kind).state_dict()) for kind in kinds}
    assert all(value == keys["bn"] for value in keys.values())


def expected_resnet101_keys(num_classes: int = 19):
    """The original's state-dict keys and shapes, written out from its description (not from our modules)."""
    shapes = {}

    def norm(prefix, channels):
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (channels,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    shapes["conv1.weight"] = (64, 3, 3, 3)
    norm("bn1", 64)
    shapes["conv2.weight"] = (64, 64, 3, 3)
    norm("bn2", 64)
    shapes["conv3.weight"] = (128, 64, 3, 3)
    norm("bn3", 128)
    inplanes = 128
    for layer, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 23, 3)), start=1):
        for block in range(blocks):
            prefix = f"layer{layer}.{block}"
            shapes[f"{prefix}.conv1.weight"] = (planes, inplanes, 1, 1)
            norm(f"{prefix}.bn1", planes)
            shapes[f"{prefix}.conv2.weight"] = (planes, planes, 3, 3)
            norm(f"{prefix}.bn2", planes)
            shapes[f"{prefix}.conv3.weight"] = (planes * 4, planes, 1, 1)
            norm(f"{prefix}.bn3", planes * 4)
            if block == 0:
                shapes[f"{prefix}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                norm(f"{prefix}.downsample.1", planes * 4)
            inplanes = planes * 4
    shapes["head.conva.0.weight"] = (512, 2048, 3, 3)
    norm("head.conva.1", 512)
    shapes.update({
        "head.cca.query_conv.weight": (64, 512, 1, 1), "head.cca.query_conv.bias": (64,),
        "head.cca.key_conv.weight": (64, 512, 1, 1), "head.cca.key_conv.bias": (64,),
        "head.cca.value_conv.weight": (512, 512, 1, 1), "head.cca.value_conv.bias": (512,),
        "head.cca.gamma": (1,),
    })
    shapes["head.convb.0.weight"] = (512, 512, 3, 3)
    norm("head.convb.1", 512)
    shapes["head.bottleneck.0.weight"] = (512, 2560, 3, 3)
    norm("head.bottleneck.1", 512)
    shapes["head.bottleneck.3.weight"] = (num_classes, 512, 1, 1)
    shapes["head.bottleneck.3.bias"] = (num_classes,)
    shapes["dsn.0.weight"] = (512, 1024, 3, 3)
    shapes["dsn.0.bias"] = (512,)
    norm("dsn.1", 512)
    shapes["dsn.3.weight"] = (num_classes, 512, 1, 1)
    shapes["dsn.3.bias"] = (num_classes,)
    return shapes


def test_resnet101_state_dict_matches_the_original_names_and_shapes(meta_resnet101):
    model = meta_resnet101
    got = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    expected = expected_resnet101_keys()
    assert set(got) - set(expected) == set() and set(expected) - set(got) == set()
    assert got == expected
    # Dilations of the original: layer3 2, layer4 4 (multi_grid (1, 1, 1)), strides only in the stem and layer2.
    assert model.layer3[0].conv2.dilation == (2, 2) and model.layer4[2].conv2.dilation == (4, 4)
    assert model.layer2[0].conv2.stride == (2, 2) and model.layer3[0].conv2.stride == (1, 1)
    assert model.maxpool.ceil_mode


def test_resnet50_depth_and_multi_grid():
    with torch.device("meta"):
        model = build_model(backbone="resnet50", norm="bn", multi_grid=(1, 2, 4))
    assert [len(layer) for layer in (model.layer1, model.layer2, model.layer3, model.layer4)] == [3, 4, 6, 3]
    assert [block.conv2.dilation[0] for block in model.layer4] == [4, 8, 16]


def test_build_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="model name"):
        build_model("pspnet", backbone="tiny")
    with pytest.raises(ValueError, match="backbone"):
        build_model(backbone="resnet18")
    with pytest.raises(ValueError, match="recurrence"):
        build_model(backbone="tiny", recurrence=-1)
    with pytest.raises(ValueError, match="norm"):
        build_model(backbone="tiny", norm="layernorm")
