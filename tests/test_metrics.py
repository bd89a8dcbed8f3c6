"""gradwatch.measure.norms: the fused squared norms, whichever way a NormPlan groups the tensors."""

import pytest
import torch

from gradwatch.measure.norms import NormPlan, segment_sum, squared_norms


def _reference(tensors):
    return torch.tensor([float(t.double().pow(2).sum()) for t in tensors], dtype=torch.float64)


def _mixed():
    """Shapes that stack (many small ones of a shape), loose ones (large, few of a shape, empty, 0-d) and dtypes."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(30):
        out.append(torch.randn(8, 3, generator=g))  # a stack of 10
        if i % 3 == 0:
            out.append(torch.randn(5, generator=g).double())  # a float64 stack
        if i % 5 == 0:
            out.append(torch.randn(300, 300, generator=g))  # too large to stack
        if i % 7 == 0:
            out.append(torch.randn(4, generator=g).to(torch.bfloat16))  # too few of its shape and dtype
    out += [torch.zeros(0, 3), torch.tensor(2.0), torch.tensor(3.0), torch.tensor(4.0), torch.tensor(5.0)]
    return out


def test_plan_matches_per_tensor_norms_in_input_order():
    tensors = _mixed()
    plan = NormPlan(tensors)
    assert plan.stacks and plan.loose  # both paths are exercised
    got = plan.squared(tensors)
    assert got.dtype == torch.float32 and got.shape == (len(tensors),)
    torch.testing.assert_close(got.double(), _reference(tensors), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(squared_norms(tensors), got)


def test_plan_serves_the_next_call_with_new_values():
    tensors = _mixed()
    plan = NormPlan(tensors)
    plan.squared(tensors)
    other = [t * 2 for t in tensors]
    torch.testing.assert_close(plan.squared(other).double(), _reference(other), rtol=1e-5, atol=1e-6)


def test_squared_change_is_the_norm_of_the_update_and_leaves_tensors_alone():
    tensors = _mixed()
    plan = NormPlan(tensors)
    for round_ in range(2):  # the second round reuses the kept snapshot buffers
        before = [t.clone() for t in tensors]
        torch.testing.assert_close(plan.squared(tensors, snapshot=True).double(), _reference(before), rtol=1e-5,
                                   atol=1e-6)
        steps = [torch.full_like(t, 0.5 + round_) if t.numel() else t.clone() for t in tensors]
        for t, d in zip(tensors, steps):
            t.add_(d)
        after = [t.clone() for t in tensors]
        change = [a.double() - b.double() for a, b in zip(after, before)]
        got, want = plan.squared_change(tensors).double(), _reference(change)
        low = torch.tensor([t.dtype == torch.bfloat16 for t in tensors])  # the change itself rounds to bf16
        torch.testing.assert_close(got[~low], want[~low], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[low], want[low], rtol=2e-2, atol=1e-3)
        for t, a in zip(tensors, after):
            assert torch.equal(t, a)  # only our snapshot was written
        assert not all(torch.equal(b, a) for b, a in zip(before, after))


def test_plan_rejects_tensors_it_was_not_made_for():
    plan = NormPlan([torch.ones(3, 3) for _ in range(6)])
    with pytest.raises(RuntimeError):
        plan.squared([torch.ones(3, 3) for _ in range(5)] + [torch.ones(4, 4)])
    with pytest.raises(RuntimeError):
        NormPlan([torch.ones(2)]).squared_change([torch.ones(2)])  # no snapshot


def test_plan_works_on_parameters_without_touching_autograd():
    lin = torch.nn.Linear(3, 3)
    plan = NormPlan(list(lin.parameters()))
    out = plan.squared(list(lin.parameters()))
    assert not out.requires_grad


def test_segment_sum_propagates_nan_and_inf_to_its_bin():
    out = segment_sum([1.0, float("nan"), 2.0, float("inf"), 3.0], [0, 1, 1, 2, 0], 4)
    assert out[0] == 4.0 and out[1] != out[1] and out[2] == float("inf") and out[3] == 0.0


def test_groups_over_the_memory_cap_keep_no_buffers_and_give_the_same_values(monkeypatch):
    from gradwatch.measure import norms as metrics

    tensors = _mixed()
    kept = NormPlan(tensors)
    monkeypatch.setattr(metrics, "_KEEP_MAX_BYTES", 0)
    fresh = NormPlan(tensors)
    assert all(g.keep for g in kept.stacks + kept.loose) and not any(g.keep for g in fresh.stacks + fresh.loose)
    for _ in range(2):
        torch.testing.assert_close(fresh.squared(tensors, snapshot=True), kept.squared(tensors, snapshot=True))
        for t in tensors:
            t.mul_(1.5)
        torch.testing.assert_close(fresh.squared_change(tensors), kept.squared_change(tensors))
