"""The category consistent loss (TPAMI CCNet): against a per-class loop written here, its edge cases, the model's
embedding output and how its projection loads."""
import pytest
import torch

from networks import build_model
from utils.checkpoint import load_model_weights
from utils.loss import CategoryConsistentLoss, CriterionDSN, nearest_labels

IGNORE = 255


def loop_ccl(embedding, labels, delta_v=0.5, delta_d=1.5, alpha=1.0, beta=1.0, gamma=0.001, ignore=IGNORE):
    """The paper's terms with Python loops over images, classes and pixels: (var, dis, reg, total)."""
    def phi_var(d):
        if d <= delta_v:
            return d * 0
        if d <= delta_d:
            return (d - delta_v) ** 2
        return d - delta_d + (delta_d - delta_v) ** 2

    per_image = []
    for image, label in zip(embedding, labels):
        classes = sorted({int(value) for value in label.flatten() if int(value) != ignore})
        if not classes:
            continue
        means, var = {}, 0
        for c in classes:
            ys, xs = (label == c).nonzero(as_tuple=True)
            vectors = [image[:, y, x] for y, x in zip(ys.tolist(), xs.tolist())]
            means[c] = sum(vectors) / len(vectors)
            var = var + sum(phi_var(torch.linalg.norm(means[c] - v)) for v in vectors) / len(vectors)
        dis = 0
        for a in classes:
            for b in classes:
                if a != b:
                    d = torch.linalg.norm(means[a] - means[b])
                    dis = dis + (torch.clamp(2 * delta_d - d, min=0)) ** 2
        if len(classes) > 1:
            dis = dis / (len(classes) * (len(classes) - 1))
        reg = sum(torch.linalg.norm(means[c]) for c in classes) / len(classes)
        per_image.append((var / len(classes), dis, reg))
    var, dis, reg = (sum(terms[i] for terms in per_image) / len(per_image) for i in range(3))
    return var, dis, reg, alpha * var + beta * dis + gamma * reg


def random_case(seed, n=3, dim=4, h=5, w=6, num_classes=4):
    generator = torch.Generator().manual_seed(seed)
    embedding = torch.randn(n, dim, h, w, generator=generator, dtype=torch.float64) * 1.5
    labels = torch.randint(0, num_classes, (n, h, w), generator=generator)
    labels[torch.rand(n, h, w, generator=generator) < 0.2] = IGNORE
    labels[1][labels[1] == 2] = 1  # class 2 absent from image 1
    return embedding, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_values_and_gradients_match_a_per_class_loop(seed):
    embedding, labels = random_case(seed)
    fast_input = embedding.clone().requires_grad_()
    loop_input = embedding.clone().requires_grad_()
    fast = CategoryConsistentLoss(alpha=0.7, beta=1.3, gamma=0.01)(fast_input, labels)
    slow = loop_ccl(loop_input, labels, alpha=0.7, beta=1.3, gamma=0.01)
    for got, expected in zip(fast, slow):
        assert got.dtype == torch.float32
        assert got.detach().item() == pytest.approx(float(expected), rel=1e-5, abs=1e-6)
    fast.total.backward()
    slow[3].backward()
    assert torch.allclose(fast_input.grad, loop_input.grad, rtol=1e-4, atol=1e-6)
    assert fast.var > 0 and fast.dis > 0 and fast.reg > 0  # the case exercises every term


def test_each_branch_of_phi_var_and_phi_dis():
    loss = CategoryConsistentLoss(delta_v=0.5, delta_d=1.5)
    distances = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.5, 3.0, 4.0])
    assert loss.phi_var(distances).tolist() == pytest.approx([0, 0, 0.25, 1.0, 2.0, 2.5, 3.5])
    assert loss.phi_dis(distances).tolist() == pytest.approx([9.0, 6.25, 4.0, 2.25, 0.25, 0.0, 0.0])


def test_one_class_has_no_distance_term():
    embedding = torch.randn(1, 3, 4, 4)
    terms = CategoryConsistentLoss()(embedding, torch.full((1, 4, 4), 2))
    assert terms.dis.item() == 0 and terms.var.item() > 0


def test_an_image_of_ignore_pixels_takes_no_part_in_the_mean():
    embedding, labels = random_case(3, n=2)
    with_void = torch.cat([embedding, torch.randn(1, *embedding.shape[1:], dtype=torch.float64)])
    void_labels = torch.cat([labels, torch.full((1, *labels.shape[1:]), IGNORE)])
    loss = CategoryConsistentLoss()
    assert loss(with_void, void_labels).total.item() == pytest.approx(loss(embedding, labels).total.item())


def test_only_ignore_pixels_give_zero_with_a_gradient_path():
    embedding = torch.randn(2, 3, 4, 4, requires_grad=True)
    terms = CategoryConsistentLoss()(embedding, torch.full((2, 4, 4), IGNORE))
    assert [term.item() for term in terms] == [0, 0, 0, 0]
    terms.total.backward()
    assert torch.count_nonzero(embedding.grad) == 0


def test_tight_clusters_further_apart_than_twice_delta_d_cost_nothing():
    # two classes: every pixel within delta_v of its mean, the means 4 > 2 * delta_d apart
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[:, :, 2:] = 1
    embedding = torch.zeros(1, 2, 4, 4)
    embedding[0, 0] = torch.where(labels[0] == 1, 2.0, -2.0)
    embedding[0, 1] = 0.1 * (-1) ** torch.arange(16).reshape(4, 4)  # +-0.1: each class's mean keeps 0
    terms = CategoryConsistentLoss(gamma=0.0)(embedding, labels)
    assert terms.var.item() == 0 and terms.dis.item() == 0 and terms.total.item() == 0
    embedding[0, 0] = torch.where(labels[0] == 1, 1.0, -1.0)  # now 2 < 2 * delta_d apart: (3 - 2)^2
    assert CategoryConsistentLoss(gamma=0.0)(embedding, labels).dis.item() == pytest.approx(1.0)


def test_one_pixel_class_has_a_finite_gradient():
    # a pixel that is its class's mean: distance 0, where a plain norm's gradient is NaN
    labels = torch.zeros(1, 3, 3, dtype=torch.long)
    labels[0, 0, 0] = 1
    embedding = torch.randn(1, 4, 3, 3, requires_grad=True)
    CategoryConsistentLoss().forward(embedding, labels).total.backward()
    assert torch.isfinite(embedding.grad).all()


def test_float32_under_bf16_autocast_and_labels_brought_to_the_feature_size():
    embedding, labels = random_case(4)
    big_labels = labels.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2)  # (N, 8h, 8w)
    assert torch.equal(nearest_labels(big_labels, labels.shape[-2:]), labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = CategoryConsistentLoss()(embedding.to(torch.bfloat16), big_labels)
    assert terms.total.dtype == torch.float32
    expected = CategoryConsistentLoss()(embedding.to(torch.bfloat16).float(), labels).total
    assert terms.total.item() == pytest.approx(expected.item(), rel=1e-6)


def test_bad_margins_and_weights_are_refused():
    with pytest.raises(ValueError, match="delta_v < delta_d"):
        CategoryConsistentLoss(delta_v=2.0, delta_d=1.5)
    with pytest.raises(ValueError, match=">= 0"):
        CategoryConsistentLoss(gamma=-1)


def tiny_model(embedding_dim=0):
    torch.manual_seed(0)
    return build_model("ccnet", "tiny", num_classes=5, recurrence=2, norm="bn", embedding_dim=embedding_dim)


def test_the_model_returns_its_embedding_in_training_only():
    model = tiny_model(embedding_dim=6)
    images = torch.randn(2, 3, 33, 41)
    outputs = model.eval()(images)
    assert len(outputs) == 1
    assert torch.equal(outputs[0], tiny_model(embedding_dim=0).eval()(images)[0])  # the same network otherwise
    main, aux, embedding = model.train()(images)
    assert embedding.shape == (2, 6, *main.shape[-2:]) and aux.shape == main.shape


def test_the_criterion_adds_the_weighted_ccl_terms():
    model = tiny_model(embedding_dim=4).train()
    images, labels = torch.randn(2, 3, 33, 41), torch.randint(0, 5, (2, 33, 41))
    preds = model(images)
    ccl = CategoryConsistentLoss(gamma=0.5)
    terms = CriterionDSN(IGNORE, ccl=ccl).terms(preds, labels)
    ccl_terms = ccl(preds[2], labels)
    assert terms["total"].item() == pytest.approx((terms["seg"] + 0.4 * terms["dsn"] + ccl_terms.total).item())
    assert terms["ccl_reg"].item() == pytest.approx(ccl_terms.reg.item())
    assert CriterionDSN(IGNORE)(preds, labels).item() == pytest.approx((terms["seg"] + 0.4 * terms["dsn"]).item())
    with pytest.raises(ValueError, match="embedding_dim"):
        CriterionDSN(IGNORE, ccl=ccl)(preds[:2], labels)


def test_a_released_format_checkpoint_loads_into_a_ccl_model_and_back():
    released = tiny_model().state_dict()  # the original's raw state dict: no projection
    ccl_model = tiny_model(embedding_dim=4)
    fresh_projection = ccl_model.ccl_projection.weight.clone()
    report = load_model_weights(ccl_model, dict(released), name="released.pth")
    assert report.not_loaded == ["ccl_projection.weight", "ccl_projection.bias"]
    assert torch.equal(ccl_model.ccl_projection.weight, fresh_projection)
    assert torch.equal(ccl_model.head.bottleneck[3].weight, released["head.bottleneck.3.weight"])
    # a --ccl 1 snapshot into the inference model (no projection): the projection is dropped, not an error
    plain = build_model("ccnet", "tiny", num_classes=5, norm="bn")
    report = load_model_weights(plain, {"model": ccl_model.state_dict()}, name="ccl.pth")
    assert report.skipped == ["ccl_projection.weight", "ccl_projection.bias"] and not report.unexpected
    images = torch.randn(1, 3, 33, 33)
    assert torch.equal(plain.eval()(images)[0], ccl_model.eval()(images)[0])
