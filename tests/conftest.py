"""Test set-up: Triton's CPU interpreter must be chosen before any kernel is defined."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def exact_cuda():
    """No TF32 and deterministic cuDNN, for CUDA tests that compare paths with fp32 tolerances: TF32
    convolutions round differently in eager's NCHW algorithms and in the channels_last ones Inductor's
    layout optimisation picks, and ulp-level differences in grad(Z) must stay ulp-level."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.deterministic)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    yield
    (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
     torch.backends.cudnn.deterministic) = saved
