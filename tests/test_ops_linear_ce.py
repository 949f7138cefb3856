"""linear_logprob / weighted_linear_ce / wdce_loss: eager and chunked against float64 truths."""

import pytest
import torch

import dmpo_fast
from dmpo_fast.ops import linear_ce
from dmpo_fast.ops.linear_ce import (
    CHUNK_ELEMENTS,
    CPU_CHUNK_ELEMENTS,
    chunk_rows,
    linear_logprob_ref,
    weighted_linear_ce_ref,
)
from dmpo_fast.ops.wdce import wdce_loss_ref
from dmpo_fast.profiling import peak_memory

SHAPES = [(1, 16, 64), (7, 37, 131), (23, 48, 97), (64, 5, 1009)]


def _inputs(n, h, v, dtype=torch.float64, peaked=False, zero_every=0):
    hidden = torch.randn(n, h, dtype=torch.float64) / h**0.25
    weight = torch.randn(v, h, dtype=torch.float64) / h**0.25
    targets = torch.randint(0, v, (n,))
    targets[0] = 0
    targets[-1] = v - 1
    if peaked:  # make the target logit of every row ~30 above the rest
        weight[targets] += 30.0 * hidden / hidden.norm(dim=1, keepdim=True) ** 2
    w = torch.randn(n, dtype=torch.float64)
    if zero_every:
        w[::zero_every] = 0.0
    return hidden.to(dtype), weight.to(dtype), targets, w


def _truth_and_grads(fn, hidden, weight, *rest):
    h = hidden.detach().double().requires_grad_()
    W = weight.detach().double().requires_grad_()
    out = fn(h, W, *rest)
    out.sum().backward()
    return out.detach(), h.grad, W.grad


@pytest.mark.parametrize("n,h,v", SHAPES)
@pytest.mark.parametrize("impl", ["eager", "chunked"])
def test_linear_logprob_matches_fp64(n, h, v, impl):
    hidden, weight, targets, _ = _inputs(n, h, v, torch.float32)
    g = torch.randn(n)
    h32 = hidden.clone().requires_grad_()
    W32 = weight.clone().requires_grad_()
    out = dmpo_fast.linear_logprob(h32, W32, targets, impl=impl, chunk_elements=3 * v)
    (out * g).sum().backward()
    hd, Wd = hidden.double().requires_grad_(), weight.double().requires_grad_()
    truth = linear_logprob_ref(hd, Wd, targets)
    (truth * g.double()).sum().backward()
    assert out.dtype == torch.float32 and out.shape == (n,)
    torch.testing.assert_close(out.double(), truth.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h32.grad.double(), hd.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(W32.grad.double(), Wd.grad, rtol=1e-4, atol=1e-5)


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("n,h,v", SHAPES)
@pytest.mark.parametrize("peaked", [False, True])
def test_weighted_linear_ce_matches_fp64(n, h, v, peaked):
    """Eager fp32 must be close to the fp64 truth; chunked fp32 no worse than 2x eager's error."""
    hidden, weight, targets, w = _inputs(n, h, v, torch.float32, peaked=peaked, zero_every=3)
    hd, Wd = hidden.double().requires_grad_(), weight.double().requires_grad_()
    truth = weighted_linear_ce_ref(hd, Wd, targets, w)
    truth.backward()
    errs = {}
    for impl in ("eager", "chunked"):
        h32 = hidden.clone().requires_grad_()
        W32 = weight.clone().requires_grad_()
        loss = dmpo_fast.weighted_linear_ce(h32, W32, targets, w.float(), impl=impl, chunk_elements=2 * v)
        loss.backward()
        assert loss.dim() == 0 and loss.dtype == torch.float32
        # Rows with weight 0 get exactly zero gradient.
        assert torch.all(h32.grad[w == 0] == 0)
        errs[impl] = [
            abs(loss.item() - truth.item()),
            _max_err(h32.grad, hd.grad),
            _max_err(W32.grad, Wd.grad),
        ]
    scale = [abs(truth.item()) + 1, hd.grad.abs().max().item() + 1, Wd.grad.abs().max().item() + 1]
    for e_eager, e_chunked, sc in zip(errs["eager"], errs["chunked"], scale):
        assert e_eager <= 1e-4 * sc, errs  # fp32 math is accurate here
        assert e_chunked <= 2 * e_eager + 1e-6 * sc, errs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_low_precision_no_worse_than_eager(dtype):
    """Judge low precision by eager's error in the same dtype against the fp64 truth (STYLE.md)."""
    hidden, weight, targets, w = _inputs(29, 40, 211, dtype, zero_every=4)
    truth = weighted_linear_ce_ref(hidden.double(), weight.double(), targets, w)
    errs = {}
    for impl in ("eager", "chunked"):
        h = hidden.clone().requires_grad_()
        W = weight.clone().requires_grad_()
        loss = dmpo_fast.weighted_linear_ce(h, W, targets, w.float(), impl=impl, chunk_elements=5 * 211)
        loss.backward()
        errs[impl] = (abs(loss.item() - truth.item()), h.grad.float(), W.grad.float())
    assert errs["chunked"][0] <= 2 * errs["eager"][0] + 1e-4
    # Both compute in fp32 from the same rounded inputs: gradients agree to fp32 accuracy, then round once.
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(errs["chunked"][1], errs["eager"][1], rtol=2 * eps, atol=2 * eps)
    torch.testing.assert_close(errs["chunked"][2], errs["eager"][2], rtol=2 * eps, atol=2 * eps)


@pytest.mark.parametrize("impl", ["eager", "chunked"])
def test_gradcheck_float64(impl):
    hidden, weight, targets, w = _inputs(11, 7, 29, zero_every=4)
    h, W = hidden.requires_grad_(), weight.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda h, W: dmpo_fast.linear_logprob(h, W, targets, impl=impl, chunk_elements=60), (h, W)
    )
    assert torch.autograd.gradcheck(
        lambda h, W: dmpo_fast.weighted_linear_ce(h, W, targets, w, impl=impl, chunk_elements=60), (h, W)
    )
    # The token weights get dL/dw_i = CE_i, zero-weight rows included.
    tw = w.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda tw: dmpo_fast.weighted_linear_ce(h, W, targets, tw, impl=impl, chunk_elements=60), (tw,)
    )


# --- vocabulary blocks (CPU): the chunk of logits is [rows, block], not [rows, V] ---


@pytest.mark.parametrize("block", [16, 40, 131])  # 131: V itself, one block
@pytest.mark.parametrize("need", ["both", "weight", "hidden"])
def test_vocab_blocks_match_fp64(monkeypatch, block, need):
    """Blocks of a vocabulary that is not a multiple of the block, several row chunks, peaked rows (the
    running max moves between blocks), zero-weight rows, targets in the first and the last column."""
    monkeypatch.setattr(linear_ce, "CPU_VOCAB_BLOCK", block)
    n, h, v = 23, 12, 131
    hidden, weight, targets, w = _inputs(n, h, v, torch.float32, peaked=True, zero_every=3)
    g = torch.randn(n)
    truth_lp, th_lp, tW_lp = _truth_and_grads(lambda a, b: linear_logprob_ref(a, b, targets) * g.double(),
                                              hidden, weight)  # fmt: skip
    truth_ce, th_ce, tW_ce = _truth_and_grads(lambda a, b: weighted_linear_ce_ref(a, b, targets, w),
                                              hidden, weight)  # fmt: skip
    for fn, truth, th, tW in (
        (lambda a, b: dmpo_fast.linear_logprob(a, b, targets, impl="chunked", chunk_elements=7 * block) * g,
         truth_lp, th_lp, tW_lp),
        (lambda a, b: dmpo_fast.weighted_linear_ce(a, b, targets, w.float(), impl="chunked",
                                                   chunk_elements=7 * block), truth_ce, th_ce, tW_ce),
    ):  # fmt: skip
        h32 = hidden.clone().requires_grad_(need in ("both", "hidden"))
        W32 = weight.clone().requires_grad_(need in ("both", "weight"))
        out = fn(h32, W32)
        out.sum().backward()
        torch.testing.assert_close(out.detach().double(), truth, rtol=1e-5, atol=1e-4)
        if h32.requires_grad:
            torch.testing.assert_close(h32.grad.double(), th, rtol=1e-4, atol=1e-5)
        if W32.requires_grad:
            torch.testing.assert_close(W32.grad.double(), tW, rtol=1e-4, atol=1e-5)


def test_vocab_blocks_gradcheck_float64(monkeypatch):
    monkeypatch.setattr(linear_ce, "CPU_VOCAB_BLOCK", 8)
    hidden, weight, targets, w = _inputs(11, 7, 29, zero_every=4)
    h, W = hidden.requires_grad_(), weight.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda h, W: dmpo_fast.linear_logprob(h, W, targets, impl="chunked", chunk_elements=40), (h, W)
    )
    assert torch.autograd.gradcheck(
        lambda h, W: dmpo_fast.weighted_linear_ce(h, W, targets, w, impl="chunked", chunk_elements=40), (h, W)
    )
    tw = w.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda tw: dmpo_fast.weighted_linear_ce(h, W, targets, tw, impl="chunked", chunk_elements=40), (tw,)
    )


def test_vocab_block_is_the_cpu_block_or_the_whole_vocabulary(monkeypatch):
    assert linear_ce.vocab_block(32000, "cpu") == linear_ce.CPU_VOCAB_BLOCK == 1024
    assert linear_ce.vocab_block(55, "cpu") == 55  # the default run's head: one block, one GEMM
    assert linear_ce.vocab_block(32000, "cuda") == linear_ce.vocab_block(32000) == 32000
    monkeypatch.setattr(linear_ce, "CPU_VOCAB_BLOCK", None)
    assert linear_ce.vocab_block(32000, "cpu") == 32000


def test_vocab_blocks_hold_one_block_of_logits_whatever_the_vocabulary(monkeypatch):
    """With blocks the peak is dW, dH and a [rows, block] buffer; whole rows hold [rows, V]."""
    n, H, V, block = 256, 16, 16384, 512
    hidden = torch.randn(n, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    targets, w = torch.randint(0, V, (n,)), torch.rand(n)
    peaks = {}
    for name, value in (("blocks", block), ("rows", None)):
        monkeypatch.setattr(linear_ce, "CPU_VOCAB_BLOCK", value)
        for op in ("ce", "logprob"):

            def step(op=op):
                if op == "ce":
                    dmpo_fast.weighted_linear_ce(hidden, weight, targets, w, impl="chunked").backward()
                else:
                    dmpo_fast.linear_logprob(hidden, weight, targets, impl="chunked").sum().backward()
                hidden.grad = weight.grad = None

            peaks[name, op] = peak_memory(step)[1]
    grads = (V * H + n * H) * 4  # dW and dH, fp32
    for op in ("ce", "logprob"):
        assert peaks["blocks", op] <= grads + 4 * n * block * 4, peaks
        # whole rows: a chunk of chunk_rows(V) rows x V (127 rows, 8.3 MB against the blocks' 0.5 MB)
        assert peaks["rows", op] >= grads + chunk_rows(V, device="cpu", hidden=H) * V * 4, peaks


def test_all_zero_weights_give_exact_zero():
    hidden, weight, targets, _ = _inputs(9, 8, 31, torch.float32)
    h, W = hidden.requires_grad_(), weight.requires_grad_()
    loss = dmpo_fast.weighted_linear_ce(h, W, targets, torch.zeros(9), impl="chunked")
    loss.backward()
    assert loss.item() == 0.0
    assert torch.all(h.grad == 0) and torch.all(W.grad == 0)


def test_no_grad_forward_equals_grad_forward():
    hidden, weight, targets, w = _inputs(13, 9, 53, torch.float32)
    with torch.no_grad():
        a = dmpo_fast.weighted_linear_ce(hidden, weight, targets, w.float(), impl="chunked")
    b = dmpo_fast.weighted_linear_ce(hidden.requires_grad_(), weight, targets, w.float(), impl="chunked")
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def _wdce_inputs(R, L, H, V, dtype=torch.float32):
    hidden = torch.randn(R, L, H, dtype=dtype)
    head = torch.randn(V, H, dtype=dtype) / H**0.5
    targets = torch.randint(0, V, (R, L))
    mask = torch.rand(R, L) < 0.4
    mask[0] = False  # a row with nothing masked
    mask[1, :3] = False  # prompt-like prefix never in the loss
    rw = torch.randn(R, dtype=torch.float64)
    rw[2] = 0.0
    return hidden, head, targets, mask, rw


def _wdce_truth(hidden, head, targets, mask, rw):
    total = torch.zeros((), dtype=torch.float64)
    for r in range(hidden.shape[0]):
        n = int(mask[r].sum())
        if n == 0:
            continue
        logp = torch.log_softmax(hidden[r].double() @ head.double().T, -1)
        ce = -logp.gather(1, targets[r, :, None]).squeeze(1)
        total = total + rw[r] / n * ce[mask[r]].sum()
    return total


@pytest.mark.parametrize("impl", ["eager", "chunked"])
@pytest.mark.parametrize("R,L,H,V", [(5, 13, 8, 37), (8, 7, 16, 101)])
def test_wdce_loss_matches_definition(impl, R, L, H, V):
    hidden, head, targets, mask, rw = _wdce_inputs(R, L, H, V)
    h = hidden.clone().requires_grad_()
    W = head.clone().requires_grad_()
    loss = dmpo_fast.wdce_loss(h, W, targets, mask, rw.float(), impl=impl)
    loss.backward()
    hd, Wd = hidden.double().requires_grad_(), head.double().requires_grad_()
    truth = _wdce_truth(hd, Wd, targets, mask, rw)
    truth.backward()
    assert abs(loss.item() - truth.item()) <= 1e-5 * (1 + abs(truth.item()))
    torch.testing.assert_close(h.grad.double(), hd.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(W.grad.double(), Wd.grad, rtol=1e-4, atol=1e-6)
    # Positions outside the loss (and the zero-weight row) get exactly zero gradient.
    assert torch.all(h.grad[~mask] == 0) and torch.all(h.grad[2] == 0)


def test_wdce_loss_nothing_masked_is_zero_with_zero_grads():
    hidden, head, targets, mask, rw = _wdce_inputs(3, 5, 4, 11)
    h = hidden.requires_grad_()
    loss = dmpo_fast.wdce_loss(h, head, targets, torch.zeros_like(mask), rw.float(), impl="chunked")
    loss.backward()
    assert loss.item() == 0.0 and torch.all(h.grad == 0)


def test_wdce_eager_is_the_reference_path():
    hidden, head, targets, mask, rw = _wdce_inputs(4, 6, 8, 19)
    a = wdce_loss_ref(hidden, head, targets, mask, rw.float())
    b = dmpo_fast.wdce_loss(hidden, head, targets, mask, rw.float(), impl="eager")
    assert a.item() == b.item()


def test_chunked_peak_memory_is_bounded_as_rows_grow():
    """The chunked path holds one chunk of logits however many rows there are; eager holds N·V."""
    H, V, chunk = 4, 4096, 1 << 16
    peaks = {}
    for n in (512, 4096):
        hidden = torch.randn(n, H, requires_grad=True)
        weight = torch.randn(V, H, requires_grad=True)
        targets = torch.randint(0, V, (n,))
        w = torch.rand(n)
        for impl in ("eager", "chunked"):

            def step():
                loss = dmpo_fast.weighted_linear_ce(
                    hidden, weight, targets, w, impl=impl, chunk_elements=chunk
                )
                loss.backward()

            peaks[impl, n] = peak_memory(step)[1]
        _, peaks["logprob", n] = peak_memory(
            lambda: (
                dmpo_fast.linear_logprob(hidden, weight, targets, impl="chunked", chunk_elements=chunk)
                .sum()
                .backward()
            )
        )
    logits_bytes_4096 = 4096 * V * 4
    # Chunked: a few chunk-sized buffers + O(N·H + V·H) gradients, nowhere near N·V.
    bound = 4 * chunk * 4 + 4 * (4096 * H + V * H) * 4
    for impl in ("chunked", "logprob"):
        assert peaks[impl, 4096] <= bound, peaks
        assert peaks[impl, 4096] <= 1.5 * peaks[impl, 512], peaks
    # Eager materialises the full logits (sanity check that the measurement sees them).
    assert peaks["eager", 4096] >= logits_bytes_4096
    assert peaks["eager", 4096] >= 6 * peaks["eager", 512]


def test_cpu_chunks_are_sized_for_the_cpu_and_count_the_hidden_rows():
    # A large vocabulary: H rows, a chunk of logits as large as dW; the GPU budget holds 2**24 values.
    assert chunk_rows(32000, device="cpu", hidden=256) == 256 < chunk_rows(32000, hidden=256) // 2
    assert chunk_rows(32000, device="cuda") == CHUNK_ELEMENTS // 32000
    # The default run's head (V = 55, H = 128): the gathered rows and their gradient outweigh the logits.
    assert chunk_rows(55, device="cpu", hidden=128) == CPU_CHUNK_ELEMENTS // (55 + 2 * 128)
    assert chunk_rows(10, 7, hidden=100) == 1  # an explicit budget is exact, and always at least one row


def test_chunked_backward_copies_no_gradient_at_unit_upstream_gradient():
    """dW is the one buffer of V·H on the CPU path: the forward's dW becomes weight.grad without a copy."""
    n, H, V = 64, 32, 8192
    hidden = torch.randn(n, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    targets, w = torch.randint(0, V, (n,)), torch.rand(n)
    chunk = 8 * V  # 7 rows of logits: 229 KB against dW's 1 MB

    def step():
        dmpo_fast.weighted_linear_ce(
            hidden, weight, targets, w, impl="chunked", chunk_elements=chunk
        ).backward()

    _, peak = peak_memory(step)
    dw_bytes = V * H * 4
    assert peak <= dw_bytes + 2 * chunk * 4, (peak, dw_bytes)
    # Another upstream gradient still scales, and retain_graph reuse sees the unscaled buffers again.
    h, W = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = dmpo_fast.weighted_linear_ce(h, W, targets, w, impl="chunked", chunk_elements=chunk)
    (g1,) = torch.autograd.grad(loss, (W,), retain_graph=True)
    (g2,) = torch.autograd.grad(loss * -2.5, (W,))
    torch.testing.assert_close(g2, -2.5 * g1, rtol=0, atol=0)


def test_wdce_chunked_holds_no_gathered_copy_of_the_masked_rows(monkeypatch):
    """The chunked wdce_loss writes dH into hidden's gradient and gathers the masked rows a chunk at a time:
    on top of hidden.grad and dW only a chunk's worth, where gathering first held [N, H] rows, their [N, H]
    gradient and a scaled copy of it (V small, as in the default run: the [N, H] buffers are the big ones)."""
    monkeypatch.setattr(linear_ce, "CPU_CHUNK_ELEMENTS", 1 << 13)  # 46 rows of 50 + 2·64 values
    monkeypatch.setattr(linear_ce, "CPU_MIN_CHUNK_ROWS", 1)  # no floor of H rows
    R, L, H, V = 8, 64, 64, 50
    hidden = torch.randn(R, L, H, requires_grad=True)
    head = torch.randn(V, H, requires_grad=True)
    targets = torch.randint(0, V, (R, L))
    targets[:, :4] = -100  # the targets outside the loss are never read (F.cross_entropy ignores -100 too)
    mask = torch.rand(R, L) < 0.75
    mask[:, :4] = False
    rw = torch.randn(R)
    for impl in ("chunked", "eager"):
        hidden.grad = head.grad = None
        _, peak = peak_memory(
            lambda impl=impl: dmpo_fast.wdce_loss(hidden, head, targets, mask, rw, impl=impl).backward()
        )
        if impl == "chunked":
            want = hidden.grad.clone(), head.grad.clone()
            grad_bytes = (R * L * H + V * H) * 4
            assert peak <= grad_bytes + 2 * linear_ce.CPU_CHUNK_ELEMENTS * 4 + 4 * R * L * 8, (
                peak,
                grad_bytes,
            )
    torch.testing.assert_close(want[0], hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(want[1], head.grad, rtol=1e-5, atol=1e-6)
    targets[1, 10] = V
    mask[1, 10] = True
    with pytest.raises(ValueError, match="targets must lie in"):
        dmpo_fast.wdce_loss(hidden, head, targets, mask, rw, impl="chunked")


# --------------------------------------------------------------------------------------------------
# torch.autocast: the projection in the autocast dtype, as F.linear; fp32 master weights get fp32 grads
# --------------------------------------------------------------------------------------------------


def _autocast_case(op, impl, backward_inside):
    n, h, v = 19, 24, 101
    hidden, weight, targets, w = _inputs(n, h, v, torch.float32, zero_every=4)
    g = torch.randn(n)

    def run(hdn, wt, autocast):
        hdn, wt = hdn.detach().requires_grad_(), wt.detach().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if op == "logprob":
                out = (dmpo_fast.linear_logprob(hdn, wt, targets, impl=impl) * g).sum()
            elif op == "wce":
                out = dmpo_fast.weighted_linear_ce(hdn, wt, targets, w.float(), impl=impl)
            else:  # wdce_loss on [R, L, H] rows
                mask = torch.arange(n) % 3 != 0
                out = dmpo_fast.wdce_loss(
                    hdn.reshape(1, n, h),
                    wt,
                    targets.reshape(1, n),
                    mask.reshape(1, n),
                    torch.ones(1),
                    impl=impl,
                )
            if backward_inside:
                out.backward()
        if not backward_inside:
            out.backward()
        return out.detach(), hdn.grad, wt.grad

    # The model's last norm in fp32 and the head in bf16: mixed operand dtypes are what autocast produces.
    out, dh, dw = run(hidden, weight.bfloat16(), autocast=True)
    want, dh_want, dw_want = run(hidden.bfloat16(), weight.bfloat16(), autocast=False)
    assert out.dtype == torch.float32 and dh.dtype == torch.float32 and dw.dtype == torch.bfloat16
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(dh, dh_want.float(), rtol=0, atol=0)
    torch.testing.assert_close(dw, dw_want, rtol=0, atol=0)
    # fp32 master weights: cast to bf16 for the product, the gradient arrives in fp32.
    out32, _, dw32 = run(hidden, weight, autocast=True)
    torch.testing.assert_close(out32, want, rtol=0, atol=0)
    assert dw32.dtype == torch.float32
    torch.testing.assert_close(dw32, dw_want.float(), rtol=0, atol=0)


@pytest.mark.parametrize("op", ["logprob", "wce", "wdce"])
@pytest.mark.parametrize(
    "impl,backward_inside",
    # eager is plain autograd, whose backward follows the autocast state at backward() time (torch advises
    # against backward inside autocast); the chunked custom backward switches autocast off itself.
    [("eager", False), ("chunked", False), ("chunked", True)],
    ids=["eager", "chunked", "chunked-backward_inside_autocast"],
)
def test_ops_under_autocast_compute_in_the_autocast_dtype(op, impl, backward_inside):
    _autocast_case(op, impl, backward_inside)


def test_fp64_operands_are_left_alone_under_autocast():
    hidden, weight, targets, w = _inputs(9, 16, 53)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dmpo_fast.weighted_linear_ce(hidden, weight, targets, w, impl="chunked")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, weighted_linear_ce_ref(hidden, weight, targets, w))
