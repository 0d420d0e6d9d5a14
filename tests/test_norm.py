"""Normalization layers: one factory, identical keys, BatchNorm fallback == InPlaceABN."""
import os

import pytest
import torch

from libs.norm import BatchNormAct, SyncBatchNormAct, inplace_abn_available, make_norm, resolve_norm_kind


def randomized(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give the affine parameters and running statistics non-trivial values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean"):
            getattr(module, name).copy_(torch.randn(module.num_features, generator=generator))
        module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return module


def test_factory_kinds_and_errors():
    assert make_norm("bn") is BatchNormAct
    assert make_norm("syncbn") is SyncBatchNormAct
    assert resolve_norm_kind("auto") == "bn"  # InPlaceABN only on request, installed or not
    assert resolve_norm_kind("inplace_abn") == "inplace_abn"
    with pytest.raises(ValueError, match="norm must be one of"):
        make_norm("groupnorm")
    with pytest.raises(ValueError, match="activation"):
        make_norm("bn")(8, activation="relu6")


@pytest.mark.parametrize("activation", ["identity", "leaky_relu"])
def test_batchnorm_act_eval_uses_inplace_abn_scale(activation):
    """Like InPlaceABN, the scale is |weight| + eps (randomized() makes some weights negative)."""
    norm = randomized(BatchNormAct(6, activation=activation)).eval()
    assert (norm.weight < 0).any()
    x = torch.randn(2, 6, 5, 7)
    scale = norm.weight.abs() + norm.eps
    expected = torch.nn.functional.batch_norm(x, norm.running_mean, norm.running_var, scale, norm.bias)
    if activation == "leaky_relu":
        expected = torch.nn.functional.leaky_relu(expected, 0.01)
    torch.testing.assert_close(norm(x.clone()), expected)


def test_syncbn_single_process_matches_bn():
    """Without torch.distributed, SyncBatchNormAct trains like BatchNormAct (CPU included)."""
    x = torch.randn(4, 6, 5, 5)
    sync, plain = SyncBatchNormAct(6, "leaky_relu"), BatchNormAct(6, "leaky_relu")
    torch.testing.assert_close(sync(x), plain(x))
    torch.testing.assert_close(sync.running_var, plain.running_var)


def test_all_kinds_share_state_dict_keys():
    kinds = ["bn", "syncbn"] + (["inplace_abn", "inplace_abn_sync"] if inplace_abn_available() else [])
    keys = {kind: list(make_norm(kind)(4, activation="leaky_relu").state_dict()) for kind in kinds}
    assert keys["bn"] == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert all(value == keys["bn"] for value in keys.values()), keys


@pytest.mark.extra("inplace_abn")
@pytest.mark.parametrize("activation", ["identity", "leaky_relu"])
def test_bn_fallback_matches_inplace_abn(activation):
    reference = randomized(make_norm("inplace_abn")(6, activation=activation))
    fallback = BatchNormAct(6, activation=activation)
    fallback.load_state_dict(reference.state_dict())
    x = torch.randn(3, 6, 9, 11) * 3 + 1

    reference.eval(), fallback.eval()
    torch.testing.assert_close(fallback(x.clone()), reference(x.clone()), atol=1e-4, rtol=1e-4)

    # Training: same output, same gradients, same running statistics (InPlaceABN's backward inverts in place).
    reference.train(), fallback.train()
    upstream = torch.randn_like(x)
    outputs, grads = [], []
    for module in (reference, fallback):
        inp = x.clone().requires_grad_()
        out = module(inp * 1.0)  # InPlaceABN overwrites its input: feed it a non-leaf
        out.backward(upstream)
        outputs.append(out.detach())
        grads.append((inp.grad, module.weight.grad, module.bias.grad))
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-4, rtol=1e-4)
    for got, expected in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(fallback.running_mean, reference.running_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fallback.running_var, reference.running_var, atol=1e-4, rtol=1e-4)


def _synchronized_step(rank: int, world_size: int, port: int, inputs, upstream, results) -> None:
    """One rank of test_syncbn_matches_bn_on_the_whole_batch: half the batch each, on its own GPU."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    torch.distributed.init_process_group("nccl", rank=rank, world_size=world_size)
    norm = randomized(SyncBatchNormAct(6, activation="leaky_relu")).cuda().train()
    share = inputs.chunk(world_size)[rank].cuda().requires_grad_()
    out = norm(share)
    out.backward(upstream.chunk(world_size)[rank].cuda())
    results[rank] = (out.detach().cpu(), share.grad.cpu(), norm.weight.grad.cpu(), norm.running_var.cpu())
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL)")
def test_syncbn_matches_bn_on_the_whole_batch():
    inputs, upstream = torch.randn(4, 6, 9, 11) * 2 + 1, torch.randn(4, 6, 9, 11)
    results = torch.multiprocessing.Manager().dict()
    torch.multiprocessing.spawn(_synchronized_step, args=(2, 29517, inputs, upstream, results), nprocs=2)

    reference = randomized(BatchNormAct(6, activation="leaky_relu")).train()
    x = inputs.clone().requires_grad_()
    out = reference(x)
    out.backward(upstream)
    torch.testing.assert_close(torch.cat([results[0][0], results[1][0]]), out.detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat([results[0][1], results[1][1]]), x.grad, atol=1e-4, rtol=1e-4)
    # Each rank holds its own share of the weight gradient (DDP sums them).
    torch.testing.assert_close(results[0][2] + results[1][2], reference.weight.grad, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(results[0][3], reference.running_var, atol=1e-4, rtol=1e-4)


def test_syncbn_refuses_cpu_tensors_when_synchronizing(monkeypatch):
    norm = SyncBatchNormAct(4)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.raises(ValueError, match="norm='bn'"):
        norm(torch.randn(2, 4, 3, 3))
