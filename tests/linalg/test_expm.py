"""The general matrix exponential against SciPy, on both sides of the Taylor cutoff."""

import numpy as np
import pytest
import scipy.linalg
import torch

from torsion.linalg import matrix_exp


@pytest.mark.parametrize("skew", [False, True])
def test_matrix_exp_is_accurate_to_rounding_at_every_norm(skew):
    """torch's float64 expm errs by up to 1e-10 at 1-norms in [3e-3, 6e-2]; the Taylor
    branch must stay exact there and hand over before its truncation error shows (a
    degree-12 polynomial at a 1-norm of 2 errs by 1e-10)."""
    generator = torch.Generator().manual_seed(0)
    norms = torch.tensor([1e-4, 4e-3, 0.02, 0.042, 0.1, 0.2, 0.25, 0.3, 0.7, 1.5, 2.0, 3.0, 8.0])
    z = torch.randn(len(norms), 5, 5, dtype=torch.float64, generator=generator)
    z = z - z.mT if skew else z
    a = norms.double()[:, None, None] * z / torch.linalg.matrix_norm(z, ord=1, keepdim=True)
    expected = torch.from_numpy(np.stack([scipy.linalg.expm(m) for m in a.numpy()]))
    scale = torch.linalg.matrix_norm(expected, ord=1, keepdim=True)
    error = (matrix_exp(a) - expected).abs() / scale
    assert error.max() < 1e-14, error.amax(dim=(-2, -1))
    float32 = matrix_exp(a.float())
    assert float32.dtype == torch.float32
    torch.testing.assert_close(float32.double(), expected, rtol=1e-5, atol=1e-5)


def test_matrix_exp_rejects_non_square_input():
    with pytest.raises(ValueError, match="square"):
        matrix_exp(torch.ones(2, 3, dtype=torch.float64))
