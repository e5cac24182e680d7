import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradcheck import check_vjp, run_op

rng = np.random.default_rng(0)
T = torch.from_numpy


def case(shape, ignore=None):
    scores = rng.standard_normal(shape)
    labels = rng.integers(0, shape[1], (shape[0],) + shape[2:])
    if ignore is not None:
        labels.flat[::3] = ignore
    return scores, labels


@pytest.mark.parametrize("shape", [(5, 4), (3, 4, 2, 3)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ignore", [None, -100, 1])
def test_softmax_cross_entropy(shape, reduction, weighted, ignore):
    scores, labels = case(shape, ignore)
    weights = rng.random(shape[1]) + 0.2 if weighted else None
    attrs = {"reduction": reduction} | ({} if ignore is None else {"ignore_index": ignore})
    inputs = [scores, labels] + ([weights] if weighted else [])
    check_vjp("SoftmaxCrossEntropyLoss", inputs, attrs, wrt=[0])
    check_vjp("SoftmaxCrossEntropyLoss", inputs, attrs, wrt=[0], n_outputs=2)  # error at log_prob too
    loss, log_prob = run_op("SoftmaxCrossEntropyLoss", inputs, attrs, n_outputs=2)
    ref = F.cross_entropy(
        T(scores),
        T(labels),
        weight=None if weights is None else T(weights),
        reduction=reduction,
        ignore_index=-100 if ignore is None else ignore,
    )
    np.testing.assert_allclose(loss, ref.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(log_prob, F.log_softmax(T(scores), dim=1).numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(5, 4), (3, 4, 2, 3)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ignore", [None, 2])
def test_negative_log_likelihood(shape, reduction, weighted, ignore):
    x, labels = case(shape, ignore)
    weights = rng.random(shape[1]) + 0.2 if weighted else None
    attrs = {"reduction": reduction} | ({} if ignore is None else {"ignore_index": ignore})
    inputs = [x, labels] + ([weights] if weighted else [])
    check_vjp("NegativeLogLikelihoodLoss", inputs, attrs, wrt=[0])
    ref = F.nll_loss(
        T(x),
        T(labels),
        weight=None if weights is None else T(weights),
        reduction=reduction,
        ignore_index=-100 if ignore is None else ignore,
    )
    np.testing.assert_allclose(
        run_op("NegativeLogLikelihoodLoss", inputs, attrs)[0], ref.numpy(), rtol=1e-12, atol=1e-12
    )


def test_weighted_mean_divides_by_weights_of_kept_targets():
    scores, labels = rng.standard_normal((4, 3)), np.array([0, 1, 2, 1])
    weights = np.array([1.0, 2.0, 3.0])
    loss = run_op("SoftmaxCrossEntropyLoss", [scores, labels, weights], {"ignore_index": 2})[0]
    logp = scores - np.log(np.exp(scores).sum(1, keepdims=True))
    per = -logp[np.arange(4), labels] * weights[labels]
    np.testing.assert_allclose(loss, (per[[0, 1, 3]]).sum() / (1 + 2 + 2))


def test_loss_float32_int32_labels_and_errors():
    scores = rng.standard_normal((6, 5)).astype(np.float32)
    labels = rng.integers(0, 5, 6).astype(np.int32)
    loss, logp = run_op("SoftmaxCrossEntropyLoss", [scores, labels], {}, n_outputs=2)
    assert loss.dtype == logp.dtype == np.float32 and loss.shape == ()
    assert run_op("NegativeLogLikelihoodLoss", [scores, labels], {"reduction": "none"})[0].dtype == np.float32
    with pytest.raises(Exception, match="labels must lie"):
        run_op("SoftmaxCrossEntropyLoss", [scores, np.full(6, 5)], {})
    with pytest.raises(Exception, match="reduction"):
        run_op("NegativeLogLikelihoodLoss", [scores, labels], {"reduction": "avg"})
