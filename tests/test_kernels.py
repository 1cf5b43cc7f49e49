"""Bag kernels against torch's F.embedding_bag: forward, both gradients, autograd, errors.

The Triton kernels run under the interpreter on CPU (conftest sets TRITON_INTERPRET)
and compiled on CUDA; the same cases check the fast torch path. Inputs are kept
small so the interpreter is quick: large bags come with few of them.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from memdist import kernels
from memdist.errors import ConfigError, IndexOutOfRangeError, ShapeError

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CPP = pytest.param(
    "cpp", marks=pytest.mark.skipif(DEVICE.type != "cpu", reason="C++ kernels run on CPU tensors")
)
BACKENDS = [CPP, "torch", pytest.param("triton", marks=pytest.mark.triton)]
# (bags N, bag size K, rows V, width D, index pattern)
CASES = [
    (16, 1, 50, 1, "random"),
    (8, 7, 40, 33, "random"),
    (6, 64, 100, 100, "repeated"),
    (4, 64, 5000, 128, "random"),
    (2, 512, 1000, 128, "random"),
    (3, 512, 1000, 33, "repeated"),
    # Wider than one column block (256): the second grid axis, an odd width, the paper's
    # width, and one past a power of two.
    (3, 5, 40, 520, "random"),
    (2, 3, 30, 1024, "repeated"),
    (2, 4, 20, 4097, "random"),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


def make_inputs(n, k, v, d, pattern, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(v, d, generator=g).to(dtype)
    if pattern == "repeated":  # every index one of three rows, including the last
        idx = torch.tensor([3, v - 1, 7])[torch.randint(0, 3, (n, k), generator=g)]
    else:
        idx = torch.randint(0, v, (n, k), generator=g)
    scores = torch.rand(n, k, generator=g).to(dtype)
    dy = torch.randn(n, d, generator=g)
    return values.to(DEVICE), idx.to(DEVICE), scores.to(DEVICE), dy.to(DEVICE)


def embedding_bag_reference(values, idx, scores, dy):
    """F.embedding_bag with autograd on fp32 copies: output, dense dvalues, dscores."""
    v = values.detach().float().clone().requires_grad_(True)
    s = scores.detach().float().clone().requires_grad_(True)
    y = F.embedding_bag(idx, v, per_sample_weights=s, mode="sum")
    y.backward(dy.float())
    return y.detach(), v.grad, s.grad


def densify(rows_U, grad_UD, num_rows):
    dense = torch.zeros(num_rows, grad_UD.shape[1], device=grad_UD.device)
    dense[rows_U] = grad_UD
    return dense


def tolerance(terms):
    # Both sides read the same (possibly bf16) inputs and sum in fp32; a product of two
    # bf16 numbers is exact in fp32, so bf16 tables differ from the fp32 reference only
    # by summation order, as fp32 ones do. That rounding error grows like the square
    # root of the number of terms (and so does the size of the sums here).
    return dict(rtol=1e-5, atol=1e-5 * terms**0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=[f"N{c[0]}K{c[1]}D{c[3]}-{c[4]}" for c in CASES])
def test_bag_matches_embedding_bag(backend, dtype, case):
    n, k, v, d, pattern = case
    values, idx, scores, dy = make_inputs(n, k, v, d, pattern, dtype)
    y_ref, dvalues_ref, dscores_ref = embedding_bag_reference(values, idx, scores, dy)

    y = kernels.bag_forward(values, idx, scores, backend=backend)
    assert y.dtype == torch.float32 and y.shape == (n, d)
    torch.testing.assert_close(y, y_ref, **tolerance(k))

    dscores = kernels.bag_backward_scores(values, idx, dy, backend=backend)
    assert dscores.dtype == torch.float32 and dscores.shape == (n, k)
    torch.testing.assert_close(dscores, dscores_ref, **tolerance(d))

    rows, grad = kernels.bag_backward_values(idx, scores, dy, backend=backend)
    assert rows.dtype == torch.int64 and grad.dtype == torch.float32
    assert torch.equal(rows, torch.unique(idx))
    torch.testing.assert_close(densify(rows, grad, v), dvalues_ref, **tolerance(n * k))

    if dtype == torch.bfloat16:
        # And torch's own bf16 embedding_bag, whose output is rounded to bf16.
        y_bf16 = F.embedding_bag(idx, values, per_sample_weights=scores, mode="sum")
        torch.testing.assert_close(y.to(torch.bfloat16), y_bf16, rtol=2e-2, atol=2e-2 * k**0.5)


@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
def test_strided_inputs_int32_indices_and_a_hot_row(backend):
    """A column slice of a wider table, a transposed dy, int32 indices, one row read 600
    times (the Triton value gradient loops over many position blocks for it)."""
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(300, 90, generator=g).to(DEVICE)
    values = wide[:, 10:50]  # row stride 90, 40 columns
    idx = torch.randint(0, 300, (20, 40), generator=g)
    idx[:, 5:35] = 17
    idx = idx.to(DEVICE, torch.int32)
    scores = torch.rand(20, 40, generator=g).to(DEVICE)
    dy = torch.randn(40, 20, generator=g).to(DEVICE).t()  # non-contiguous
    y_ref, dvalues_ref, dscores_ref = embedding_bag_reference(values, idx.long(), scores, dy)
    y = kernels.bag_forward(values, idx, scores, backend=backend)
    dscores = kernels.bag_backward_scores(values, idx, dy, backend=backend)
    rows, grad = kernels.bag_backward_values(idx, scores, dy, backend=backend)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dscores, dscores_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(densify(rows, grad, 300), dvalues_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_bags(backend):
    values = torch.randn(10, 6, device=DEVICE)
    for n, k in [(0, 4), (3, 0)]:
        idx = torch.zeros(n, k, dtype=torch.long, device=DEVICE)
        scores = torch.zeros(n, k, device=DEVICE)
        dy = torch.randn(n, 6, device=DEVICE)
        assert torch.equal(kernels.bag_forward(values, idx, scores, backend=backend), dy * 0)
        assert kernels.bag_backward_scores(values, idx, dy, backend=backend).shape == (n, k)
        rows, grad = kernels.bag_backward_values(idx, scores, dy, backend=backend)
        assert rows.shape == (0,) and grad.shape == (0, 6)


@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
def test_entries_are_the_whole_bags_with_the_others_weighing_zero(backend):
    """Bags of any length (a row-wise shard's own entries, some bags empty) against the
    same backend's whole bags with the other entries' scores zero."""
    values, idx, scores, dy = make_inputs(12, 9, 60, 33, "random", torch.float32, seed=3)
    mine = idx % 4 != 1
    mine[2], mine[7] = False, True  # an empty bag and a whole one
    positions = mine.reshape(-1).nonzero().squeeze(1)
    offsets = torch.zeros(13, dtype=torch.int64, device=DEVICE)
    offsets[1:] = mine.sum(1).cumsum(0)
    idx_e, scores_e = idx.reshape(-1)[positions], scores.reshape(-1)[positions]
    y = kernels.entries_forward(values, idx_e, scores_e, offsets, backend=backend)
    y_whole = kernels.bag_forward(values, idx, scores * mine, backend=backend)
    torch.testing.assert_close(y, y_whole, **tolerance(9))
    assert torch.equal(y[2], torch.zeros(33, device=DEVICE))
    ds, rows, grad = kernels.entries_backward(values, idx_e, scores_e, offsets, dy, backend=backend)
    ds_whole = kernels.bag_backward_scores(values, idx, dy, backend=backend)
    torch.testing.assert_close(ds, ds_whole.reshape(-1)[positions], **tolerance(33))
    rows_w, grad_w = kernels.bag_backward_values(
        torch.where(mine, idx, 60), scores, dy, backend=backend
    )
    assert torch.equal(rows, rows_w[:-1])
    torch.testing.assert_close(grad, grad_w[:-1], **tolerance(9))
    none = torch.zeros(13, dtype=torch.int64, device=DEVICE)  # no entries at all
    assert torch.equal(kernels.entries_forward(values, idx_e[:0], scores_e[:0], none,
                                               backend=backend), dy[:, :33] * 0)  # fmt: skip
    ds0, rows0, grad0 = kernels.entries_backward(values, idx_e[:0], scores_e[:0], none, dy,
                                                 backend=backend)  # fmt: skip
    assert ds0.shape == (0,) and rows0.shape == (0,) and grad0.shape == (0, 33)


def test_entries_errors_name_the_rule():
    values = torch.randn(10, 4)
    idx, scores = torch.tensor([1, 2, 3]), torch.rand(3)
    with pytest.raises(
        ShapeError, match=r"bag offsets must rise from 0 to the 3 entries, got 0 \.\. 2"
    ):
        kernels.entries_forward(values, idx, scores, torch.tensor([0, 2]))
    with pytest.raises(ShapeError, match=r"got 0 \.\. 3 \(falling somewhere\)"):
        kernels.entries_forward(values, idx, scores, torch.tensor([0, 3, 1, 3]))
    with pytest.raises(ShapeError, match="non-empty 1-D int64"):
        kernels.entries_forward(values, idx, scores, torch.tensor([0, 3], dtype=torch.int32))
    with pytest.raises(ShapeError, match="entries' indices must be a 1-D"):
        kernels.entries_forward(values, idx.view(1, 3), scores.view(1, 3), torch.tensor([0, 3]))
    with pytest.raises(ShapeError, match=r"output gradient has shape \(3, 4\), expected \(1, 4\)"):
        kernels.entries_backward(values, idx, scores, torch.tensor([0, 3]), torch.randn(3, 4))
    with pytest.raises(IndexOutOfRangeError, match=r"index 10 at position \(1,\)"):
        kernels.entries_forward(values, torch.tensor([1, 10, 3]), scores, torch.tensor([0, 3]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_gradient_is_deterministic(backend):
    _, idx, scores, dy = make_inputs(8, 256, 50, 40, "repeated", torch.float32)
    rows1, grad1 = kernels.bag_backward_values(idx, scores, dy, backend=backend)
    rows2, grad2 = kernels.bag_backward_values(idx, scores, dy, backend=backend)
    assert torch.equal(rows1, rows2) and torch.equal(grad1, grad2)


def test_segments_split_hot_rows_and_keep_their_order():
    from memdist.kernels.triton_bag import segments

    # Rows of 1, 5 and 2 positions in runs of at most 2: row 1 gets three segments.
    seg = segments(torch.tensor([0, 1, 6, 8], device=DEVICE), 2)
    assert seg["start"].tolist() == [0, 1, 3, 5, 6]
    assert seg["end"].tolist() == [1, 3, 5, 6, 8]
    assert seg["split"].tolist() == [0, 1, 1, 1, 0]
    assert seg["dest"].tolist() == [0, 0, 1, 2, 2]  # gradient row, partials 0..2, row
    assert (seg["rows"].tolist(), seg["first"].tolist(), seg["count"].tolist()) == ([1], [0], [3])


@pytest.mark.triton
@pytest.mark.parametrize("segment", [1, 3, 128])
def test_triton_value_gradient_with_hot_rows_split(segment):
    from memdist.kernels import triton_bag

    values, idx, scores, dy = make_inputs(6, 40, 30, 20, "repeated", torch.float32)
    idx[:, :3] = torch.arange(3, device=DEVICE) + 10  # and rows read once per bag
    _, dvalues_ref, _ = embedding_bag_reference(values, idx, scores, dy)
    rows, grad = triton_bag.bag_backward_values(idx, scores, dy, segment=segment)
    assert torch.equal(rows, torch.unique(idx))
    torch.testing.assert_close(densify(rows, grad, 30), dvalues_ref, **tolerance(6 * 40))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_do_not_depend_on_the_layout_of_dy(backend):
    """Bitwise: a sharded table gets a contiguous copy of the dy that autograd may hand
    a local table transposed, and both must round the same way."""
    values, idx, scores, dy = make_inputs(6, 16, 40, 100, "random", torch.float32)
    dy_t = dy.t().contiguous().t()
    ds = kernels.bag_backward_scores(values, idx, dy, backend=backend)
    ds_t = kernels.bag_backward_scores(values, idx, dy_t, backend=backend)
    assert torch.equal(ds, ds_t)
    _, grad = kernels.bag_backward_values(idx, scores, dy, backend=backend)
    _, grad_t = kernels.bag_backward_values(idx, scores, dy_t, backend=backend)
    assert torch.equal(grad, grad_t)


def test_torch_value_gradient_does_not_depend_on_thread_count():
    _, idx, scores, dy = make_inputs(64, 64, 20, 64, "repeated", torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, grad1 = kernels.bag_backward_values(idx, scores, dy, backend="torch")
        torch.set_num_threads(max(2, threads))
        _, grad2 = kernels.bag_backward_values(idx, scores, dy, backend="torch")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(grad1, grad2)


def test_auto_backend_is_triton_on_cuda_and_cpp_on_cpu():
    values, idx, scores, dy = make_inputs(4, 8, 30, 16, "random", torch.float32)
    expect = "triton" if DEVICE.type == "cuda" else "cpp"
    y_auto = kernels.bag_forward(values, idx, scores)
    _, grad_auto = kernels.bag_backward_values(idx, scores, dy)
    assert torch.equal(y_auto, kernels.bag_forward(values, idx, scores, backend=expect))
    assert torch.equal(grad_auto, kernels.bag_backward_values(idx, scores, dy, backend=expect)[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_autograd_gives_scores_grad_and_feeds_the_sink(backend, dtype):
    values, idx, scores, dy = make_inputs(5, 9, 20, 12, "random", dtype)
    dy = dy.to(dtype)
    y_ref, dvalues_ref, dscores_ref = embedding_bag_reference(values, idx, scores, dy)
    received = []
    s = scores.detach().clone().requires_grad_(True)
    y = kernels.weighted_embedding_bag(
        values, idx, s, lambda r, g: received.append((r, g)), backend=backend
    )
    assert y.dtype == dtype
    # A non-contiguous output gradient must work too.
    y.backward(dy.t().contiguous().t())
    # bf16 outputs and scores gradients are rounded to bf16 (8 significant bits).
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=8e-3, atol=8e-3)
    torch.testing.assert_close(y.float(), y_ref, **tol)
    torch.testing.assert_close(s.grad.float(), dscores_ref, **tol)
    ((rows, grad),) = received
    torch.testing.assert_close(densify(rows, grad, 20), dvalues_ref, **tol)
    assert values.grad is None


def test_autograd_without_sink_or_scores_grad():
    values, idx, scores, dy = make_inputs(5, 9, 20, 12, "random", torch.float32)
    s = scores.clone().requires_grad_(True)
    kernels.weighted_embedding_bag(values, idx, s, None).backward(dy)
    torch.testing.assert_close(s.grad, embedding_bag_reference(values, idx, scores, dy)[2])
    received = []
    y = kernels.weighted_embedding_bag(values, idx, scores, lambda r, g: received.append(r))
    assert not y.requires_grad and not received  # nothing to differentiate: no backward


def test_out_of_range_indices_name_the_value_position_and_table_size():
    values = torch.zeros(10, 4)
    scores = torch.ones(2, 3)
    with pytest.raises(IndexOutOfRangeError, match=r"index 10 at position \(1, 2\) .* 10 rows"):
        kernels.bag_forward(values, torch.tensor([[0, 1, 2], [3, 4, 10]]), scores)
    with pytest.raises(IndexOutOfRangeError, match=r"index -1 at position \(0, 0\) .* 10 rows"):
        kernels.bag_forward(values, torch.tensor([[-1, 1, 2], [3, 4, 5]]), scores)
    with pytest.raises(IndexOutOfRangeError, match=r"index 11 .* 10 rows"):
        kernels.bag_backward_scores(values, torch.tensor([[0, 11, 2]]), torch.ones(1, 4))


def test_indices_beyond_2_to_the_32():
    big = 2**32 + 5
    kernels.check_indices(torch.tensor([[big, 0]]), 2**33)
    with pytest.raises(IndexOutOfRangeError, match=f"index {big} at position \\(0, 1\\)"):
        kernels.check_indices(torch.tensor([[0, big]]), 2**32)


def test_shape_dtype_device_and_name_errors():
    values, idx, scores = torch.zeros(10, 4), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3)
    with pytest.raises(
        ShapeError, match=r"scores shape \(2, 2\) must equal indices shape \(2, 3\)"
    ):
        kernels.bag_forward(values, idx, scores[:, :2])
    with pytest.raises(ShapeError, match=r"indices must be a 2-D int64/int32 .* torch.float32"):
        kernels.bag_forward(values, idx.float(), scores)
    with pytest.raises(ShapeError, match=r"indices must be a 2-D .* shape \(6,\)"):
        kernels.bag_forward(values, idx.view(-1), scores.view(-1))
    with pytest.raises(ShapeError, match=r"values must be 2-D .* shape \(40,\)"):
        kernels.bag_forward(values.view(-1), idx, scores)
    with pytest.raises(ShapeError, match="values dtype torch.int64"):
        kernels.bag_forward(values.long(), idx, scores)
    with pytest.raises(ShapeError, match=r"output gradient has shape \(2, 5\), expected \(2, 4\)"):
        kernels.bag_backward_scores(values, idx, torch.zeros(2, 5))
    with pytest.raises(ShapeError, match=r"output gradient has shape \(3, 4\), expected \(2, D\)"):
        kernels.bag_backward_values(idx, scores, torch.zeros(3, 4))
    with pytest.raises(ShapeError, match=r"scores shape \(3, 2\)"):
        kernels.bag_backward_values(idx, scores.t(), torch.zeros(2, 4))
    with pytest.raises(ShapeError, match="share one device.*scores on meta"):
        kernels.bag_forward(values, idx, scores.to("meta"))
    with pytest.raises(ConfigError, match=r"backend='cuda-magic' must be one of"):
        kernels.bag_forward(values, idx, scores, backend="cuda-magic")
    with pytest.raises(ConfigError, match=r"backend='fast'"):
        kernels.bag_backward_values(idx, scores, torch.zeros(2, 4), backend="fast")


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=environ,
        timeout=240,
    )


def test_import_does_not_import_triton():
    out = _run_python(
        """
        import sys
        import memdist.kernels
        print(sorted(m for m in sys.modules if m.split(".")[0] == "triton"))
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the compiled kernels")
def test_triton_on_cpu_without_interpreter_is_a_config_error():
    out = _run_python(
        """
        import torch
        from memdist import kernels
        from memdist.errors import ConfigError
        try:
            kernels.bag_forward(torch.ones(3, 2), torch.zeros(1, 1, dtype=torch.long),
                                torch.ones(1, 1), backend="triton")
        except ConfigError as e:
            print("ConfigError:", e)
        """
    )
    assert out.returncode == 0, out.stderr
    assert "ConfigError: backend='triton' on cpu tensors needs" in out.stdout
    assert "TRITON_INTERPRET=1" in out.stdout


# Every kernel with the tile sizes its wrapper picks for these (K, D), built to a GPU
# binary by Triton's own compiler and ptxas. The interpreter is lenient about types and
# control flow the compiler rejects; this catches that on machines with no GPU.
COMPILE_CHECK = """
    import json
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from memdist.kernels import triton_bag as tb, triton_optim as to

    assert not tb.INTERPRETED
    built = []

    # What a launch on a GPU adds when a pointer, a width or a stride is a multiple of 16
    # (16-byte vector loads): built for the widths where that holds, D = 1024 here.
    ALIGNED = {"D", "stride_v", "stride_dy", "stride_g"}

    def build(fn, sig, const, arch, num_warps=4):
        aligned = sig.pop("aligned", False)
        hint = [["tt.divisibility", 16]]
        attrs = {(fn.arg_names.index(name),): hint for name, ty in sig.items()
                 if aligned and (ty.startswith("*") or name in ALIGNED)}
        sig = {**sig, **{name: "constexpr" for name in const}}
        src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
        assert len(k.asm["cubin"]) > 0
        # The hints must reach the code: rows read as 16-byte vectors.
        assert not aligned or "ld.global.v4" in k.asm["ptx"], (fn.__name__, arch, sig)
        built.append(fn.__name__)

    for arch in (80, 90):
        for vt in ("fp32", "bf16"):
            for k, d in ((1, 1), (7, 33), (64, 128), (512, 100), (32, 256), (128, 1024)):
                a = d == 1024
                build(tb._bag_forward_kernel, dict(values_ptr="*" + vt, idx_ptr="*i64",
                      scores_ptr="*" + vt, y_ptr="*fp32", K="i32", D="i32", stride_v="i64",
                      aligned=a), tb.forward_blocks(k, d), arch)
                build(tb._bag_backward_scores_kernel, dict(values_ptr="*" + vt, idx_ptr="*i64",
                      dy_ptr="*" + vt, dscores_ptr="*fp32", K="i32", D="i32", stride_v="i32",
                      stride_dy="i32", aligned=a), tb.scores_blocks(k, d), arch)
                build(tb._bag_backward_values_kernel, dict(bag_ptr="*i64", weight_ptr="*fp32",
                      start_ptr="*i64", end_ptr="*i64", dest_ptr="*i64", split_ptr="*i8",
                      dy_ptr="*" + vt, grad_ptr="*fp32", partial_ptr="*fp32", D="i32",
                      stride_dy="i32", aligned=a), tb.values_blocks(d), arch)
            build(tb._sum_partials_kernel, dict(partial_ptr="*fp32", first_ptr="*i64",
                  count_ptr="*i64", rows_ptr="*i64", grad_ptr="*fp32", D="i32"),
                  dict(BLOCK_D=tb.MAX_BLOCK_D), arch)
            for opt in to.OPTIMIZER_CODES.values():
                for d in (1, 100, 1024, 5000):
                    launch = to.update_launch(d)
                    build(to._sparse_update_kernel, dict(values_ptr="*" + vt, rows_ptr="*i64",
                          grad_ptr="*fp32", sum_sq_ptr="*fp32", exp_avg_ptr="*fp32",
                          exp_avg_sq_ptr="*fp32", bc1_ptr="*fp32", bc2_ptr="*fp32", D="i32",
                          stride_v="i32", stride_g="i32", lr="fp32", eps="fp32", beta1="fp32",
                          beta2="fp32", decay="fp32", aligned=d == 1024),
                          dict(OPTIMIZER=opt, BLOCK_D=launch["BLOCK_D"],
                               BF16_BY_HAND=vt == "bf16" and d == 100), arch,
                          launch["num_warps"])
    print(json.dumps(sorted(set(built))))
"""


@pytest.mark.triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the compiled kernels")
def test_triton_kernels_compile_for_sm80_and_sm90():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:  # a Triton without the ahead-of-time compile API
        pytest.skip(f"triton cannot compile ahead of time here: {e}")
    out = _run_python(COMPILE_CHECK, TRITON_DEFAULT_FP_FUSION="1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [
        "_bag_backward_scores_kernel",
        "_bag_backward_values_kernel",
        "_bag_forward_kernel",
        "_sparse_update_kernel",
        "_sum_partials_kernel",
    ]
