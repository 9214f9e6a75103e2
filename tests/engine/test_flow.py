"""The flow decoder without host reads (``engine.flow``): upstream's numbers, no device reads.

Equality is ``torch.equal``: the same operations in the same order, so a
solve under CUDA graphs starts from exactly upstream's eager computation.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from chatterbox_worker.engine.flow import estimator_forward, solve, sync_free_chunk_mask, time_span


class HostReads(TorchDispatchMode):
    """Records the operations that make the host wait for the device's answer (on a GPU,
    a synchronisation; inside a CUDA graph capture, an error)."""

    READS = {"item", "_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in self.READS:
            self.seen.append(name)
        # Indexing with a boolean mask finds its true positions on the host.
        if name.startswith("index") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool
                for a in args if isinstance(a, (list, tuple)) for i in a):
            self.seen.append(name + " (boolean index)")
        return func(*args, **(kwargs or {}))


def padded_call(rows=3, frames=70, seed=0):
    """A batch of ``rows`` calls of different lengths, as ``flow_mels_batch`` hands the solver."""
    g = torch.Generator().manual_seed(seed)
    lengths = [frames - 9 * r for r in range(rows)]
    mask = torch.zeros(rows, 1, frames)
    for r, n in enumerate(lengths):
        mask[r, :, :n] = 1
    x = torch.randn(rows, 80, frames, generator=g)
    mu = torch.randn(rows, 80, frames, generator=g) * mask
    cond = torch.zeros(rows, 80, frames)
    cond[:, :, :20] = torch.randn(rows, 80, 20, generator=g)
    spks = torch.randn(rows, 80, generator=g)
    return x, mu, mask, spks, cond


def test_chunk_mask_equals_upstreams():
    from chatterbox.models.s3gen.utils.mask import add_optional_chunk_mask

    x = torch.zeros(2, 12, 4)
    mask = torch.ones(2, 1, 12, dtype=torch.bool)
    mask[1, :, 7:] = False
    for chunk in (0, 4):
        expected = add_optional_chunk_mask(x, mask.clone(), False, False, 0, chunk, -1)
        assert torch.equal(sync_free_chunk_mask(x, mask, chunk), expected)


def test_a_wholly_masked_row_attends_everywhere():
    """What upstream means to do for a row with no position (a padded row of a graph's
    bucket): its fix-up logs first, through a module it never imports, so it raises."""
    from chatterbox.models.s3gen.utils.mask import add_optional_chunk_mask

    x = torch.zeros(2, 12, 4)
    mask = torch.ones(2, 1, 12, dtype=torch.bool)
    mask[1] = False
    with pytest.raises(NameError, match="logging"):
        add_optional_chunk_mask(x, mask.clone(), False, False, 0, 0, -1)
    ours = sync_free_chunk_mask(x, mask, 0)
    assert ours[1].all() and torch.equal(ours[0], mask[0])


def test_estimator_pass_equals_upstreams_and_reads_nothing_back(model):
    estimator = model.s3gen.flow.decoder.estimator
    x, mu, mask, spks, cond = padded_call()
    t = torch.tensor([0.1, 0.5, 0.9])
    with torch.inference_mode():
        upstream_reads = HostReads()
        with upstream_reads:
            expected = estimator.forward(x, mask, mu, t, spks, cond)
        ours_reads = HostReads()
        with ours_reads:
            ours = estimator_forward(estimator, x, mask, mu, t, spks, cond)
    assert torch.equal(ours, expected)
    assert upstream_reads.seen  # the probe sees upstream's per-block read...
    assert ours_reads.seen == []  # ...and none in ours


@pytest.mark.parametrize("variant,steps,rows", [("original", 10, 3), ("original", 4, 3),
                                                 ("turbo", 2, 1)])
def test_solve_equals_upstreams_and_reads_nothing_back(request, capsys, variant, steps, rows):
    """The original's guided Euler steps (``solve_euler``) and turbo's mean flow
    (``basic_euler``, which takes one row: its times are (1,))."""
    meanflow = variant == "turbo"
    engine = request.getfixturevalue("turbo_engine" if meanflow else "engine")
    cfm = engine.model.s3gen.flow.decoder
    x, mu, mask, spks, cond = padded_call(rows=rows, seed=steps)
    t_span = time_span(steps, meanflow=meanflow, device="cpu", dtype=torch.float32)
    upstream = cfm.basic_euler if meanflow else cfm.solve_euler
    with torch.inference_mode():
        expected = upstream(x, t_span=t_span, mu=mu, mask=mask, spks=spks, cond=cond)
        capsys.readouterr()  # upstream's mean flow prints; ours below must not
        reads = HostReads()
        with reads:
            ours = solve(cfm, x, t_span, mu, mask, spks, cond, meanflow=meanflow)
    assert torch.equal(ours, expected)
    assert reads.seen == []
    assert capsys.readouterr().out == ""


def test_time_span_is_upstreams_schedule():
    cosine = time_span(10, meanflow=False, device="cpu", dtype=torch.float32)
    assert cosine[0] == 0 and cosine[-1] == pytest.approx(1) and cosine.shape == (11,)
    assert torch.equal(cosine, 1 - torch.cos(torch.linspace(0, 1, 11) * 0.5 * torch.pi))
    assert torch.equal(time_span(2, meanflow=True, device="cpu", dtype=torch.float32),
                       torch.tensor([0.0, 0.5, 1.0]))
