"""`--device` for the analytic sweep: the solver's tensors follow the device, random
draws stay on the CPU generators, results on the CPU are unchanged, and `--device cuda` without a
GPU is a one-line exit-2 error."""

import pytest
import torch

from sandbox import analytic as an
from sandbox.app.cli import main
from sandbox.tasks import TaskSpec

CUDA = torch.cuda.is_available()


def _points(steps=20, **kw):
    cfg = an.AnalyticConfig(steps=steps, **kw)
    return [(TaskSpec(alignment=a), cfg, (0, 1)) for a in (0.0, 0.5)]


@pytest.mark.skipif(CUDA, reason="checks the error raised when no CUDA device is visible")
def test_sweep_device_cuda_without_gpu_is_one_line_exit_2(capsys, tmp_path):
    assert main(["sweep", "--device", "cuda", "--points", "1", "--seeds", "1", "--out", str(tmp_path / "s")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "--device" in lines[0]
    assert not (tmp_path / "s").exists()          # refused before any work


def test_sweep_device_bad_value_is_exit_2(capsys, tmp_path):
    assert main(["sweep", "--device", "tpu", "--points", "1", "--seeds", "1", "--out", str(tmp_path / "s")]) == 2
    assert "--device" in capsys.readouterr().err


def test_explicit_cpu_device_is_bit_identical():
    pts = _points()
    a, b = an.run_points(pts), an.run_points(pts, device="cpu")
    for ra, rb in zip(a, b):
        for arm in an.ARMS:
            assert torch.equal(ra[arm].final_loss, rb[arm].final_loss)
            assert torch.equal(ra[arm].curve, rb[arm].curve)


@pytest.mark.parametrize("arm", ["evo", "restart"])
def test_solver_loop_keeps_every_tensor_on_the_device(arm):
    """A dry run on the `meta` device (shapes only, no data): any tensor of the training loop left
    on the CPU would raise a device mismatch; the run ends where results are copied back to the CPU
    (meta tensors hold no data) or at the final oracle solve (a least-squares kernel meta tensors
    lack). Catches device slips on machines without a GPU."""
    rows = an.stack_rows(_points(steps=20))
    state = an.initial_rows_state(rows)
    with pytest.raises(NotImplementedError, match="(?i)meta"):
        an.solve_rows(rows, arm, state, device="meta")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("kw", [{}, {"lifecycle": True, "router": "sigmoid"}, {"evo": "cma"}])
def test_cuda_matches_cpu(kw):
    """Same draws (CPU generators), float64 on both: results agree to rounding, not bit for bit
    (reduction order differs between devices)."""
    pts = _points(**kw)
    cpu, gpu = an.run_points(pts), an.run_points(pts, device="cuda")
    for rc, rg in zip(cpu, gpu):
        for arm in an.ARMS:
            assert rg[arm].final_loss.device.type == "cpu"
            torch.testing.assert_close(rg[arm].final_loss, rc[arm].final_loss, rtol=1e-6, atol=1e-9)
