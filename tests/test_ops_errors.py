"""Bad input gets a ValueError that names the argument."""

import pytest
import torch

import dmpo_fast


def _lin(n=4, h=3, v=7):
    return torch.randn(n, h), torch.randn(v, h), torch.randint(0, v, (n,)), torch.rand(n)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.update(hidden=a["hidden"][0]), "hidden"),
        (lambda a: a.update(weight=torch.randn(7, 5)), "weight"),
        (lambda a: a.update(weight=a["weight"].double()), "weight dtype"),
        (lambda a: a.update(targets=a["targets"].float()), "targets"),
        (lambda a: a.update(targets=torch.tensor([0, 1, 2, 7])), "targets"),
        (lambda a: a.update(targets=torch.tensor([0, 1, 2])), "targets"),
        (lambda a: a.update(token_weights=torch.rand(5)), "token_weights"),
        (lambda a: a.update(token_weights=torch.ones(4, dtype=torch.long)), "token_weights"),
        (lambda a: a.update(impl="cuda"), "impl"),
        (lambda a: a.update(hidden=[1.0]), "hidden"),
    ],
)
def test_weighted_linear_ce_errors(mutate, match):
    h, w, t, tw = _lin()
    args = dict(hidden=h, weight=w, targets=t, token_weights=tw, impl="chunked")
    mutate(args)
    with pytest.raises(ValueError, match=match):
        dmpo_fast.weighted_linear_ce(**args)


def test_triton_impl_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    h, w, t, _ = _lin()
    with pytest.raises(ValueError, match="impl='triton'"):
        dmpo_fast.linear_logprob(h, w, t, impl="triton")


def test_native_impl_unavailable_is_a_clear_error():
    # linear_logprob has a native backend now; forward_mask (no vocabulary-sized work) has none.
    ids, maskable = torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="impl='native'"):
        dmpo_fast.forward_mask(ids, maskable, mask_id=9, replicates=2, seed=0, impl="native")


def test_wdce_errors():
    R, L, H, V = 2, 3, 4, 5
    ok = dict(
        hidden=torch.randn(R, L, H),
        head_weight=torch.randn(V, H),
        targets=torch.zeros(R, L, dtype=torch.long),
        loss_mask=torch.ones(R, L, dtype=torch.bool),
        row_weights=torch.ones(R),
    )
    dmpo_fast.wdce_loss(**ok)
    for name, bad in [
        ("hidden", torch.randn(R, L)),
        ("head_weight", torch.randn(V, H + 1)),
        ("targets", torch.zeros(R, L + 1, dtype=torch.long)),
        ("loss_mask", torch.ones(R, L)),
        ("row_weights", torch.ones(R + 1)),
    ]:
        with pytest.raises(ValueError, match=name):
            dmpo_fast.wdce_loss(**{**ok, name: bad})
    with pytest.raises(ValueError, match="R = 0"):
        dmpo_fast.wdce_loss(**{**ok, "hidden": torch.randn(0, L, H), "targets": torch.zeros(0, L, dtype=torch.long),
                               "loss_mask": torch.ones(0, L, dtype=torch.bool), "row_weights": torch.ones(0)})


def test_forward_mask_errors():
    ids = torch.zeros(2, 5, dtype=torch.long)
    m = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="replicates must be even"):
        dmpo_fast.forward_mask(ids, m, mask_id=3, replicates=3)
    dmpo_fast.forward_mask(ids, m, mask_id=3, replicates=3, antithetic=False)
    with pytest.raises(ValueError, match="replicates"):
        dmpo_fast.forward_mask(ids, m, mask_id=3, replicates=0)
    with pytest.raises(ValueError, match="maskable"):
        dmpo_fast.forward_mask(ids, m.long(), mask_id=3, replicates=2)
    with pytest.raises(ValueError, match="maskable"):
        dmpo_fast.forward_mask(ids, m[:, :4], mask_id=3, replicates=2)
    with pytest.raises(ValueError, match="ids"):
        dmpo_fast.forward_mask(torch.zeros(0, 5, dtype=torch.long), m[:0], mask_id=3, replicates=2)
    with pytest.raises(ValueError, match="ids"):
        dmpo_fast.forward_mask(ids.float(), m, mask_id=3, replicates=2)
    with pytest.raises(ValueError, match="mask_id"):
        dmpo_fast.forward_mask(ids, m, mask_id=-1, replicates=2)
    with pytest.raises(ValueError, match="rate_min"):
        dmpo_fast.forward_mask(ids, m, mask_id=3, replicates=2, rate_min=0.5, rate_max=0.5)
    with pytest.raises(ValueError, match="seed"):
        dmpo_fast.forward_mask(ids, m, mask_id=3, replicates=2, seed=-4)


def test_importance_weights_errors():
    r = torch.rand(8)
    with pytest.raises(ValueError, match="group_size"):
        dmpo_fast.importance_weights(r, None, group_size=3, alpha=0.0)
    with pytest.raises(ValueError, match="group_size"):
        dmpo_fast.importance_weights(r, None, group_size=0, alpha=0.0)
    with pytest.raises(ValueError, match="rewards must be non-empty"):
        dmpo_fast.importance_weights(torch.rand(0), None, group_size=1, alpha=0.0)
    with pytest.raises(ValueError, match="log_ratio is required"):
        dmpo_fast.importance_weights(r, None, group_size=4, alpha=0.1)
    with pytest.raises(ValueError, match="log_ratio"):
        dmpo_fast.importance_weights(r, torch.rand(7), group_size=4, alpha=0.1)
    with pytest.raises(ValueError, match="baseline"):
        dmpo_fast.importance_weights(r, None, group_size=4, alpha=0.0, baseline="mean")
    with pytest.raises(ValueError, match="alpha"):
        dmpo_fast.importance_weights(r, None, group_size=4, alpha=-1.0)
    with pytest.raises(ValueError, match="ess_target"):
        dmpo_fast.importance_weights(r, None, group_size=4, alpha=0.0, ess_target=1.5)
    with pytest.raises(ValueError, match="centering_strength"):
        dmpo_fast.importance_weights(r, None, group_size=4, alpha=0.0, centering_strength=2.0)
    with pytest.raises(ValueError, match="coeff"):
        dmpo_fast.importance_weights(r, None, group_size=4, alpha=0.0, coeff=0.0)
    with pytest.raises(ValueError, match="rewards"):
        dmpo_fast.importance_weights(r.long(), None, group_size=4, alpha=0.0)
